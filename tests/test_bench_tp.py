"""`sazd bench tp`: real PyTorch tensor parallelism (it must train exactly as plain PyTorch), the
shared stragglers slowing exactly the worker/rank they name on both sides, the quick sweep, and the
command's refusals."""

from __future__ import annotations

import json

import pytest
import torch

from sazd.bench.tp.launch import launch
from sazd.bench.tp.rank import build, order_qkv, qkv_order, spec_batches
from sazd.bench.tp.report import crossover
from sazd.cli import main
from sazd.stragglers import DeadWorker, NoisyNeighbour, RandomDelays, SlowWorker

SPECS = {
    "mlp": {"model": "mlp", "in_shape": [1, 28, 28], "num_classes": 10, "hidden": [32, 32],
            "dataset": "synthetic", "train_limit": 256},
    "gpt": {"model": "gpt", "in_shape": [64], "num_classes": 256, "hidden": [32, 2, 4],
            "dataset": "pystdlib", "train_limit": 256},
}


def spec_of(model: str, **over) -> dict:
    spec = {**SPECS[model], "seed": 0, "dtype": "float64", "batch_size": 16, "steps": 3, "lr": 0.1,
            "momentum": 0.9, "phases": [{"kind": "none"}]}
    spec.update(over)
    return spec


def test_qkv_order_gives_each_rank_its_own_heads():
    order = qkv_order(8, 2)  # channels 0-3: rank 0's heads, 4-7: rank 1's
    assert sorted(order.tolist()) == list(range(24))
    assert order[:12].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]  # q, k, v of rank 0
    model = build(spec_of("gpt"))
    before = model.h[0].attn.c_attn.weight.clone()
    order_qkv(model, 2)
    assert not torch.equal(model.h[0].attn.c_attn.weight, before)
    order_qkv(model, 2, inverse=True)
    assert torch.equal(model.h[0].attn.c_attn.weight, before)
    with pytest.raises(ValueError, match="heads"):
        order_qkv(model, 3)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_tensor_parallel_training_equals_plain_pytorch(model, tmp_path):
    spec = spec_of(model, save_params=True)
    run = launch(spec, 2, timeout_s=240, keep=tmp_path)
    assert run.ok, run.stopped
    assert run.records[0]["backend"] == "gloo"
    from safetensors.torch import load_file

    tp = load_file(str(run.params_path))

    # the oracle: the same network, batches and optimizer in one process
    from sazd.bench.tp.rank import data
    from sazd.models import task_of

    plain = build(spec)
    task = task_of(plain)
    opt = torch.optim.SGD(plain.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    losses = []
    for xb, yb in spec_batches(spec, data(spec)):
        opt.zero_grad()
        loss = task.loss(plain(xb), yb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert run.phases(0)[0]["loss"] == pytest.approx(losses, rel=1e-12)
    params = dict(plain.named_parameters())
    assert set(tp) == set(params)
    for name, p in params.items():
        torch.testing.assert_close(tp[name], p.detach(), rtol=1e-10, atol=1e-12, msg=name)
    assert any(not torch.equal(tp[n], build(spec).state_dict()[n]) for n in tp)  # it did train


@pytest.mark.slow
def test_each_straggler_slows_exactly_the_rank_it_names():
    phases = [SlowWorker(1, 3.0), NoisyNeighbour(1, 0.5), RandomDelays("calls", {"prob": 0.5, "factor": 2.0}),
              DeadWorker(1, 2)]
    run = launch(spec_of("mlp", steps=4, phases=[p.to_dict() for p in phases]), 2, timeout_s=240)
    rank0, rank1 = run.phases(0), run.phases(1)
    compute1 = run.records[1]["compute_s"]
    # (a) slow: rank 1 sleeps 2 x its measured compute every step, rank 0 never
    assert rank1[0]["slowed_steps"] == [0, 1, 2, 3] and rank0[0]["slowed_steps"] == []
    assert rank1[0]["slept_s"] == pytest.approx([2 * compute1] * 4)
    assert rank0[0]["slept_s"] == [0.0] * 4
    # (b) the noisy neighbour is on rank 1 only
    assert rank1[1]["neighbour"] and rank0[1]["neighbour"] is None
    # (c) random delays: each rank's slowed steps are its own seeded draws
    latency = phases[2].latency()
    for rank, record in ((0, rank0), (1, rank1)):
        assert record[2]["slowed_steps"] == [t for t in range(4) if latency.slowdown(rank, t) > 1]
    # (d) rank 1 dies at step 2 of the last phase: the run stops, rank 0 reports the broken collective
    assert not run.ok and "rank 1 died at step 2" in run.stopped
    assert rank1[3]["died_at"] == 2 and rank0[3]["error"]


@pytest.mark.slow
def test_each_straggler_slows_exactly_the_worker_it_names_in_sazd(ray_session):
    from sazd.bench.tp.sides import SazdSide, Workload

    work = Workload(model="mlp", hidden=(64, 64), dataset="synthetic", train_limit=256, batch_size=16,
                    warmup=1, iterations=3)
    phases = [SlowWorker(1, 3.0), NoisyNeighbour(1, 0.5), RandomDelays("calls", {"prob": 0.5, "factor": 2.0}),
              DeadWorker(1, 2)]
    slow, noisy, rand, dead = SazdSide("sazd", 3, 2).run(work, phases)
    assert set(slow.slowed) == {1} and slow.slowed[1] >= work.steps  # every call of worker 1, of none else
    assert noisy.neighbour and noisy.slowed == {}
    assert set(rand.slowed) <= {0, 1, 2} and sum(rand.slowed.values()) > 0
    assert dead.stopped is None and dead.repairs == 1 and len(dead.iteration_s) == work.iterations
    # the compute floor counts the workers alive throughout the measured iterations, each of which
    # applied 3 updates per iteration (fc1's row copy, fc2's row and column copies)
    assert slow.work["counted"] == [0, 1, 2] and {0, 2} <= set(dead.work["counted"])
    assert dead.work["updates"] == {j: 3 * work.iterations for j in dead.work["counted"]}


@pytest.mark.slow
def test_uncoded_sazd_stops_at_a_dead_worker_and_says_so(ray_session):
    from sazd.bench.tp.sides import SazdSide, Workload
    from sazd.stragglers import NoStraggler

    work = Workload(model="mlp", hidden=(64, 64), dataset="synthetic", train_limit=256, batch_size=16,
                    warmup=1, iterations=3)
    dead, after = SazdSide("uncoded", 2, 2).run(work, [DeadWorker(1, 2), NoStraggler()])
    assert dead.stopped.startswith("the run stopped") and after.stopped == "not reached"


def test_crossover_is_where_sazd_gets_faster():
    assert crossover([1, 2, 5, 10], [1.0, 2.0, 5.0, 10.0], [3.0, 3.0, 3.0, 3.0]) == pytest.approx(3.0)
    assert crossover([1, 2], [1.0, 2.0], [3.0, 4.0]) is None
    assert crossover([1, 2], [2.0, 2.0], [1.0, 1.0]) == 1
    assert crossover([1, 2], [None, 2.0], [1.0, 1.0]) == 2


@pytest.mark.slow
def test_quick_sweep_writes_json_markdown_and_plot(tmp_path, ray_session, capsys):
    out = tmp_path / "out"
    assert main(["bench", "tp", "--quick", "--profile", "--out", str(out)]) == 0
    result = json.loads((out / "tp-results.json").read_text())
    sides = {row["side"] for phase in result["phases"] for row in phase["rows"]}
    assert sides == {"TP k=2", "sazd(4,2)", "sazd uncoded"}
    assert [p["x"] for p in result["phases"] if p["sweep"] == "factor"] == [1.0, 4.0]
    assert set(result["sweeps"]["factor"]["crossover"]) == {"sazd(4,2)", "sazd uncoded"}
    assert result["sweeps"]["prob"]["x"] == [0.0, 0.5]  # starts from the run without a straggler
    for phase in result["phases"]:
        for row in phase["rows"]:
            assert row["p50_s"] > 0 and len(row["iteration_s"]) == 3 and row["stopped"] is None
            _assert_floor(row, result["cores"])
    slow = next(p for p in result["phases"] if p["straggler"]["kind"] == "slow")
    assert all(set(row["slowed"]) == {"1"} for row in slow["rows"])
    assert (out / "tp-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Crossover (factor)" in (out / "tp-report.md").read_text()
    printed = capsys.readouterr().out
    assert "waiting for workers" in printed  # --profile


def _assert_floor(row: dict, cores: int) -> None:
    """A row's compute floor is there, positive and consistent; sazd's counters' deterministic part:
    every worker alive throughout applied 3 updates per measured iteration (fc1's row copy, fc2's row
    and column copies: fc1's input gradient is never needed)."""
    compute, work = row["compute_per_iteration_s"], row["work"]
    assert compute > 0 and row["cores"] == cores >= 1
    assert row["floor_s"] == pytest.approx(compute / cores)
    assert row["over_floor"] == pytest.approx(row["p50_s"] / row["floor_s"])
    assert row["work_vs_tp"] > 0
    cpu = row["cpu_per_iteration_s"]
    assert cpu == work["cpu_s"] and row["cpu_vs_tp"] > 0
    if row["side"].startswith("TP"):
        assert row["work_vs_tp"] == 1.0 and row["cpu_vs_tp"] == 1.0
        assert len(work["ranks_s"]) == 2 and all(s > 0 for s in work["ranks_s"])
        assert compute == pytest.approx(sum(work["ranks_s"]))
        assert cpu >= compute  # a rank's process CPU over its step holds the step's own thread's
    else:
        assert work["counted"] == list(range(row["workers"]))
        assert work["updates"] == {str(j): 3 * len(row["iteration_s"]) for j in work["counted"]}
        assert work["workers_s"] > 0 and work["master_s"] > 0
        assert compute == pytest.approx(work["workers_s"] + work["master_s"])
        assert cpu > work["workers_s"]  # the workers' processes hold their compute threads, and the master


@pytest.mark.parametrize("flags, words", [
    (["--k", "0"], "--k"), (["--factors", "2,x"], "--factors"), (["--factors", "0.5"], "--factors"),
    (["--probs", "1.5"], "--probs"), (["--sides", "sazd+9"], "--sides"), (["--extras", "meteor"], "--extras"),
    (["--worker", "4"], "--worker"), (["--model", "gpt", "--gpt", "256,4,3"], "--gpt"),
    (["--model", "gpt", "--gpt", "256,four,4"], "--gpt"), (["--iterations", "0"], "--iterations"),
    (["--timeout", "0"], "--timeout"),
])
def test_bad_flags_one_line_exit_2(flags, words, capsys):
    assert main(["bench", "tp", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def test_out_refuses_links_and_files(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(["bench", "tp", "--out", str(link)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    (real / "tp-results.json").symlink_to(tmp_path / "elsewhere")
    assert main(["bench", "tp", "--out", str(real)]) == 2
    assert "tp-results.json" in capsys.readouterr().err
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["bench", "tp", "--out", str(afile)]) == 2
    assert not (tmp_path / "elsewhere").exists()


def test_launch_and_rank_refuse_nonsense(tmp_path):
    from sazd.bench.tp import rank

    with pytest.raises(ValueError, match="k must be"):
        launch(spec_of("mlp"), 0)
    assert rank.main([]) == 2
    assert rank.main(["a", "b"]) == 2


@pytest.mark.slow
def test_a_rank_that_cannot_start_is_reported_not_waited_for():
    run = launch({**spec_of("mlp"), "model": "resnet9000"}, 2, timeout_s=120, grace_s=5)
    assert not run.ok and "exited with" in run.stopped and "resnet9000" in run.stopped
    assert all(code not in (None, 0) for code in run.exit_codes)


def test_cli_lists_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "tp" in capsys.readouterr().out
