"""The gpt and resnet models and the text corpora: shapes, the tied head, causality, the corpus's
windows and split, and coded training of both models equal to plain PyTorch (float64, in-process
and on Ray) with the tied head, a frozen layer and a block used twice."""

from __future__ import annotations

import json
import math
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import sazd
from sazd.codes import SAZD
from sazd.data import DatasetNotFoundError, batches, load_dataset
from sazd.data.text import PYSTDLIB_FILES, TEXT_DATASETS, VOCAB_SIZE, TextBundle, load_text
from sazd.models import NEXT_TOKEN, build_model, param_count, task_of
from sazd.parallel import coded_layers, parallelize, plain_state_dict, resolve_plan
from sazd.runtime.inproc import InProcessCluster
from sazd.train.optim import OptimConfig
from sazd.train.reference import reference_run, relative_weight_error
from sazd.train.trainer import TrainConfig, Trainer

TINY_GPT = (16, 2, 2)  # channels, layers, heads
TINY_RESNET = (8, 8, 16)
STEPS = 5


@pytest.fixture(scope="module")
def text():
    return load_text("pystdlib", train_limit=64, test_limit=16, block_size=12)


def gpt_plan(model: nn.Module) -> dict[str, str]:
    """Every attention and MLP projection coded (the tied head is not named: it stays on the master)."""
    return {name: "coded" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] in ("c_attn", "c_proj", "c_fc")}


# ---- the models -------------------------------------------------------------------------------


def test_gpt_shapes_tied_head_and_parameter_count():
    C, L, V, T = 32, 3, 256, 20
    model = build_model("gpt", (T,), V, hidden=(C, L, 4))
    assert model.lm_head.weight is model.wte.weight and task_of(model) is NEXT_TOKEN
    block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)  # LNs, Linears
    assert param_count(model) == V * C + T * C + L * block + 2 * C  # the tied head adds nothing
    out = model(torch.randint(0, V, (3, T)))
    assert out.shape == (3, T, V)
    m64 = build_model("gpt", (T,), V, hidden=(C, L, 4), dtype=torch.float64)
    assert m64.lm_head.weight is m64.wte.weight and m64.wte.weight.dtype == torch.float64
    shared = build_model("gpt", (T,), V, hidden=(C, L, 4), share_blocks=True)
    assert len(shared.h) == 1 and param_count(shared) == V * C + T * C + block + 2 * C


def test_gpt_is_causal():
    model = build_model("gpt", (16,), 256, hidden=TINY_GPT, dtype=torch.float64)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 256
    a, b = model(x), model(y)
    assert torch.equal(a[:, :9], b[:, :9])  # the past does not see the future
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_resnet_shapes_and_strided_shortcuts():
    model = build_model("resnet", (1, 28, 28), 10)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs["layer2.conv1"].stride == (2, 2) and convs["layer2.shortcut.conv"].kernel_size == (1, 1)
    assert convs["layer2.shortcut.conv"].stride == (2, 2) and convs["layer3.conv2"].dilation == (2, 2)
    assert isinstance(model.layer1.shortcut, nn.Identity)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert build_model("resnet", (3, 8, 8), 4, hidden=(4, 8))(torch.randn(1, 3, 8, 8)).shape == (1, 4)


def test_model_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"token windows.*pystdlib"):
        build_model("gpt", (1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"channels, layers, heads"):
        build_model("gpt", (8,), 256, hidden=(16,))
    with pytest.raises(ValueError, match="divisible by heads"):
        build_model("gpt", (8,), 256, hidden=(18, 1, 4))
    with pytest.raises(ValueError, match="resnet needs images"):
        build_model("resnet", (64,), 10)
    with pytest.raises(ValueError, match="takes none of"):
        build_model("mlp", (4,), 3, share_blocks=True)
    with pytest.raises(ValueError, match="positions exceed"):
        build_model("gpt", (8,), 256, hidden=TINY_GPT)(torch.zeros(1, 9, dtype=torch.int64))


# ---- the corpus -------------------------------------------------------------------------------


def test_pystdlib_windows_split_and_determinism():
    full = load_text("pystdlib", block_size=32)
    assert isinstance(full, TextBundle) and full.files == PYSTDLIB_FILES == tuple(sorted(PYSTDLIB_FILES))
    assert full.in_shape == (32,) and full.num_classes == VOCAB_SIZE == 256
    assert full.train_x.dtype == torch.int64 and int(full.train_x.max()) < 256
    assert torch.equal(full.train_y[:, :-1], full.train_x[:, 1:])  # targets: the next byte
    windows = full.n_train + full.n_test
    assert windows == full.corpus_bytes // 33 and full.n_test == round(0.1 * windows)
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"\n".join((root / f).read_bytes() for f in PYSTDLIB_FILES)
    chunks = Counter(data[i:i + 33] for i in range(0, windows * 33, 33))
    rows = Counter(bytes(r) for x, y in ((full.train_x, full.train_y), (full.test_x, full.test_y))
                   for r in torch.cat([x, y[:, -1:]], 1).tolist())
    assert rows == chunks  # every chunk in exactly one split
    again = load_text("pystdlib", block_size=32, seed=5)
    assert torch.equal(again.test_x, full.test_x) and again.sha256 == full.sha256  # split fixed
    sub = load_dataset("pystdlib", train_limit=100, seed=1, dtype=torch.float64)
    assert sub.n_train == 100 and sub.train_x.dtype == torch.int64 and sub.in_shape == (64,)
    assert sub.to(dtype=torch.float64).train_x.dtype == torch.int64  # tokens stay integers
    assert set(TEXT_DATASETS) <= set(__import__("sazd.data").data.DATASETS)


def test_text_corpora_validate_their_files(tmp_path):
    (tmp_path / "argparse.py").write_text("x = 1\n")
    with pytest.raises(DatasetNotFoundError, match=r"lacks \['ast.py'.*--data-dir"):
        load_text("pystdlib", data_dir=tmp_path)
    with pytest.raises(ValueError, match="pass --data-dir"):
        load_text("text")
    with pytest.raises(DatasetNotFoundError, match="not a directory"):
        load_text("text", data_dir=tmp_path / "nowhere")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_bytes(b"hello world, " * 20)
    (tmp_path / ".hidden").write_bytes(b"secret" * 100)
    bundle = load_text("text", data_dir=tmp_path, block_size=8)
    assert bundle.files == ("argparse.py", "b/two.txt")
    assert bundle.corpus_bytes == len(b"x = 1\n" + b"\n" + b"hello world, " * 20)
    with pytest.raises(ValueError, match="at least 2: add text"):
        load_text("text", data_dir=tmp_path / "b", block_size=200)


# ---- coded training equals plain PyTorch --------------------------------------------------------


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data, steps: int, batch_size: int
          ) -> list[float]:
    task, losses = task_of(model), []
    model.train()
    for (xb, yb), _ in zip(batches(data.train_x, data.train_y, batch_size, 0, 0), range(steps), strict=False):
        optimizer.zero_grad()
        loss = task.loss(model(xb), yb)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


OPTIMIZERS = {  # naive: any torch optimizer as is; DEU: torch's SGD, hooked to step the coded weights
    "naive": lambda params, coded: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "deu": lambda params, coded: (sazd.coded_optimizer if coded else lambda opt: opt)(
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)),
}


def coded_equals_plain(build, plan, frozen: str, scheme: str, data, batch_size: int) -> nn.Module:
    """Train ``build()`` plainly and coded (SAZD(6, 4), in-process) on the same batches; assert every
    weight agrees to 1e-9 and the frozen weight did not move; returns the coded model."""
    plain, coded = build(), build()
    for model in (plain, coded):
        model.get_parameter(frozen).requires_grad_(False)
    start = plain.get_parameter(frozen).detach().clone()
    parallelize(coded, SAZD(6, 4), InProcessCluster(6, base_time_s=1e-3), plan=plan(coded), scheme=scheme)
    assert len(coded_layers(coded)) == sum(style == "coded" for style in plan(plain).values())
    losses = [train(m, OPTIMIZERS[scheme]([p for p in m.parameters() if p.requires_grad], m is coded), data,
                    STEPS, batch_size) for m in (plain, coded)]
    assert losses[0][-1] < losses[0][0]  # it learns
    state = coded.state_dict()
    assert set(state) == set(plain.state_dict())  # plain-shaped, the same keys
    assert relative_weight_error(state, plain) < 1e-9
    assert torch.equal(state[frozen], start)
    return coded


@pytest.mark.parametrize("scheme", ["naive", "deu"])
@pytest.mark.parametrize("share_blocks", [False, True])
def test_gpt_coded_training_equals_plain_pytorch(scheme, share_blocks, text):
    def build():
        return build_model("gpt", text.in_shape, text.num_classes, hidden=TINY_GPT, dtype=torch.float64,
                           share_blocks=share_blocks)

    coded = coded_equals_plain(build, gpt_plan, "h.0.attn.c_proj.weight", scheme, text, batch_size=4)
    assert coded.lm_head.weight is coded.wte.weight  # the tie survived coding and training
    assert "lm_head" not in {layer.name for layer in coded_layers(coded)}


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_resnet_coded_training_equals_plain_pytorch(scheme, digits):
    def build():
        return build_model("resnet", digits.in_shape, digits.num_classes, hidden=TINY_RESNET,
                           dtype=torch.float64)

    def plan(model):  # every convolution after the stem (strided, 1x1 strided, dilated) and the head
        return {name: "coded" for name, m in model.named_modules()
                if isinstance(m, nn.Conv2d | nn.Linear) and name != "conv1"}

    coded = coded_equals_plain(build, plan, "layer1.conv1.weight", scheme, digits, batch_size=16)
    assert {"layer2.shortcut.conv", "layer3.conv2"} <= {layer.name for layer in coded_layers(coded)}


def test_automatic_plan_leaves_the_tied_head_on_the_master():
    model = build_model("gpt", (8,), 256, hidden=(64, 1, 2))
    chosen = resolve_plan(model, None, 64)
    assert set(chosen) == {"h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"}


# ---- the trainer: loss, perplexity, plots, Ray with stragglers ----------------------------------


def gpt_config(**kw) -> TrainConfig:
    plan = gpt_plan(build_model("gpt", (12,), 256, hidden=TINY_GPT))
    base = dict(model="gpt", dataset="pystdlib", hidden=TINY_GPT, backend="inproc", dtype="float64",
                plan=plan, batch_size=4, max_steps=3, base_time_s=1e-3, show_progress=False, n=6, k=4,
                optim=OptimConfig(lr=0.1, momentum=0.9))
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_reports_perplexity_for_the_gpt(text, tmp_path):
    cfg = gpt_config(run_dir=str(tmp_path))
    with Trainer(cfg, data=text) as tr:
        report = tr.train()
        assert relative_weight_error(plain_state_dict(tr.model), reference_run(cfg, tr.data, 3)) < 1e-9
    assert report["task"] == "next-token"
    assert report["test_perplexity"] == pytest.approx(math.exp(report["test_loss"]))
    assert 1.0 < report["test_perplexity"] < 256.0 * 1.5  # near-uniform at first, below it soon
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in rows if r["kind"] == "iteration"]
    assert [r["perplexity"] for r in its] == pytest.approx([math.exp(r["loss"]) for r in its])
    assert (tmp_path / "perplexity.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_gpt_on_ray_with_two_stragglers_equals_plain_pytorch(text, ray_session):
    cfg = gpt_config(backend="ray", stragglers=2, straggler_delay=3.0, base_time_s=None)
    with Trainer(cfg, data=text) as tr:
        report = tr.train()
        assert relative_weight_error(plain_state_dict(tr.model), reference_run(cfg, tr.data, 3)) < 1e-9
    assert report["iterations"] == 3 and report["cluster"]["late_results_discarded"] > 0


def test_cli_refuses_a_model_for_the_wrong_data_in_one_line(capsys):
    import argparse

    from sazd.train import cli

    for argv, message in ((["--model", "gpt", "--dataset", "digits"], "token windows"),
                          (["--model", "resnet", "--dataset", "pystdlib"], "resnet needs images")):
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        assert cli.run(parser.parse_args([*argv, "--backend", "inproc"])) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
