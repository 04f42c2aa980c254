"""Every way a run ends leaves it resumable, and resuming continues bit for bit: with every latency
model, straggler setting and fault schedule (the cluster's schedule is part of the checkpoint), after
SIGINT/SIGTERM, an error or lost workers; and a crash at any step of a save keeps a loadable one."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _support import digits_config, small_disk
from sazd.parallel import plain_state_dict
from sazd.runtime.cluster import ClusterError
from sazd.train import checkpoint, cli
from sazd.train.checkpoint import CheckpointError
from sazd.train.optim import OptimConfig
from sazd.train.trainer import Trainer

SGD = OptimConfig(lr=0.1, momentum=0.9, nesterov=True)
# A long constant task time: the simulated schedule (who answers first) does not depend on how long the
# master's own work took in wall time, so two runs compare bit for bit.
BASE = dict(optim=SGD, epochs=1, max_steps=12, base_time_s=1000.0)


def config(**kw):
    return digits_config(**{**BASE, **kw})


def train(cfg, digits, callbacks=None):
    with Trainer(cfg, data=digits, callbacks=callbacks) as tr:
        report = tr.train()
        return plain_state_dict(tr.model), report, tr


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name


SCHEDULES = {
    "fixed stragglers": dict(stragglers=2, straggler_delay=5.0),
    "shifted exponential": dict(latency="shiftexp:1.0", code_options={"systematic": False}),
    "dead worker fault, repaired": dict(latency="dead:1:7"),
    "all at once, with a network": dict(latency="shiftexp:2.0:1.5+dead:4:9", stragglers=1, network_gbps=1.0),
    "naive, stragglers": dict(scheme="naive", stragglers=2),
}
# The schedule is decided by deterministic counters (task numbers, the simulated clock of a constant
# task time), never by the master's wall time: these must agree iteration by iteration.
COUNTERS = ("rows_decoded", "rows_encoded", "rounds", "bytes_to_workers", "bytes_from_workers",
            "bytes_sent_once")


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_resume_follows_the_uninterrupted_schedule_with_every_latency_model(schedule, digits, tmp_path):
    """Two epochs (44 iterations) broken at 5: the same workers asked and decoded from, the same
    traffic, every iteration; a fault fires once in all. Weights: bit for bit, or (DEU, where a later
    round decodes from a worker whose blocks the checkpoint rebuilt from the plain weights) to rounding."""
    kw = {**SCHEDULES[schedule], "epochs": 2}
    whole, report, uninterrupted = train(config(**kw, max_steps=None), digits)
    _, first, _ = train(config(**kw, max_steps=5, run_dir=str(tmp_path / "a")), digits)
    resumed, second, tr = train(config(**kw, max_steps=None, resume=str(tmp_path / "a")), digits)
    assert tr.position.iteration == 44
    for key in COUNTERS:
        assert [r[key] for r in tr.history] == [r[key] for r in uninterrupted.history[5:]], key
    assert tr.cluster.schedule_state()["tasks"] == uninterrupted.cluster.schedule_state()["tasks"]
    assert len(first["repairs"]) + len(second["repairs"]) == len(report["repairs"])
    if "dead" in kw.get("latency", ""):
        assert report["repairs"], "the fault was injected"
    if kw.get("scheme") == "naive":  # the master holds the weights: nothing is rebuilt
        assert_same_weights(whole, resumed)
    assert_close_weights(whole, resumed)


def assert_close_weights(a: dict, b: dict) -> None:
    for name, tensor in a.items():
        assert torch.allclose(b[name], tensor, rtol=0, atol=1e-12 * float(tensor.abs().max())), name


class Crash(Exception):
    pass


STEPS = ("_mkdir", "_write", "_fsync", "_rename", "_remove")


def test_a_crash_at_any_step_of_a_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    def ckpt(value: float) -> checkpoint.Checkpoint:
        meta = {"run_id": "r1", "position": {"epoch": 0, "batch": int(value), "iteration": int(value)}}
        return checkpoint.Checkpoint(
            model={"w": torch.full((3, 2), value)}, optim={}, meta=meta, rng=torch.zeros(4, dtype=torch.uint8)
        )

    def counting(fail_at: int | None) -> list[str]:
        calls: list[str] = []
        for name in STEPS:
            real = getattr(checkpoint, name)

            def step(*args, _real=real, _name=name):
                calls.append(_name)
                if len(calls) - 1 == fail_at:
                    raise Crash(_name)
                return _real(*args)

            monkeypatch.setattr(checkpoint, name, step)
        return calls

    def loadable(path: Path) -> float:
        found = checkpoint.find(path)
        checkpoint._verify(found)
        from safetensors.torch import load_file

        return float(load_file(str(found / checkpoint.TENSORS))["model/w"][0, 0])

    # how many file-system steps a replacing save takes
    path = tmp_path / "probe" / "checkpoint"
    checkpoint.save(path, ckpt(1.0))
    calls = counting(None)
    checkpoint.save(path, ckpt(2.0))
    total = len(calls)
    monkeypatch.undo()
    assert total >= 12 and calls.count("_rename") == 2 and calls.count("_fsync") >= 5

    for fail_at in range(total):
        path = tmp_path / f"crash{fail_at}" / "checkpoint"
        checkpoint.save(path, ckpt(1.0))
        counting(fail_at)
        with pytest.raises(Crash):
            checkpoint.save(path, ckpt(2.0))
        monkeypatch.undo()
        assert loadable(path.parent) in (1.0, 2.0), fail_at  # the old or the new one, whole
        checkpoint.save(path, ckpt(3.0))  # and the next save cleans up and succeeds
        assert loadable(path.parent) == 3.0
        assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint"]


def test_sigterm_and_sigint_in_training_save_a_checkpoint_and_resume_exactly(digits, tmp_path):
    whole, _, _ = train(config(), digits)
    for sig, at in ((signal.SIGTERM, 3), (signal.SIGINT, 7)):

        def send(tr, sig=sig, at=at):
            if tr.position.iteration == at:
                os.kill(os.getpid(), sig)

        previous = signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            train(config(run_dir=str(tmp_path / "run"), overwrite=sig == signal.SIGINT), digits, [send])
        assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
        assert checkpoint.load(tmp_path / "run").position["iteration"] == at
        report = json.loads((tmp_path / "run" / "report.json").read_text())
        assert (
            report["status"] == "interrupted"
            and f"--resume {tmp_path / 'run' / 'checkpoint'}" in report["ending"]
        )
        resumed, _, _ = train(config(resume=str(tmp_path / "run")), digits)
        assert_same_weights(whole, resumed)


def test_an_error_after_training_began_leaves_a_checkpoint_and_a_report(digits, tmp_path):
    whole, _, _ = train(config(), digits)

    def boom(tr):
        if tr.position.iteration == 6:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        train(config(run_dir=str(tmp_path / "run")), digits, [boom])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed" and "disk on fire" in report["error"]
    assert "Saved a checkpoint at iteration 6" in report["ending"]
    resumed, _, _ = train(config(resume=str(tmp_path / "run")), digits)
    assert_same_weights(whole, resumed)


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_losing_more_than_n_minus_k_without_checkpoint_every_still_resumes(scheme, digits, tmp_path):
    """Three of six workers die at once and no --checkpoint-every was given: naive still holds the
    weights and saves them at the failure; DEU's weights live on the workers, so the checkpoint of the
    run's start remains. Either resumes, with the workers back, exactly like an uninterrupted run."""
    whole, _, _ = train(config(scheme=scheme), digits)

    def kill_three(tr):
        if tr.position.iteration == 4:
            for j in (0, 2, 5):
                tr.cluster.kill(j)

    with pytest.raises(ClusterError, match="workers alive") as info:
        train(config(scheme=scheme, run_dir=str(tmp_path / "run"), repair=False), digits, [kill_three])
    saved_at = {"naive": 4, "deu": 0}[scheme]
    assert checkpoint.load(tmp_path / "run").position["iteration"] == saved_at
    assert f"--resume {tmp_path / 'run' / 'checkpoint'}" in str(info.value)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["status"] == "failed"
    resumed, _, tr = train(config(scheme=scheme, resume=str(tmp_path / "run"), repair=False), digits)
    assert_same_weights(whole, resumed)
    assert tr.cluster.alive() == list(range(6))


def test_cli_sigterm_exits_143_with_a_checkpoint_report_and_exact_resume(tmp_path):
    run_dir = tmp_path / "run"
    flags = [
        "--dataset",
        "digits",
        "--hidden",
        "24,18",
        "--min-features",
        "8",
        "--backend",
        "inproc",
        "--batch-size",
        "64",
        "--dtype",
        "float64",
        "--base-time",
        "1000",
        "--lr",
        "0.1",
        "--no-progress",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sazd", "train", *flags, "--epochs", "50", "--run-dir", str(run_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"kind": "iteration"' in metrics.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.count("\n") == 1 and "stopped by signal 15" in err and "--resume" in err, err
    stopped = checkpoint.load(run_dir).position["iteration"]
    assert stopped >= 1
    assert json.loads((run_dir / "report.json").read_text())["status"] == "interrupted"

    from sazd.cli import main

    assert main(["train", "--resume", str(run_dir), "--max-steps", str(stopped + 3), "--no-progress"]) == 0
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [*flags, "--epochs", "50", "--max-steps", str(stopped + 3), "--run-dir", str(tmp_path / "whole")]
    )
    # the same settings, uninterrupted (the data loaded as the CLI loads it: pixel statistics summed
    # with this process's thread count, like the resumed run's)
    whole, _, _ = train(cli.config_from_args(args), None)
    assert_same_weights(whole, checkpoint.load(run_dir).model)


# ---- checkpoints cannot lie ---------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["deu", "naive"])
def test_resumes_of_0_1_and_n_iterations_each_leave_a_complete_checkpoint(scheme, digits, tmp_path):
    """A resume that runs no iteration must not drop anything (it once lost the first layer's DEU
    momentum, and every later resume was refused); each checkpoint on the way is complete."""
    run = str(tmp_path / "run")
    whole, _, _ = train(config(scheme=scheme, max_steps=9), digits)
    train(config(scheme=scheme, max_steps=3, run_dir=run), digits)
    with Trainer(config(scheme=scheme, max_steps=3, resume=run), data=digits) as tr:
        fresh = tr.save_checkpoint(tmp_path / "taken-right-after-the-restore")
    assert checkpoint.load(fresh).optim.keys() == checkpoint.load(run).optim.keys()
    for stop in (3, 4, 4, 8, 8, 9, 9):  # 0, 1, 0, n, 0, 1, 0 iterations
        _, _, tr = train(config(scheme=scheme, max_steps=stop, resume=run), digits)
        saved = checkpoint.load(run)
        assert saved.position["iteration"] == stop == tr.position.iteration
        momentum = {key for key in saved.optim if key.endswith("/momentum_buffer")}
        assert momentum == {f"{name}/momentum_buffer" for name in saved.model}, stop  # every parameter
    resumed = checkpoint.load(run).model
    if scheme == "naive":
        assert_same_weights(whole, resumed)
    assert_close_weights(whole, resumed)


def _edit(path: Path, edit) -> None:
    """Change a checkpoint's tensors and write it back with valid checksums (as an attacker could)."""
    ckpt = checkpoint.load(path)
    edit(ckpt)
    checkpoint.save(checkpoint.find(path), ckpt)


def test_an_edited_coded_block_is_refused_naming_the_worker_and_the_block(digits, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(scheme="deu", max_steps=3, run_dir=str(run)), digits)
    blocks = checkpoint.load(run).coded
    parity = max(int(key.split("/")[0]) for key in blocks)  # sazd(6, 4): workers 4, 5 hold parity

    def plus_one(ckpt):
        ckpt.coded[f"{parity}/fc2.row"][0, 0] += 1.0

    _edit(run, plus_one)
    with pytest.raises(CheckpointError, match=rf"block fc2\.row of worker {parity} does not encode the "
                                              "checkpoint's plain weights"):
        Trainer(config(scheme="deu", resume=str(run)), data=digits)

    from sazd.cli import main

    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"worker {parity}" in err

    def stranger(ckpt):
        ckpt.coded[f"{parity}/fc2.row"][0, 0] -= 1.0
        ckpt.coded["9/fc2.row"] = ckpt.coded[f"{parity}/fc2.row"].clone()

    _edit(run, stranger)
    with pytest.raises(CheckpointError, match=r"names no worker of 0\.\.5"):
        Trainer(config(scheme="deu", resume=str(run)), data=digits)


def test_a_checkpoint_asks_only_k_workers_so_a_frozen_one_does_not_hold_it(digits, tmp_path):
    """Worker 0 takes a million times longer than the others: a checkpoint keeps the blocks of the first
    k=4 that answered, leaves worker 0 out, and resumes with worker 0 rebuilt from the plain weights."""
    kw = dict(scheme="deu", stragglers=1, straggler_delay=1e6, max_steps=4)
    whole, _, _ = train(config(**kw), digits)
    train(config(**{**kw, "max_steps": 2}, run_dir=str(tmp_path / "run")), digits)
    workers = {int(key.split("/")[0]) for key in checkpoint.load(tmp_path / "run").coded}
    assert len(workers) == 4 and 0 not in workers
    resumed, _, _ = train(config(**kw, resume=str(tmp_path / "run")), digits)
    assert_close_weights(whole, resumed)


def test_a_link_in_a_resumed_run_directory_is_never_written_through(digits, tmp_path):
    run = tmp_path / "run"
    train(config(max_steps=2, run_dir=str(run)), digits)
    victim = tmp_path / "users_file.txt"
    victim.write_text("precious\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(ValueError, match=r"holds a link sazd did not make \(metrics\.jsonl\)"):
        train(config(max_steps=4, resume=str(run)), digits)
    assert victim.read_text() == "precious\n"


def test_one_process_at_a_time_owns_a_run_directory(digits, tmp_path, capfd):
    run = tmp_path / "run"
    train(config(max_steps=2, run_dir=str(run)), digits)
    with (Trainer(config(max_steps=3, resume=str(run)), data=digits),
          pytest.raises(ValueError, match=f"--run-dir {run} is in use by process {os.getpid()}")):
        Trainer(config(max_steps=3, resume=str(run)), data=digits)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    (run / ".sazd.lock").write_text(f"{dead.pid}\n")  # left by a run that was killed
    _, report, _ = train(config(max_steps=3, resume=str(run)), digits)
    assert report["iterations"] == 1
    assert f"was locked by process {dead.pid}, which is no longer running; taking the lock over" in \
        capfd.readouterr().err


@pytest.fixture
def tiny_disk(tmp_path):
    """A 200 KiB tmpfs: room for one checkpoint of the digits MLP (130 KB), not for two."""
    with small_disk(tmp_path, "200k") as mount:
        yield mount


def test_a_full_disk_names_the_last_good_checkpoint_and_still_writes_the_report(digits, tiny_disk):
    from sazd.files import DiskFullError

    run = tiny_disk / "run"
    with pytest.raises(DiskFullError, match=r"no space left on the device holding .*checkpoint while "
                                            r"writing a checkpoint; the checkpoint in .* was left as it was"):
        train(config(max_steps=6, checkpoint_every=2, run_dir=str(run)), digits)
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "failed" and "no space left" in report["error"]
    latest = f"the latest one (iteration 0) can be resumed with --resume {run / 'checkpoint'}"
    assert latest in report["ending"]
    assert checkpoint.load(run).position["iteration"] == 0  # and it is whole

    # resumed, the checkpoint it started from is the last good one (not "none was saved")
    with pytest.raises(DiskFullError):
        train(config(max_steps=6, checkpoint_every=2, resume=str(run)), digits)
    report = json.loads((run / "report.json").read_text())
    latest = f"the latest one (iteration 0) can be resumed with --resume {run / 'checkpoint'}"
    assert latest in report["ending"]
