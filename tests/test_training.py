"""The trainer end to end on scikit-learn's digits: equal to plain PyTorch, traffic equal to the
traffic formula, repair, clear errors before training, and the `sazd train` command."""

from __future__ import annotations

import argparse
import json
import math
import warnings

import pytest
import torch

from _support import digits_config
from sazd.codes import DecodeError, UnstableDecodeWarning
from sazd.parallel import plain_state_dict, predicted_traffic
from sazd.runtime.cluster import Broadcast, ClusterError
from sazd.train import checkpoint, cli
from sazd.train import trainer as trainer_module
from sazd.train.optim import OptimConfig, lr_at
from sazd.train.reference import reference_run, relative_weight_error
from sazd.train.trainer import TrainConfig, Trainer

ALL = {"fc1": "coded", "fc2": "coded", "fc3": "coded"}
SGD = OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="cosine", clip_norm=2.0)


def config(**kw) -> TrainConfig:
    return digits_config(**{"optim": SGD, "max_steps": 30, "epochs": 3, **kw})


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_trainer_matches_plain_pytorch_and_writes_a_run_dir(scheme, digits, tmp_path):
    # 30 steps of 22 per epoch: crosses an epoch boundary (a new batch order, an evaluation)
    cfg = config(scheme=scheme, code="sazd", n=6, k=4, latency="shiftexp:1.0", run_dir=str(tmp_path / "run"))
    with Trainer(cfg, data=digits) as tr:
        report = tr.train()
        err = relative_weight_error(plain_state_dict(tr.model), reference_run(cfg, tr.data, 30))
    assert err < 1e-9
    assert report["iterations"] == 30 and report["position"] == {"epoch": 1, "batch": 8, "iteration": 30}
    assert 0.3 < report["test_accuracy"] <= 1.0  # well above chance (0.1)
    for key in ("bytes_to_workers", "bytes_from_workers", "mean_iteration_s", "rows_encoded", "rows_decoded"):
        assert report[key] > 0, key
    assert set(report["phases_s"]) == {"encode_s", "decode_s", "worker_s", "update_s", "master_other_s"}
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "report.json", "loss.png", "accuracy.png"):
        assert (run / name).is_file(), name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "iteration" for r in lines) == 30
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == [0]
    assert json.loads((run / "report.json").read_text())["iterations"] == 30


def test_trainer_cnn_matches_plain_pytorch(digits):
    cfg = config(model="cnn", hidden=(16,), plan={"conv1": "coded", "conv2": "coded", "fc1": "coded"},
                 scheme="deu", code="sazd", n=5, k=3, latency="shiftexp:1.0", max_steps=6,
                 optim=OptimConfig(lr=0.05, momentum=0.9))
    with Trainer(cfg, data=digits) as tr:
        tr.train()
        assert relative_weight_error(plain_state_dict(tr.model), reference_run(cfg, tr.data, 6)) < 1e-9


@pytest.mark.parametrize("scheme", ["naive", "deu"])
@pytest.mark.parametrize("code", ["sazd", "poly"])
def test_bytes_per_iteration_equal_the_formula(scheme, code, digits):
    """No stragglers and a constant task time: every worker is asked every round and the first k
    answers hold r rows each, which is what the formula assumes; then it is exact."""
    cfg = config(scheme=scheme, code=code, n=6, k=4, max_steps=5)
    with Trainer(cfg, data=digits) as tr:
        report = tr.train()
        want = predicted_traffic(tr.model)
    assert want == report["formula_bytes_per_iteration"][scheme]
    for rec in tr.history:
        assert rec["bytes_to_workers"] == want["bytes_to_workers"]
        assert rec["bytes_from_workers"] == want["bytes_from_workers"]


def test_deu_sends_fewer_bytes_than_naive_on_wide_layers(digits):
    """Naive ships (n/k)*2*out*in per layer, DEU about 4*n*N*width: at width 512, batch 16 DEU wins."""
    measured = {}
    for scheme in ("naive", "deu"):
        cfg = config(scheme=scheme, hidden=(512, 512), batch_size=16, max_steps=3)
        with Trainer(cfg, data=digits) as tr:
            measured[scheme] = tr.train()["bytes_to_workers_per_iteration"]
    assert measured["naive"] > 2 * measured["deu"]


def test_dead_workers_are_repaired_and_training_stays_exact(digits):
    cfg = config(scheme="deu", code="sazd", n=6, k=4, code_options={"systematic": False},
                 latency="dead:1,4:40")
    with Trainer(cfg, data=digits) as tr:
        report = tr.train()
        err = relative_weight_error(plain_state_dict(tr.model), reference_run(cfg, tr.data, 30))
    assert err < 1e-9
    assert sorted(r["worker"] for r in report["repairs"]) == [1, 4]
    assert report["cluster"]["respawns"] == 2


def test_fewer_than_k_workers_give_a_clear_error_and_a_checkpoint(digits, tmp_path):
    cfg = config(scheme="deu", code="sazd", n=6, k=4, repair=False, run_dir=str(tmp_path / "run"),
                 latency="dead:0:30+dead:1:80+dead:2:130", max_steps=200, epochs=20)
    with Trainer(cfg, data=digits) as tr, pytest.raises(ClusterError, match=r"--resume \S+checkpoint"):
        tr.train()
    saved = checkpoint.load(tmp_path / "run")
    assert 0 < saved.position["iteration"] < 200
    assert set(saved.model) == {f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}


def test_bad_settings_fail_before_any_worker_starts(digits, monkeypatch):
    def no_cluster(cfg):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(trainer_module, "make_cluster", no_cluster)
    cases = [
        (dict(scheme="deu", optim=OptimConfig(name="adam")), "cannot run with scheme 'deu'"),
        (dict(n=3, k=4), "n must be >= k"),
        (dict(plan={"fc1": "coded", "fc7": "coded"}), "'fc7'"),
        (dict(plan={"relu1": "coded"}), "ReLU"),
        (dict(stragglers=9), "stragglers must be in"),
        (dict(checkpoint_every=5), "--checkpoint-every needs"),
        (dict(code="poly", code_options={"shift_unit": 2}), "unknown option 'shift_unit'"),
        (dict(optim=OptimConfig(momentum=0.0, nesterov=True)), "nesterov needs momentum"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            Trainer(config(**kw), data=digits)


def test_lr_schedules_equal_torch_schedulers():
    p = torch.nn.Parameter(torch.zeros(1))
    for cfg, make in (
        (OptimConfig(lr=0.1, schedule="step", step_size=3, gamma=0.5),
         lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)),
        (OptimConfig(lr=0.1, schedule="cosine", total_steps=10, min_lr=0.01),
         lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)),
    ):
        opt = torch.optim.SGD([p], lr=0.1)
        sched = make(opt)
        for step in range(11):  # past total_steps torch's cosine climbs again; ours stays at min_lr
            assert math.isclose(lr_at(cfg, step), opt.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15)
            opt.step()
            sched.step()


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def test_cli_trains_and_prints_bytes_naive_vs_deu(tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = run_cli(["--dataset", "digits", "--hidden", "32,32", "--min-features", "8", "--backend", "inproc",
                  "--n", "5", "--k", "3", "--stragglers", "1", "--batch-size", "64", "--max-steps", "8",
                  "--dtype", "float64", "--check", "--run-dir", str(tmp_path / "run"), "--json", str(out),
                  "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    for key in ("test_accuracy", "iterations", "bytes_to_workers", "bytes_from_workers", "mean_iteration_s",
                "phases_s"):
        assert key in report
    assert report["iterations"] == 8 and report["check_max_relative_weight_error"] < 1e-9
    printed = capsys.readouterr().out
    assert "formula naive" in printed and "deu" in printed and "test accuracy" in printed


def test_cli_errors_exit_2_with_one_line(capsys):
    for argv, message in ((["--optimizer", "adam"], "cannot run with scheme 'deu'"),
                          (["--n", "3", "--k", "4"], "n must be >= k"),
                          (["--plan", "fc9"], "fc9")):
        assert run_cli(["--dataset", "digits", "--backend", "inproc", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize(("scheme", "code"), [("naive", "poly"), ("deu", "sazd")])
def test_ray_backend_matches_plain_pytorch(scheme, code, digits, ray_session):
    cfg = config(scheme=scheme, code=code, n=5, k=3, backend="ray", stragglers=1, straggler_delay=3.0,
                 max_steps=10, base_time_s=None)
    with Trainer(cfg, data=digits) as tr:
        report = tr.train()
        err = relative_weight_error(plain_state_dict(tr.model), reference_run(cfg, tr.data, 10))
    assert err < 1e-9
    assert report["iterations"] == 10 and report["cluster"]["late_results_discarded"] > 0


@pytest.mark.parametrize(("backend", "flag"), [
    ("ray", {"network_gbps": 10.0}), ("ray", {"base_time_s": 0.01}),
    ("inproc", {"address": "127.0.0.1:6379"}), ("inproc", {"gpus_per_worker": 1.0})])
def test_a_flag_of_the_other_backend_is_an_error(backend, flag):
    (name,) = flag
    flag_name = {"base_time_s": "base-time"}.get(name, name.replace("_", "-"))
    message = f"--{flag_name} applies to --backend .* only; this run uses --backend {backend}"
    with pytest.raises(ValueError, match=message):
        TrainConfig(backend=backend, **flag).validate()


def test_deu_checkpoint_is_one_round_of_the_workers(digits, tmp_path):
    cfg = config(scheme="deu", max_steps=2, plan=ALL, checkpoint_dir=str(tmp_path / "ckpt"))
    with Trainer(cfg, data=digits) as tr:
        tr.train()
        rounds = tr.cluster.counters.rounds
        tr.save_checkpoint()
        assert tr.cluster.counters.rounds == rounds + 1  # weights, both copies and momentum at once


def test_half_precision_worker_products_are_certified_as_such_and_decoded_in_float32(digits):
    """Workers multiply in bfloat16 and answer in bfloat16; the master decodes in float32 (the product
    it hands on is float32) and certifies each worker set at bfloat16's precision, so a code that is
    hopeless there, though fine on float32 products, is refused."""
    cfg = config(dtype="float32", compute_dtype="bfloat16", max_steps=3, epochs=1, show_progress=False)
    with Trainer(cfg, data=digits) as tr:
        x = digits.train_x[:8].float()
        answers = tr.cluster.compute("matmul", Broadcast(("fc1.row", x.reshape(8, -1).T.contiguous())), 4)
        assert {t.dtype for t in answers.results.values()} == {torch.bfloat16}
        assert tr.model(x).dtype == torch.float32
        report = tr.train()
    plain = reference_run(tr.cfg, tr.data, 3)  # plain PyTorch in float32
    error = relative_weight_error(plain_state_dict(tr.model), plain)
    assert 0 < error < 5e-2, error  # bf16 products: not float32's answer, but close to it
    assert math.isfinite(report["train_loss"])
    # Chebyshev Poly, k = 8, non-systematic: fine on float32 products, hopeless on bfloat16 ones
    poly = dict(dtype="float32", code="poly", n=10, k=8, max_steps=2, epochs=1, hidden=(32, 32),
                code_options={"nodes": "chebyshev", "systematic": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableDecodeWarning)
        with Trainer(config(**poly), data=digits) as tr:
            tr.train()
    with pytest.raises(DecodeError, match="bfloat16"), Trainer(config(**poly, compute_dtype="bfloat16"),
                                                               data=digits) as tr:
        tr.train()
