"""Hostile input, as users hit it: sazd never deletes or overwrites what it did not write, treats a
checkpoint as untrusted input, leaves every ending resumable, and answers bad input with one line on
stderr and exit status 2 (runtime failures: one line, exit status 1).

Every refusal is checked to leave the disk exactly as it was (all files byte for byte, nothing added).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sazd.cli import main
from sazd.data import IDX_FILES, write_idx
from sazd.train import checkpoint

TRAIN = [
    "train",
    "--dataset",
    "digits",
    "--hidden",
    "16,16",
    "--min-features",
    "8",
    "--backend",
    "inproc",
    "--batch-size",
    "64",
    "--base-time",
    "0.001",
    "--no-progress",
]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


def sazd(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``sazd argv`` (argparse's usage errors exit through SystemExit)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code
    return rc, capsys.readouterr().err


def refused(argv: list[str], capsys, *phrases: str, root: Path | None = None, status: int = 2) -> str:
    """``sazd argv`` exits with ``status`` and one line naming ``phrases``, and changes nothing under root."""
    before = snapshot(root) if root is not None else None
    rc, err = sazd(argv, capsys)
    assert rc == status, err
    assert err.count("\n") == 1 and err.startswith("sazd"), err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    if root is not None:
        assert snapshot(root) == before, "the refusal changed files"
    return err


def user_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("\\section{Five years of work}\n")
    (folder / "data.bin").write_bytes(bytes(range(256)) * 10)
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run of 3 iterations with its checkpoint (read only: tests copy it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main([*TRAIN, "--max-steps", "3", "--run-dir", str(run)]) == 0
    return run


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# ------------------------------------------------------------------ 1. nothing deleted or overwritten
def _foreign_checkpoint_dir(t: Path) -> list:
    return ["--checkpoint-dir", user_files(t / "mine"), "--run-dir", t / "r"]


def _checkpoint_dir_is_run_dir(t: Path) -> list:
    return ["--checkpoint-dir", t / "r", "--run-dir", t / "r"]


def _checkpoint_dir_above_run_dir(t: Path) -> list:
    return ["--checkpoint-dir", t / "r", "--run-dir", t / "r" / "inner"]


def _checkpoint_dir_is_a_run_file(t: Path) -> list:
    return ["--checkpoint-dir", t / "r" / "metrics.jsonl", "--run-dir", t / "r"]


def _checkpoint_dir_is_a_file(t: Path) -> list:
    user_files(t / "mine")
    return ["--checkpoint-dir", t / "mine" / "thesis.tex", "--run-dir", t / "r"]


def _run_dir_foreign(t: Path) -> list:
    return ["--run-dir", user_files(t / "mine")]


def _run_dir_is_a_file(t: Path) -> list:
    user_files(t / "mine")
    return ["--run-dir", t / "mine" / "data.bin"]


def _run_dir_under_a_file(t: Path) -> list:
    user_files(t / "mine")
    return ["--run-dir", t / "mine" / "data.bin" / "run"]


def _checkpoint_dir_under_a_file(t: Path) -> list:
    user_files(t / "mine")
    return ["--checkpoint-dir", t / "mine" / "data.bin" / "ck", "--run-dir", t / "r"]


def _json_over_a_user_file(t: Path) -> list:
    user_files(t / "mine")
    return ["--json", t / "mine" / "thesis.tex", "--run-dir", t / "r"]


def _json_is_a_directory(t: Path) -> list:
    return ["--json", user_files(t / "mine"), "--run-dir", t / "r"]


def _json_under_a_file(t: Path) -> list:
    user_files(t / "mine")
    return ["--json", t / "mine" / "data.bin" / "out.json", "--run-dir", t / "r"]


def _overwrite_foreign(t: Path) -> list:
    return ["--run-dir", user_files(t / "mine"), "--overwrite"]


def _foreign_tmp_beside_checkpoint(t: Path) -> list:
    user_files(t / "ck.tmp")
    return ["--checkpoint-dir", t / "ck", "--run-dir", t / "r"]


def _user_file_inside_checkpoint_dir(t: Path) -> list:
    (t / "ck").mkdir()
    (t / "ck" / checkpoint.META).write_text('{"format": "sazd-checkpoint-2", "run_id": "x"}')
    (t / "ck" / "notes.txt").write_text("mine")
    return ["--checkpoint-dir", t / "ck", "--run-dir", t / "r", "--overwrite"]


FOREIGN = {
    "checkpoint dir with a user's files": (_foreign_checkpoint_dir, "--checkpoint-dir"),
    "checkpoint dir equal to the run dir": (_checkpoint_dir_is_run_dir, "would overwrite the run directory"),
    "checkpoint dir holding the run dir": (
        _checkpoint_dir_above_run_dir,
        "would overwrite the run directory",
    ),
    "checkpoint dir named like a run file": (
        _checkpoint_dir_is_a_run_file,
        "would overwrite the run directory",
    ),
    "checkpoint dir is a user's file": (_checkpoint_dir_is_a_file, "not a directory"),
    "run dir with a user's files": (_run_dir_foreign, "not a sazd run directory"),
    "run dir is a user's file": (_run_dir_is_a_file, "not a directory"),
    "run dir below a file": (_run_dir_under_a_file, "not a writable directory"),
    "checkpoint dir below a file": (_checkpoint_dir_under_a_file, "not a writable directory"),
    "--json over a user's file": (_json_over_a_user_file, "not a sazd report"),
    "--json is a directory": (_json_is_a_directory, "is a directory"),
    "--json below a file": (_json_under_a_file, "not a writable directory"),
    "--overwrite of a user's folder": (_overwrite_foreign, "not a sazd run directory"),
    "a user's folder where the save's temporary goes": (_foreign_tmp_beside_checkpoint, "did not write"),
    "a user's file among checkpoint files": (_user_file_inside_checkpoint_dir, "notes.txt"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_foreign_paths_are_refused_and_left_untouched(case, tmp_path, capsys):
    make, phrase = FOREIGN[case]
    argv = [*TRAIN, "--max-steps", "2", *make(tmp_path)]
    refused(argv, capsys, phrase, root=tmp_path)


def test_a_fresh_run_into_an_earlier_runs_directory_is_refused(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    refused(
        [*TRAIN, "--max-steps", "2", "--run-dir", run],
        capsys,
        "holds an earlier run",
        "--resume",
        "--overwrite",
        root=tmp_path,
    )


def test_a_checkpoint_dir_of_another_run_is_refused(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    refused(
        [*TRAIN, "--max-steps", "2", "--run-dir", tmp_path / "new", "--checkpoint-dir", run / "checkpoint"],
        capsys,
        "checkpoint of another run",
        root=tmp_path,
    )


def test_overwrite_deletes_only_what_sazd_wrote(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    user_files(run)
    (run / "checkpoint" / "my-notes.txt").write_text("keep")
    mine = {p: (run / p).read_bytes() for p in ("thesis.tex", "data.bin", "checkpoint/my-notes.txt")}
    refused(
        [*TRAIN, "--max-steps", "2", "--run-dir", run, "--overwrite"], capsys, "my-notes.txt", root=tmp_path
    )
    (run / "checkpoint" / "my-notes.txt").unlink()
    del mine["checkpoint/my-notes.txt"]
    old_id = json.loads((run / ".sazd-run").read_text())["run_id"]
    rc, err = sazd([*TRAIN, "--max-steps", "2", "--run-dir", run, "--overwrite"], capsys)
    assert rc == 0, err
    assert {p: (run / p).read_bytes() for p in mine} == mine
    assert json.loads((run / ".sazd-run").read_text())["run_id"] != old_id
    assert checkpoint.load(run).position["iteration"] == 2
    iterations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in iterations if r["kind"] == "iteration"] == [1, 2]  # no mixed metrics


def test_overwrite_cannot_go_with_resume(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    refused(["train", "--resume", run, "--overwrite"], capsys, "--overwrite", root=tmp_path)


def test_a_copied_run_resumes_into_the_copy_and_leaves_the_original_alone(finished_run, tmp_path, capsys):
    original = snapshot(finished_run)
    run = copy_run(finished_run, tmp_path)
    rc, err = sazd(["train", "--resume", run, "--max-steps", "5", "--no-progress"], capsys)
    assert rc == 0, err
    assert snapshot(finished_run) == original
    assert checkpoint.load(run).position["iteration"] == 5


# ------------------------------------------------------------------ 2. a checkpoint is untrusted input
def craft(run: Path, meta=None, tensors=None) -> None:
    """Edit a checkpoint the way an attacker would: change fields, then recompute the checksums."""
    ck = run / "checkpoint"
    if meta is not None:
        m = json.loads((ck / checkpoint.META).read_text())
        m = meta(m) or m
        (ck / checkpoint.META).write_text(json.dumps(m))
    if tensors is not None:
        t = load_file(str(ck / checkpoint.TENSORS))
        tensors(t)
        save_file(t, str(ck / checkpoint.TENSORS))
    sums = "".join(f"{checkpoint._sha256(ck / n)}  {n}\n" for n in (checkpoint.TENSORS, checkpoint.META))
    (ck / checkpoint.SUMS).write_text(sums)


def _set(path: str, value):
    def edit(m):
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        m[last] = value

    return edit


def _drop(path: str):
    def edit(m):
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        del m[last]

    return edit


META_EDITS = {
    "negative epoch": (_set("position.epoch", -1), "position.epoch"),
    "batch index past the epoch": (_set("position.batch", 999), "position.batch"),
    "iteration inconsistent with epoch and batch": (_set("position.iteration", 2), "position.iteration"),
    "epoch as a string": (_set("position.epoch", "0"), "position.epoch"),
    "batch as a boolean": (_set("position.batch", True), "position.batch"),
    "position field missing": (_drop("position.batch"), "position"),
    "config missing": (_drop("config"), "missing ['config']"),
    "config field of the wrong type": (_set("config.n", "6"), "config.n"),
    "config field unknown": (_set("config.evil", 1), "evil"),
    "config field missing": (_drop("config.k"), "config"),
    "optimizer setting of the wrong type": (_set("config.optim.lr", "fast"), "config.optim.lr"),
    "impossible code": (_set("config.k", 9), "config"),
    "optimizer steps disagree": (_set("optim.steps", 99), "optim.steps"),
    "unknown top-level field": (_set("evil", "rm -rf"), "unexpected ['evil']"),
    "run id not a string": (_set("run_id", 5), "run_id"),
    "schedule of the wrong length": (_set("schedule.tasks", [1, 2]), "schedule.tasks"),
    "dead worker out of range": (_set("schedule.dead", [99]), "schedule.dead"),
    "negative clock": (_set("schedule.clock.clock", -1.0), "schedule.clock"),
    "non-finite clock": (_set("schedule.clock.busy_until", [math.inf] * 6), "schedule.clock.busy_until"),
    "schedule for another cluster": (_set("schedule.n", 7), "schedule.n"),
    "different dataset": (_set("data.mean", 0.5), "checkpoint field data"),
    "older format": (_set("format", "sazd-checkpoint-1"), "format"),
    "not an object": (lambda m: [m], "format"),
}


@pytest.mark.parametrize("case", list(META_EDITS))
def test_crafted_checkpoint_fields_are_refused_naming_the_field(case, finished_run, tmp_path, capsys):
    edit, phrase = META_EDITS[case]
    run = copy_run(finished_run, tmp_path)
    craft(run, meta=edit)
    refused(["train", "--resume", run, "--no-progress"], capsys, phrase, root=tmp_path)


def _transpose(t):
    t["model/fc1.weight"] = t["model/fc1.weight"].T.contiguous()


def _to_float64(t):
    t["model/fc2.weight"] = t["model/fc2.weight"].double()


def _nan(t):
    t["model/fc3.weight"][0, 0] = float("nan")


def _pop(key):
    return lambda t: t.pop(key)


def _add(key):
    return lambda t: t.__setitem__(key, torch.zeros(3))


def _short_rng(t):
    t["rng/torch"] = t["rng/torch"][:100].clone()


def _bad_block(t):
    t["coded/4/fc1.row"] = torch.zeros(2, 2, dtype=torch.float32)


TENSOR_EDITS = {
    "weight of the wrong shape": (_transpose, "model/fc1.weight has shape"),
    "weight of the wrong dtype": (_to_float64, "torch.float64"),
    "NaN weight": (_nan, "NaN"),
    "weight missing": (_pop("model/fc2.bias"), "missing ['fc2.bias']"),
    "extra weight": (_add("model/evil"), "unexpected ['evil']"),
    "momentum missing": (_pop("optim/fc1.bias/momentum_buffer"), "optim/"),
    "random state cut short": (_short_rng, "rng/torch"),
    "column copy missing": (_pop("columns/fc2.col"), "columns/"),
    "coded block of the wrong shape": (_bad_block, "coded/4/fc1.row"),
    "tensor outside the known groups": (_add("paths/etc"), "unexpected tensor 'paths/etc'"),
}


@pytest.mark.parametrize("case", list(TENSOR_EDITS))
def test_crafted_checkpoint_tensors_are_refused_naming_the_tensor(case, finished_run, tmp_path, capsys):
    edit, phrase = TENSOR_EDITS[case]
    run = copy_run(finished_run, tmp_path)
    craft(run, tensors=edit)
    refused(["train", "--resume", run, "--no-progress"], capsys, phrase, root=tmp_path)


def _flip(ck: Path) -> None:
    data = bytearray((ck / checkpoint.TENSORS).read_bytes())
    data[len(data) // 2] ^= 1
    (ck / checkpoint.TENSORS).write_bytes(bytes(data))


DAMAGE = {
    "a flipped bit": (_flip, "corrupt or truncated"),
    "a truncated copy": (
        lambda ck: (ck / checkpoint.TENSORS).write_bytes((ck / checkpoint.TENSORS).read_bytes()[:-99]),
        "corrupt or truncated",
    ),
    "checksums missing": (lambda ck: (ck / checkpoint.SUMS).unlink(), "incomplete"),
    "meta edited without checksums": (
        lambda ck: (ck / checkpoint.META).write_text("{}"),
        "meta.json is corrupt",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoints_are_refused(case, finished_run, tmp_path, capsys):
    damage, phrase = DAMAGE[case]
    run = copy_run(finished_run, tmp_path)
    damage(run / "checkpoint")
    refused(["train", "--resume", run, "--no-progress"], capsys, phrase, root=tmp_path)


def test_paths_inside_a_checkpoint_choose_nothing(finished_run, tmp_path, capsys):
    """A crafted checkpoint (checksums recomputed) whose config names a victim's folder as run and
    checkpoint directory: the resumed run writes only where the user pointed."""
    victim = user_files(tmp_path / "victim")
    before = snapshot(victim)
    run = copy_run(finished_run, tmp_path)

    def aim(m):
        for key in ("run_dir", "checkpoint_dir", "resume", "data_dir"):
            m["config"][key] = str(victim)

    craft(run, meta=aim)
    rc, err = sazd(["train", "--resume", run, "--max-steps", "4", "--no-progress"], capsys)
    assert rc == 0, err
    assert snapshot(victim) == before
    assert checkpoint.load(run).position["iteration"] == 4


# ------------------------------------------------------------------ 3. every ending leaves it resumable
@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_losing_more_than_n_minus_k_workers_exits_1_with_a_checkpoint_to_resume(scheme, tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = sazd(
        [*TRAIN, "--scheme", scheme, "--latency", "dead:0,1,2:12", "--max-steps", "6", "--run-dir", run],
        capsys,
    )
    assert rc == 1 and err.count("\n") == 1 and "--resume" in err and "report.json" in err, err
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "failed" and "alive" in report["error"]
    saved = checkpoint.load(run).position["iteration"]
    rc, err = sazd(
        ["train", "--resume", run, "--latency", "none", "--max-steps", "6", "--no-progress"], capsys
    )
    assert rc == 0, err
    assert checkpoint.load(run).position["iteration"] == 6 and saved < 6


def test_an_unwritable_json_path_is_refused_before_training(tmp_path, capsys):
    user_files(tmp_path / "mine")
    refused(
        [*TRAIN, "--json", tmp_path / "mine" / "thesis.tex" / "r.json", "--run-dir", tmp_path / "r"],
        capsys,
        "--json",
        root=tmp_path,
    )
    assert not (tmp_path / "r").exists()


def test_json_may_replace_an_earlier_sazd_report(tmp_path, capsys):
    out = tmp_path / "out.json"
    for i in (1, 2):
        rc, err = sazd([*TRAIN, "--max-steps", "1", "--run-dir", tmp_path / f"r{i}", "--json", out], capsys)
        assert rc == 0, err
    assert json.loads(out.read_text())["format"] == "sazd-report-1"


# ------------------------------------------------------------------ 4. one line, exit 2, for every command
CLI_ERRORS = {
    "design: n <= k": (["design", "--n", "3", "--k", "4", "--rows", "8"], "--n"),
    "design: not a number": (["design", "--n", "6", "--k", "4", "--rows", "x"], "--rows"),
    "design: flag missing": (["design", "--n", "6"], "required"),
    "bench codec: negative count": (["bench", "codec", "--threads", "-1"], "--threads"),
    "bench stability: unknown dtype": (["bench", "stability", "--dtypes", "fp8"], "fp8"),
    "bench train: NaN": (["bench", "train", "--lr", "nan"], "--lr"),
    "bench runtime: k above n": (["bench", "runtime", "--n", "3", "--k", "4"], "--k"),
    "bench runtime: no rounds": (["bench", "runtime", "--rounds", "0"], "--rounds"),
    "bench runtime: zero master threads": (["bench", "runtime", "--master-threads", "0"], "--master-threads"),
    "bench runtime: unknown part": (["bench", "runtime", "--parts", "round,x"], "--parts"),
    "bench runtime: unknown code": (["bench", "runtime", "--code", "bogus"], "bogus"),
    "bench: no subcommand": (["bench"], "required"),
    "no command": ([], "required"),
    "unknown command": (["frobnicate"], "invalid choice"),
    "train: unknown flag": (["train", "--epochz", "1"], "--epochz"),
    "train: no CUDA device of that index": ([*TRAIN, "--device", "cuda:99"], "--device"),
    "train: not a device": ([*TRAIN, "--device", "tpu"], "--device"),
    "train: empty plan": ([*TRAIN, "--plan", ","], "--plan"),
    "train: plan names no layer of the model": ([*TRAIN, "--plan", "fc9"], "fc9"),
    "train: zero epochs": ([*TRAIN, "--epochs", "0"], "--epochs"),
    "train: zero batch size": ([*TRAIN, "--batch-size", "0"], "--batch-size"),
    "train: NaN learning rate": ([*TRAIN, "--lr", "nan"], "--lr"),
    "train: unreadable latency": ([*TRAIN, "--latency", "bogus"], "latency spec"),
    "train: dead worker beyond n": ([*TRAIN, "--latency", "dead:9"], "dead workers"),
    "train: more stragglers than workers": ([*TRAIN, "--stragglers", "7"], "--stragglers"),
    "train: speed-up as straggler delay": ([*TRAIN, "--straggler-delay", "0.5"], "--straggler-delay"),
    "train: zero bandwidth": ([*TRAIN, "--network-gbps", "0"], "--network-gbps"),
    "train: shift unit not a number": ([*TRAIN, "--shift-unit", "x"], "--shift-unit"),
    "train: hidden widths not integers": ([*TRAIN, "--hidden", "x"], "--hidden"),
    "train: n < k": ([*TRAIN, "--n", "3", "--k", "4"], "n must be >= k"),
    "train: Adam with DEU": ([*TRAIN, "--optimizer", "adam"], "deu"),
    "train: zero training samples": ([*TRAIN, "--train-limit", "0"], "--train-limit"),
    "train: negative seed": ([*TRAIN, "--seed", "-1"], "--seed"),
    "train: checkpoint every 0": ([*TRAIN, "--checkpoint-every", "0"], "--checkpoint-every"),
    "train: unsupported dtype": ([*TRAIN, "--dtype", "float16"], "--dtype"),
    "train: resume from nowhere": (["train", "--resume", "/nonexistent/run"], "no checkpoint there"),
    "train: unknown dataset": ([*TRAIN, "--dataset", "cifar"], "cifar"),
    "train: IDX dataset without files": (
        [*TRAIN, "--dataset", "mnist", "--data-dir", "/nonexistent"],
        "--data-dir",
    ),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_bad_input_is_one_line_and_exit_2_for_every_command(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written anywhere: the default run dir would go here
    argv, phrase = CLI_ERRORS[case]
    refused(argv, capsys, phrase, root=tmp_path)
    assert snapshot(tmp_path) == {}


def _idx(t: Path, edit=None) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (80, 8, 8), dtype=np.uint8),
        "train_y": rng.integers(0, 10, 80, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (20, 8, 8), dtype=np.uint8),
        "test_y": rng.integers(0, 10, 20, dtype=np.uint8),
    }
    if edit is not None:
        edit(arrays)
    (t / "data").mkdir()
    for split, stem in IDX_FILES.items():
        write_idx(t / "data" / stem, arrays[split])
    return t / "data"


def _float_pixels(value):
    def edit(a):
        a["train_x"] = a["train_x"].astype(np.float32)
        a["train_x"][3, 2, 1] = value

    return edit


def _labels(value):
    def edit(a):
        a["train_y"][5] = value

    return edit


DATA_ERRORS = {
    "NaN pixel": (_float_pixels(np.nan), "train-images", "NaN"),
    "infinite pixel": (_float_pixels(np.inf), "train-images", "NaN or infinite"),
    "label out of range": (_labels(12), "labels span", "[0, 10)"),
    "more labels than images": (lambda a: a.update(train_y=np.zeros(81, np.uint8)), "do not match", "train"),
    "no training samples": (
        lambda a: a.update(train_x=np.zeros((0, 8, 8), np.uint8), train_y=np.zeros(0, np.uint8)),
        "0 samples",
        "train-images",
    ),
    "float labels": (lambda a: a.update(test_y=np.zeros(20, np.float32)), "not integers", "t10k-labels"),
}


@pytest.mark.parametrize("case", list(DATA_ERRORS))
def test_bad_datasets_are_named_at_load(case, tmp_path, capsys):
    edit, *phrases = DATA_ERRORS[case]
    data = _idx(tmp_path, edit)
    refused(
        [*TRAIN, "--dataset", "mnist", "--data-dir", data, "--run-dir", tmp_path / "r"],
        capsys,
        *phrases,
        root=tmp_path,
    )


FILE_DAMAGE = {
    "missing file": (lambda p: p.unlink(), "did not find"),
    "truncated file": (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated"),
    "bad magic number": (lambda p: p.write_bytes(b"\x00\x00\x07\x03" + p.read_bytes()[4:]), "bad magic"),
}


@pytest.mark.parametrize("case", list(FILE_DAMAGE))
def test_damaged_idx_files_are_named(case, tmp_path, capsys):
    damage, phrase = FILE_DAMAGE[case]
    data = _idx(tmp_path)
    damage(data / IDX_FILES["train_x"])
    refused(
        [*TRAIN, "--dataset", "mnist", "--data-dir", data, "--run-dir", tmp_path / "r"],
        capsys,
        phrase,
        root=tmp_path,
    )


def test_resume_honours_or_refuses_every_given_flag_even_at_its_default(tmp_path, capsys):
    """A flag given with --resume counts even when its value is the default: --lr 0.05 (the default)
    against a checkpoint trained with 0.1 is refused, --stragglers 0 is honoured."""
    first = tmp_path / "first"
    assert (
        main([*TRAIN, "--lr", "0.1", "--stragglers", "2", "--max-steps", "2", "--run-dir", str(first)]) == 0
    )
    refused(["train", "--resume", first, "--lr", "0.05"], capsys, "settings differ", "optim")
    rc, err = sazd(
        ["train", "--resume", first, "--stragglers", "0", "--max-steps", "3", "--no-progress"], capsys
    )
    assert rc == 0, err
    report = json.loads((first / "report.json").read_text())
    assert report["cluster_settings"]["latency"] == "none" and report["position"]["iteration"] == 3


def test_a_checkpoint_from_another_machine_resumes_with_this_machines_device(finished_run, tmp_path, capsys):
    """Saved on a GPU machine (device cuda:7): here --device must be given again, and then it resumes."""
    run = copy_run(finished_run, tmp_path)
    craft(run, meta=_set("config.device", "cuda:7"))
    refused(["train", "--resume", run, "--no-progress"], capsys, "--device cuda:7", root=tmp_path)
    rc, err = sazd(["train", "--resume", run, "--device", "cpu", "--max-steps", "4", "--no-progress"], capsys)
    assert rc == 0, err
