"""Models (shapes, parameter counts, named layers, seeded init) and run reporting (files, plots, bar)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sazd.models import build_model, param_count
from sazd.train.report import progress, to_jsonable
from sazd.train.rundir import RunDir

# ---- models -----------------------------------------------------------------------------------


def test_mlp_default_shape_and_params():
    model = build_model("mlp", (1, 28, 28), 10)
    fcs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert list(fcs) == ["fc1", "fc2", "fc3"]
    assert [(m.in_features, m.out_features) for m in fcs.values()] == [(784, 1024), (1024, 1024), (1024, 10)]
    expected = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    assert param_count(model) == expected
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10) and out.dtype == torch.float32


def test_mlp_custom_hidden():
    model = build_model("mlp", (64,), 3, hidden=(32, 16, 8))
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["fc1", "fc2", "fc3", "fc4"]
    assert param_count(model) == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 8 + 8) + (8 * 3 + 3)
    assert model(torch.randn(2, 64)).shape == (2, 3)


@pytest.mark.parametrize("in_shape", [(1, 28, 28), (1, 8, 8), (3, 10, 9)])
def test_cnn_shapes_and_params(in_shape):
    c, h, w = in_shape
    model = build_model("cnn", in_shape, 10)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert names == ["conv1", "conv2", "fc1", "fc2"]
    flat = 64 * (h // 4) * (w // 4)
    assert model.fc1.in_features == flat
    expected = (c * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (flat * 128 + 128) + (128 * 10 + 10)
    assert param_count(model) == expected
    assert model(torch.randn(4, *in_shape)).shape == (4, 10)


def test_models_deterministic_from_seed_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("mlp", (1, 8, 8), 10, hidden=(20, 20), seed=5)
    after = torch.rand(3)
    assert torch.equal(before, after)  # build_model did not consume the global RNG
    b = build_model("mlp", (1, 8, 8), 10, hidden=(20, 20), seed=5)
    c = build_model("mlp", (1, 8, 8), 10, hidden=(20, 20), seed=6)
    for (na, pa), (_, pb), (_, pc) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), na
        assert not torch.equal(pa, pc), na
    ca, cb = build_model("cnn", (1, 8, 8), 10, seed=1), build_model("cnn", (1, 8, 8), 10, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(ca.parameters(), cb.parameters(), strict=True))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_float64_model_equals_float32_model(name):
    m32 = build_model(name, (1, 8, 8), 10, seed=2)
    m64 = build_model(name, (1, 8, 8), 10, seed=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    for p32, p64 in zip(m32.parameters(), m64.parameters(), strict=True):
        assert torch.equal(p32.double(), p64)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(m64(x).float(), m32(x.float()), rtol=1e-4, atol=1e-5)


def test_model_bad_arguments():
    with pytest.raises(ValueError, match="unknown name 'vgg'"):
        build_model("vgg", (1, 28, 28), 10)
    with pytest.raises(ValueError, match=r"cnn needs \(channels, height, width\).*\(784,\)"):
        build_model("cnn", (784,), 10)
    with pytest.raises(ValueError, match="num_classes: 1"):
        build_model("mlp", (4,), 1)
    with pytest.raises(ValueError, match="hidden"):
        build_model("mlp", (4,), 3, hidden=(8, 0))
    with pytest.raises(ValueError, match="dtype"):
        build_model("mlp", (4,), 3, dtype=torch.float16)


# ---- run directory ----------------------------------------------------------------------------


def test_rundir_writes_valid_files(tmp_path):
    run = RunDir(tmp_path / "runs" / "a")  # parents are created
    assert run.path.is_dir()
    config = {"model": "mlp", "dtype": torch.float64, "hidden": (8, 8), "path": tmp_path, "n": np.int64(6)}
    run.write_config(config)
    loaded = json.loads((run.path / "config.json").read_text())
    assert loaded == {
        "model": "mlp",
        "dtype": "torch.float64",
        "hidden": [8, 8],
        "path": str(tmp_path),
        "n": 6,
    }

    for i in range(1, 6):
        run.log(iteration=i, epoch=0, loss=torch.tensor(2.0 / i), accuracy=0.1 * i, iter_s=0.01)
    run.log({"iteration": 5, "epoch": 0}, test_loss=0.5, test_accuracy=0.8, note="eval")
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    rows = [json.loads(line) for line in lines]  # every line is one JSON object
    assert rows[0]["loss"] == pytest.approx(2.0) and rows[4]["accuracy"] == pytest.approx(0.5)
    assert rows[5] == {"iteration": 5, "epoch": 0, "test_loss": 0.5, "test_accuracy": 0.8, "note": "eval"}
    assert run.read_metrics() == rows

    run.write_report({"test_accuracy": 0.8, "bad": float("nan"), "per_phase": {"encode": 1e-3}})
    assert run.read_report() == {"test_accuracy": 0.8, "bad": None, "per_phase": {"encode": 1e-3}}
    assert not list(run.path.glob("*.tmp"))


def test_rundir_plots_are_pngs(tmp_path):
    run = RunDir(tmp_path)
    for i in range(20):
        run.log(iteration=i, loss=math.exp(-i / 5), accuracy=1 - math.exp(-i / 5))
    run.log(iteration=19, test_loss=0.1, test_accuracy=0.9)
    paths = run.plot()
    assert set(paths) == {"loss", "accuracy"}
    for name in ("loss.png", "accuracy.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_rundir_plot_with_no_metrics_still_writes(tmp_path):
    run = RunDir(tmp_path)
    paths = run.plot()
    assert paths["loss"].stat().st_size > 0 and paths["accuracy"].stat().st_size > 0


def test_rundir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        RunDir(tmp_path / "f")


def test_to_jsonable():
    assert to_jsonable({"t": torch.tensor([1.0, float("inf")]), 3: (1, "a")}) == {
        "t": [1.0, None],
        "3": [1, "a"],
    }
    assert to_jsonable(np.float32(0.5)) == 0.5 and to_jsonable(True) is True


# ---- progress bar -----------------------------------------------------------------------------


def test_progress_disabled_passes_items_through():
    bar = progress(range(5), total=5, desc="epoch 1", disable=True)
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=1.0 / (i + 1), acc=0.5, iter_s=0.002)
    bar.close()
    assert seen == [0, 1, 2, 3, 4]


def test_progress_enabled_shows_postfix(capsys):
    with progress(iter(range(3)), total=3, desc="epoch 2", disable=False) as bar:
        for _ in bar:
            bar.set_postfix(loss=0.25, acc=0.875, iter_s=0.0125, workers=4)
    err = capsys.readouterr().err
    assert "epoch 2" in err and "3/3" in err
    assert "loss=0.2500" in err and "acc=87.50%" in err and "iter=12.5ms" in err and "workers=4" in err
