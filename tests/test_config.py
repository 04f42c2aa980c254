"""The run configuration: every setting declared once, the `sazd train` flags, help and choices derived
from the declarations, validation once with messages naming the flag, and hostile command lines
(bad addresses, unwritable --json) refused with exit 2 before any training."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from sazd.cli import build_parser, main
from sazd.train import config
from sazd.train.config import OptimConfig, TrainConfig

SRC = str(Path(__file__).parents[1] / "src")


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_every_field_with_a_flag_is_on_the_parser_with_its_declared_default():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["sazd"].flag != "":
            assert f.name in dests, f.name
    assert {"optim.lr", "optim.name", "optim.clip_norm", "code_options.shift_unit"} <= dests
    cfg = config.from_flags(parse([]))
    assert cfg == TrainConfig()  # nothing given: exactly the declared defaults
    assert cfg.n == cfg.k + 2


def test_flags_set_nested_settings_and_n_follows_k():
    cfg = config.from_flags(parse(["--k", "5", "--lr", "0.2", "--optimizer", "adam", "--scheme", "naive",
                                   "--non-systematic", "--shift-unit", "auto", "--no-repair", "--no-progress",
                                   "--hidden", "8,4", "--plan", "fc1,fc2", "--backend", "inproc",
                                   "--base-time", "0.5"]))
    assert (cfg.k, cfg.n) == (5, 7)
    assert cfg.optim == dataclasses.replace(OptimConfig(), lr=0.2, name="adam")
    assert cfg.code_options == {"systematic": False, "shift_unit": "auto"}
    assert cfg.repair is False and cfg.show_progress is False and cfg.hidden == (8, 4)
    assert cfg.plan == {"fc1": "coded", "fc2": "coded"} and cfg.base_time_s == 0.5
    assert config.from_flags(parse(["--code", "uncoded", "--k", "3"])).n == 3


def test_resume_keeps_the_saved_settings_and_applies_only_the_given_flags():
    saved = TrainConfig(backend="inproc", k=3, n=5, base_time_s=1.0, run_dir="old", optim=OptimConfig(lr=0.3))
    cfg = config.from_flags(parse(["--max-steps", "9", "--momentum", "0.5"]), saved)
    assert (cfg.k, cfg.n, cfg.optim.lr, cfg.optim.momentum, cfg.max_steps) == (3, 5, 0.3, 0.5, 9)
    assert cfg.run_dir is None  # paths come from the command line only, never from the checkpoint
    moved = config.from_flags(parse(["--backend", "ray"]), saved)
    assert moved.backend == "ray" and moved.base_time_s is None  # the old backend's options lapse


def test_help_lists_the_choices_of_their_owners(capsys):
    from sazd.models import MODELS
    from sazd.parallel import SCHEMES
    from sazd.runtime import BACKENDS

    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for names in (MODELS, SCHEMES, BACKENDS):
        assert ", ".join(names) in text
    assert "--tls [DIR]" in text and "--worker-timeout" in text and "(default 0.05)" in text


def test_sazd_help_imports_no_torch():
    code = "import sys; from sazd.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(("kw", "message"), [
    (dict(model="vgg"), r"--model must be one of \['mlp'"),
    (dict(scheme="fast"), r"--scheme must be one of"),
    (dict(backend="slurm"), r"--backend must be one of"),
    (dict(dtype="float16"), r"--dtype must be one of \['float32', 'float64'\]"),
    (dict(batch_size=0), r"--batch-size must be >= 1"),
    (dict(epochs=1.5), r"--epochs must be an integer"),
    (dict(straggler_delay=float("nan")), r"--straggler-delay must be a finite number"),
    (dict(worker_timeout_s=0.0), r"--worker-timeout must be > 0"),
    (dict(worker_timeout_s=-3), r"--worker-timeout must be > 0"),
    (dict(network_gbps=0.0, backend="inproc"), r"--network-gbps must be > 0"),
    (dict(placement="diagonal"), r"--placement must be one of \['spread', 'pack'\]"),
    (dict(address="foo"), r"--address 'foo' is not a Ray address"),
    (dict(address="host:99999"), r"is not a Ray address"),
    (dict(tls=True, backend="inproc"), r"--tls applies to --backend ray only"),
    (dict(tls="/no/such/dir"), r"--tls /no/such/dir: no such directory"),
    (dict(shared_memory=False, backend="inproc"), r"--no-shared-memory applies to --backend ray only"),
])
def test_bad_settings_name_their_flag(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw).validate()


def test_tls_and_the_worker_timeout_reach_the_backend_only_when_given(tmp_path):
    assert "tls" not in TrainConfig().backend_options()
    assert "worker_timeout_s" not in TrainConfig().backend_options()  # the backend's own default applies
    assert TrainConfig(tls=True).backend_options()["tls"] is True
    assert TrainConfig(tls=str(tmp_path)).validate().backend_options()["tls"] == str(tmp_path)
    assert TrainConfig(worker_timeout_s=5.0).backend_options()["worker_timeout_s"] == 5.0
    assert config.from_flags(parse(["--tls"])).tls is True
    assert config.from_flags(parse(["--tls", str(tmp_path)])).tls == str(tmp_path)


def test_no_shared_memory_reaches_the_backend_and_a_config_saved_before_it_loads_with_the_default():
    assert "shared_memory" not in TrainConfig().backend_options()  # the arena is the backend's default
    assert config.from_flags(parse(["--no-shared-memory"])).backend_options()["shared_memory"] is False
    saved = TrainConfig().to_dict()
    del saved["shared_memory"], saved["tls"]
    assert TrainConfig.from_checkpoint(saved).shared_memory is True


@pytest.mark.parametrize(("argv", "message"), [
    (["--backend", "ray", "--address", "foo"], "--address 'foo' is not a Ray address"),
    (["--worker-timeout", "0"], "--worker-timeout must be > 0"),
    (["--json", "/proc/x"], "--json /proc/x: /proc is not a writable directory"),
    (["--json", "/"], "--json / is a directory or a link"),
])
def test_cli_refuses_bad_input_with_one_line_and_exit_2_before_training(argv, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["train", "--backend", "inproc", "--dataset", "digits", "--run-dir", str(run_dir)]
    assert main([*common, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not run_dir.exists()  # nothing trained, nothing written


def test_json_through_a_link_is_refused_before_training(tmp_path, capsys):
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    (tmp_path / "out.json").symlink_to(victim)
    assert main(["train", "--backend", "inproc", "--dataset", "digits", "--run-dir", str(tmp_path / "r"),
                 "--json", str(tmp_path / "out.json")]) == 2
    assert "is a directory or a link" in capsys.readouterr().err
    assert victim.read_text() == "{}"


def test_resume_fields_and_backend_options_are_declared_once():
    assert "model" in config.RESUME_FIELDS and "optim" in config.RESUME_FIELDS
    assert "max_steps" not in config.RESUME_FIELDS and "run_dir" in config.PATH_FIELDS
    backends = {f.metadata["sazd"].backend for f in dataclasses.fields(TrainConfig)} - {None}
    from sazd.runtime import BACKENDS

    assert backends == set(BACKENDS)
