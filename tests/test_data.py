"""Offline datasets: IDX reading, dataset bundles, and the shared deterministic batch order."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from sazd.data import (
    DEFAULT_DIRS,
    IDX_FILES,
    DatasetNotFoundError,
    batches,
    epoch_permutation,
    load_dataset,
    num_batches,
    read_idx,
    write_idx,
)

FASHION = DEFAULT_DIRS["fashion-mnist"]


def _write_dataset(directory: Path, n_train: int = 50, n_test: int = 20, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, size=(n_train, 6, 5), dtype=np.uint8),
        "train_y": rng.integers(0, 4, size=n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, size=(n_test, 6, 5), dtype=np.uint8),
        "test_y": rng.integers(0, 4, size=n_test, dtype=np.uint8),
    }
    arrays["train_y"][:4] = np.arange(4)  # every class present
    directory.mkdir(parents=True, exist_ok=True)
    for split, stem in IDX_FILES.items():
        write_idx(directory / (stem + (".gz" if gz else "")), arrays[split])
    return arrays


# ---- IDX --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "dtype, shape",
    [
        (np.uint8, (7, 4, 3)),
        (np.int8, (5,)),
        (np.int16, (3, 2)),
        (np.int32, (2, 2, 2, 2)),
        (np.float32, (4, 6)),
        (np.float64, (3,)),
    ],
)
def test_idx_round_trip(tmp_path, suffix, dtype, shape):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(shape) * 100).astype(dtype)
    path = write_idx(tmp_path / f"a.idx{suffix}", values)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    out = read_idx(path)
    assert tuple(out.shape) == shape
    assert out.dtype == torch.from_numpy(values).dtype
    np.testing.assert_array_equal(out.numpy(), values)


def test_idx_header_bytes_are_big_endian(tmp_path):
    path = write_idx(tmp_path / "x", np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int16))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0B, 2])
    assert raw[4:12] == bytes([0, 0, 0, 2, 0, 0, 0, 3])
    assert raw[12:14] == bytes([0, 1])  # first value, big-endian int16


def test_idx_truncated_payload_refused(tmp_path):
    raw = write_idx(tmp_path / "ok", np.zeros((10, 4, 4), dtype=np.uint8)).read_bytes()
    bad = tmp_path / "short-idx3-ubyte"
    bad.write_bytes(raw[:-7])
    with pytest.raises(ValueError, match=r"short-idx3-ubyte.*truncated.*\(10, 4, 4\)"):
        read_idx(bad)
    extra = tmp_path / "long"
    extra.write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(extra)


def test_idx_truncated_header_and_bad_magic_refused(tmp_path):
    raw = write_idx(tmp_path / "ok", np.zeros((10, 4, 4), dtype=np.uint8)).read_bytes()
    (tmp_path / "hdr").write_bytes(raw[:9])
    with pytest.raises(ValueError, match="truncated header"):
        read_idx(tmp_path / "hdr")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(tmp_path / "tiny")
    (tmp_path / "magic").write_bytes(b"\x00\x00\x07\x01" + raw[4:])
    with pytest.raises(ValueError, match="bad magic number 00000701"):
        read_idx(tmp_path / "magic")
    (tmp_path / "text.gz").write_bytes(gzip.compress(b"hello world, not an idx file"))
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(tmp_path / "text.gz")


def test_idx_corrupt_gzip_refused(tmp_path):
    raw = write_idx(tmp_path / "ok.gz", np.arange(4000, dtype=np.int32)).read_bytes()
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz.*corrupt or truncated gzip"):
        read_idx(tmp_path / "cut.gz")


# ---- datasets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_from_dir(tmp_path, gz):
    arrays = _write_dataset(tmp_path, gz=gz)
    for name in ("mnist", "kmnist", "idx"):
        b = load_dataset(name, data_dir=tmp_path)
        assert b.name == name and b.in_shape == (1, 6, 5)
        assert b.train_x.shape == (50, 1, 6, 5) and b.test_x.shape == (20, 1, 6, 5)
        assert b.train_x.dtype == torch.float32 and b.train_y.dtype == torch.int64
        np.testing.assert_array_equal(b.train_y.numpy(), arrays["train_y"])
        # images are x/255 standardised by the training mean/std: undo it and compare to the file
        pixels = arrays["train_x"].astype(np.float64) / 255
        assert b.mean == pytest.approx(pixels.mean(), rel=1e-12)
        assert b.std == pytest.approx(pixels.std(ddof=1), rel=1e-12)
        back = b.test_x.double().squeeze(1).numpy() * b.std + b.mean
        np.testing.assert_allclose(back, arrays["test_x"] / 255, atol=1e-6)
    assert load_dataset("mnist", data_dir=tmp_path).num_classes == 10
    assert load_dataset("idx", data_dir=tmp_path).num_classes == 4  # max label + 1


def test_float64_bundle_matches_float32(tmp_path):
    _write_dataset(tmp_path)
    b32 = load_dataset("idx", data_dir=tmp_path)
    b64 = load_dataset("idx", data_dir=tmp_path, dtype=torch.float64)
    assert b64.train_x.dtype == torch.float64
    torch.testing.assert_close(b64.train_x.float(), b32.train_x)
    assert b64.to(dtype=torch.float32).train_x.dtype == torch.float32


def test_missing_dir_message_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "train-images-idx3-ubyte" in msg
    assert isinstance(info.value, ValueError)  # the CLI reports ValueErrors cleanly

    _write_dataset(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"\['t10k-labels-idx1-ubyte'\]"):
        load_dataset("mnist", data_dir=tmp_path / "partial")
    with pytest.raises(ValueError, match=r"mnist.*--data-dir"):
        load_dataset("mnist")


def test_mismatched_or_bad_files_refused(tmp_path):
    arrays = _write_dataset(tmp_path, gz=False)
    write_idx(tmp_path / IDX_FILES["train_y"], arrays["train_y"][:-1])
    with pytest.raises(ValueError, match=r"train images.*labels.*do not match"):
        load_dataset("mnist", data_dir=tmp_path)


def test_bad_arguments_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown name 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match=r"train_limit: 5000 .*\[1, 1437\]"):
        load_dataset("digits", train_limit=5000)
    with pytest.raises(ValueError, match="test_limit: 0"):
        load_dataset("digits", test_limit=0)
    with pytest.raises(ValueError, match="seed: -1"):
        load_dataset("digits", seed=-1)


def test_digits():
    b = load_dataset("digits")
    assert b.in_shape == (1, 8, 8) and b.num_classes == 10
    assert b.n_train == 1437 and b.n_test == 360
    assert set(b.train_y.tolist()) == set(range(10)) and set(b.test_y.tolist()) == set(range(10))
    assert abs(float(b.train_x.mean())) < 1e-5 and float(b.train_x.std()) == pytest.approx(1.0, abs=1e-4)
    again = load_dataset("digits")
    assert torch.equal(b.train_x, again.train_x) and torch.equal(b.test_y, again.test_y)


def test_limits_are_seeded_subsets():
    full = load_dataset("digits")
    a = load_dataset("digits", train_limit=300, test_limit=50, seed=3)
    b = load_dataset("digits", train_limit=300, test_limit=50, seed=3)
    c = load_dataset("digits", train_limit=300, test_limit=50, seed=4)
    assert a.n_train == 300 and a.n_test == 50
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_y, c.train_y)
    # every kept training sample is a row of the full set (same pixels before standardisation)
    raw_full = full.train_x.double() * full.std + full.mean
    raw_a = a.train_x.double() * a.std + a.mean
    dist = torch.cdist(raw_a.flatten(1), raw_full.flatten(1)).min(dim=1).values
    assert float(dist.max()) < 1e-4


def test_fashion_mnist_installed():
    # The setup command installs dataset-fashion-mnist; the project depends on it being there.
    assert FASHION.is_dir(), f"{FASHION} missing: run `apt-get install dataset-fashion-mnist`"
    b = load_dataset("fashion-mnist")
    assert b.n_train == 60000 and b.n_test == 10000
    assert b.in_shape == (1, 28, 28) and b.num_classes == 10
    assert torch.equal(b.train_y.bincount(), torch.full((10,), 6000))
    assert torch.equal(b.test_y.bincount(), torch.full((10,), 1000))
    assert abs(float(b.train_x.mean())) < 1e-4 and float(b.train_x.std()) == pytest.approx(1.0, abs=1e-4)
    assert 0.2 < b.mean < 0.4 and 0.2 < b.std < 0.5  # Fashion-MNIST pixel stats (~0.286, ~0.353)


# ---- batches ----------------------------------------------------------------------------------


def test_batches_deterministic_and_cover_epoch():
    x = torch.arange(103, dtype=torch.float32).reshape(103, 1) * 10
    y = torch.arange(103)
    first = list(batches(x, y, 10, seed=7, epoch=2))
    again = list(batches(x, y, 10, seed=7, epoch=2))
    assert len(first) == num_batches(103, 10) == 10
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 0], ya.float() * 10)  # images and labels stay paired
    seen = torch.cat([yb for _, yb in first])
    assert len(set(seen.tolist())) == 100  # drop_last: 100 distinct samples, 3 dropped
    assert torch.equal(seen, epoch_permutation(103, 7, 2)[:100])

    other_epoch = torch.cat([yb for _, yb in batches(x, y, 10, seed=7, epoch=3)])
    other_seed = torch.cat([yb for _, yb in batches(x, y, 10, seed=8, epoch=2)])
    assert not torch.equal(seen, other_epoch) and not torch.equal(seen, other_seed)

    kept = list(batches(x, y, 10, seed=7, epoch=2, drop_last=False))
    assert len(kept) == num_batches(103, 10, drop_last=False) == 11 and len(kept[-1][1]) == 3
    assert sorted(torch.cat([yb for _, yb in kept]).tolist()) == list(range(103))


def test_batches_resume_from_offset():
    x, y = torch.randn(64, 3), torch.arange(64)
    full = list(batches(x, y, 8, seed=1, epoch=0))
    resumed = list(batches(x, y, 8, seed=1, epoch=0, start=5))
    assert len(resumed) == 3
    for (xa, ya), (xb, yb) in zip(full[5:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert list(batches(x, y, 8, seed=1, epoch=0, start=8)) == []


def test_batches_bad_arguments():
    x, y = torch.randn(10, 2), torch.arange(10)
    with pytest.raises(ValueError, match="batch_size: 0"):
        batches(x, y, 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match=r"start: 6 .*\[0, 5\]"):
        batches(x, y, 2, seed=0, epoch=0, start=6)
    with pytest.raises(ValueError, match="10 samples vs 9 labels"):
        batches(x, y[:9], 2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="epoch: -1"):
        batches(x, y, 2, seed=0, epoch=-1)
