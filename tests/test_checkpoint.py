"""Checkpoints: resuming continues exactly like an uninterrupted run; damaged checkpoints are refused."""

from __future__ import annotations

import argparse
import json
import os
import signal

import pytest
import torch

from _support import digits_config
from sazd.parallel import plain_state_dict
from sazd.train import checkpoint, cli
from sazd.train.checkpoint import CheckpointError
from sazd.train.optim import OptimConfig
from sazd.train.trainer import TrainConfig, Trainer

ALL = {"fc1": "coded", "fc2": "coded", "fc3": "coded"}
SGD = OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="cosine")


def config(**kw) -> TrainConfig:
    return digits_config(**{"optim": SGD, "epochs": 2, **kw})


def train(cfg, digits, callbacks=None):
    with Trainer(cfg, data=digits, callbacks=callbacks) as tr:
        report = tr.train()
        return plain_state_dict(tr.model), report, tr


ADAM = OptimConfig(name="adam", lr=0.01, weight_decay=0.1)


@pytest.mark.parametrize(("scheme", "optim"), [("deu", SGD), ("naive", SGD), ("naive", ADAM)])
def test_resume_continues_exactly_like_an_uninterrupted_run(scheme, optim, digits, tmp_path):
    # 44 steps = 2 epochs of 22; the break at step 15 sits mid-epoch, mid-cosine, with momentum built up
    whole, _, _ = train(config(scheme=scheme, optim=optim), digits)
    first = config(scheme=scheme, optim=optim, max_steps=15, checkpoint_every=15, run_dir=str(tmp_path / "a"))
    train(first, digits)
    saved = checkpoint.load(tmp_path / "a")
    assert saved.position == {"epoch": 0, "batch": 15, "iteration": 15}
    resumed, report, tr = train(config(scheme=scheme, optim=optim, resume=str(tmp_path / "a")), digits)
    assert tr.position.iteration == 44 and report["iterations"] == 29
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name


def test_resume_with_random_stragglers_follows_the_same_schedule(digits, tmp_path):
    """Random stragglers and a non-systematic code (every round decodes): the checkpoint holds the
    cluster's schedule (task numbers, simulated clock) and the blocks of the k workers that answered
    it, so the resumed run asks and decodes from the same workers, iteration by iteration. The other
    workers' blocks are rebuilt from the plain weights: where a later round decodes from them, the
    weights agree to rounding (float64), not bit for bit."""
    kw = dict(scheme="deu", latency="shiftexp:1.0", code_options={"systematic": False}, base_time_s=1000.0)
    whole, _, uninterrupted = train(config(**kw), digits)
    train(config(**kw, max_steps=10, checkpoint_every=10, run_dir=str(tmp_path / "a")), digits)
    resumed, _, tr = train(config(**kw, resume=str(tmp_path / "a")), digits)
    for key in ("rows_decoded", "rows_encoded", "rounds", "bytes_to_workers", "bytes_from_workers"):
        assert [r[key] for r in tr.history] == [r[key] for r in uninterrupted.history[10:]], key
    assert tr.cluster.schedule_state()["tasks"] == uninterrupted.cluster.schedule_state()["tasks"]
    for name, tensor in whole.items():
        assert torch.allclose(resumed[name], tensor, rtol=0, atol=1e-12 * float(tensor.abs().max())), name


def test_damaged_checkpoints_are_refused(digits, tmp_path):
    train(config(max_steps=3, checkpoint_every=3, run_dir=str(tmp_path / "run")), digits)
    ckpt = tmp_path / "run" / "checkpoint"
    assert checkpoint.load(ckpt).position["iteration"] == 3
    tensors = ckpt / checkpoint.TENSORS
    good = tensors.read_bytes()

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    tensors.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors is corrupt or truncated"):
        checkpoint.load(ckpt)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):  # and the trainer refuses it too
        Trainer(config(resume=str(ckpt)), data=digits)

    tensors.write_bytes(good[: len(good) - 100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(ckpt)

    tensors.write_bytes(good)
    meta = ckpt / checkpoint.META
    meta.write_text(meta.read_text().replace('"iteration": 3', '"iteration": 2'))
    with pytest.raises(CheckpointError, match=r"meta\.json is corrupt"):
        checkpoint.load(ckpt)

    (ckpt / checkpoint.SUMS).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.load(ckpt)
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        checkpoint.load(tmp_path / "elsewhere")


def test_resume_refuses_changed_settings(digits, tmp_path):
    train(config(max_steps=3, checkpoint_every=3, run_dir=str(tmp_path / "run")), digits)
    changed = config(resume=str(tmp_path / "run"), optim=OptimConfig(lr=0.5, momentum=0.9))
    with pytest.raises(ValueError, match=r"settings differ from the checkpoint's.*optim"):
        Trainer(changed, data=digits)


def test_ctrl_c_finishes_the_iteration_and_saves(digits, tmp_path):
    def interrupt(tr):
        if tr.position.iteration == 4:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # the default, or ignored in a shell's background job
    cfg = config(run_dir=str(tmp_path / "run"), checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, digits, callbacks=[interrupt])
    assert checkpoint.load(tmp_path / "run").position["iteration"] == 4
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_cli_resume(digits, tmp_path, capsys):
    def run(argv):
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        return cli.run(parser.parse_args(argv))

    common = ["--dataset", "digits", "--hidden", "16,16", "--min-features", "8", "--backend", "inproc",
              "--batch-size", "64", "--no-progress"]
    run_dir, out = str(tmp_path / "r"), str(tmp_path / "out.json")
    assert run([*common, "--max-steps", "4", "--checkpoint-every", "2", "--run-dir", run_dir]) == 0
    assert run(["--resume", run_dir, "--max-steps", "7", "--json", out, "--no-progress"]) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["position"]["iteration"] == 7 and report["iterations"] == 3
    assert run(["--resume", str(tmp_path / "r"), "--lr", "0.3"]) == 2
    assert "settings differ" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_frozen_ray_worker_does_not_hold_up_a_checkpoint(digits, tmp_path, ray_session):
    """Worker 0 freezes mid-run (each call now sleeps a million times its compute time, far past the
    test's timeout, while the worker timeout is longer still): the checkpoints after it are taken from
    the first k=4 answers, so the run ends and its checkpoint holds the others' blocks."""
    from sazd.runtime.ray_backend import RayCluster

    cluster = RayCluster(6, worker_timeout_s=3600, max_backlog=None)
    try:
        def freeze(tr):
            if tr.position.iteration == 1:
                tr.cluster.wait_all(tr.cluster.submit("set_delay", (1e6,), [0]))

        cfg = config(backend="ray", base_time_s=None, max_steps=4, checkpoint_every=2,
                     run_dir=str(tmp_path / "run"))
        with Trainer(cfg, cluster=cluster, data=digits, callbacks=[freeze]) as tr:
            tr.train()
            assert 0 in tr.cluster.alive()  # not declared dead: it is only silent
        saved = checkpoint.load(tmp_path / "run")
        assert saved.position["iteration"] == 4
        workers = {int(key.split("/")[0]) for key in saved.coded}
        assert len(workers) == 4 and 0 not in workers
    finally:
        cluster.close()
