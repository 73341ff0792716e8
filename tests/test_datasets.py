"""Tests for torch_modularity.datasets: IDX reading, loaders, and the real fetched data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_modularity import datasets
from torch_modularity.datasets import (
    data_dir,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)

STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape
    )
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """Write ``arr`` as an IDX file, gzipped when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(arr)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_split(directory: Path, split: str, n: int, gz: bool, seed: int, n_labels: int | None = None):
    """Write a synthetic split (n images of 28x28, labels 0-9); return the arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, size=n_labels if n_labels is not None else n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    img_stem, lbl_stem = STEMS[split]
    write_idx(directory / f"{img_stem}{suffix}", images)
    write_idx(directory / f"{lbl_stem}{suffix}", labels)
    return images, labels


# ----------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("name", ["arr-idx3-ubyte", "arr-idx3-ubyte.gz"])
@pytest.mark.parametrize("shape", [(7,), (5, 3, 4), (2, 1, 3, 2)])
def test_read_idx_round_trip(tmp_path, name, shape):
    arr = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / name, arr))
    assert out.dtype == np.uint8
    assert out.shape == shape
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable
    out[...] = 0  # a copy, safe to modify
    assert read_idx(str(tmp_path / name)).shape == shape  # str paths work too


@pytest.mark.parametrize(
    "header",
    [
        bytes([1, 0, 0x08, 1]),  # first magic byte not zero
        bytes([0, 1, 0x08, 1]),  # second magic byte not zero
        bytes([0, 0, 0x0D, 1]),  # float32 type, unsupported
        b"\x89PNG",  # not IDX at all
    ],
)
def test_read_idx_bad_magic(tmp_path, header):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(header + (3).to_bytes(4, "big") + b"\x01\x02\x03")
    with pytest.raises(ValueError, match="corrupt or not an IDX file"):
        read_idx(path)


def test_read_idx_empty_file(tmp_path):
    path = tmp_path / "empty-idx1-ubyte"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt or not an IDX file"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_payload(tmp_path, gz):
    data = idx_bytes(np.zeros((4, 5, 6), dtype=np.uint8))[:-10]
    path = tmp_path / ("t-idx3-ubyte.gz" if gz else "t-idx3-ubyte")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    with pytest.raises(ValueError, match="truncated") as info:
        read_idx(path)
    assert "fetch" in str(info.value) and "make data" in str(info.value)


def test_read_idx_trailing_bytes_and_short_header(tmp_path):
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match="corrupt"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))  # 3 dims declared, header cut short
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_read_idx_cut_gzip_stream(tmp_path):
    path = write_idx(tmp_path / "cut-idx3-ubyte.gz", np.ones((50, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="fetch"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    path = tmp_path / "nope" / "train-images-idx3-ubyte"
    with pytest.raises(FileNotFoundError, match="make data") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- data_dir


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_MODULARITY_DATA", str(tmp_path))
    assert data_dir() == tmp_path


def test_data_dir_checkout(monkeypatch):
    monkeypatch.delenv("TORCH_MODULARITY_DATA", raising=False)
    checkout = Path(datasets.__file__).resolve().parent.parent
    if (checkout / "setup.cfg").is_file():
        assert data_dir() == checkout / "data"
    else:
        assert data_dir() == Path.cwd() / "data"


def test_data_dir_installed(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_MODULARITY_DATA", raising=False)
    fake = tmp_path / "site-packages" / "torch_modularity" / "datasets.py"
    fake.parent.mkdir(parents=True)
    monkeypatch.setattr(datasets, "__file__", str(fake))
    monkeypatch.chdir(tmp_path)
    assert data_dir() == tmp_path / "data"


# ----------------------------------------------------------------------------- loaders

LOADERS = [
    pytest.param(load_mnist, "mnist", False, id="mnist-plain"),
    pytest.param(load_mnist, "mnist", True, id="mnist-gz"),
    pytest.param(load_fashion_mnist, "fashion-mnist", True, id="fashion-gz"),
    pytest.param(load_fashion_mnist, "fashion-mnist", False, id="fashion-plain"),
]


@pytest.mark.parametrize("loader, subdir, gz", LOADERS)
def test_loader_synthetic_root(tmp_path, loader, subdir, gz):
    imgs_tr, lbls_tr = make_split(tmp_path / subdir, "train", 6, gz, seed=1)
    imgs_te, lbls_te = make_split(tmp_path / subdir, "test", 4, gz, seed=2)

    x, y = loader("train", root=tmp_path)
    assert x.shape == (6, 28, 28) and x.dtype == torch.float32
    assert y.shape == (6,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(x.numpy(), imgs_tr.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y.numpy(), lbls_tr.astype(np.int64))

    x, y = loader("test", root=str(tmp_path), flatten=True, normalize=False)
    assert x.shape == (4, 784) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), imgs_te.reshape(4, 784).astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), lbls_te.astype(np.int64))


@pytest.mark.parametrize("loader, subdir, gz", LOADERS[::2])
def test_loader_env_root(tmp_path, monkeypatch, loader, subdir, gz):
    imgs, lbls = make_split(tmp_path / subdir, "test", 3, gz, seed=3)
    monkeypatch.setenv("TORCH_MODULARITY_DATA", str(tmp_path))
    x, y = loader("test", flatten=True)
    assert x.shape == (3, 784) and y.tolist() == lbls.tolist()
    np.testing.assert_array_equal(x.numpy(), imgs.reshape(3, -1).astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("loader, subdir, gz", LOADERS[::2])
def test_loader_label_count_mismatch(tmp_path, loader, subdir, gz):
    make_split(tmp_path / subdir, "train", 5, gz, seed=4, n_labels=4)
    with pytest.raises(ValueError, match="disagree"):
        loader("train", root=tmp_path)


@pytest.mark.parametrize("loader", [load_mnist, load_fashion_mnist])
@pytest.mark.parametrize("split", ["val", "Train", "t10k", ""])
def test_loader_bad_split(tmp_path, loader, split):
    with pytest.raises(ValueError, match="split"):
        loader(split, root=tmp_path)


@pytest.mark.parametrize(
    "loader, missing",
    [
        (load_mnist, "mnist/train-images-idx3-ubyte"),
        (load_fashion_mnist, "fashion-mnist/train-images-idx3-ubyte.gz"),
    ],
)
def test_loader_missing_file(tmp_path, loader, missing):
    with pytest.raises(FileNotFoundError) as info:
        loader("train", root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / missing) in msg
    assert "run `make data` (or `bash scripts/fetch_data.sh`)" in msg
    assert "TORCH_MODULARITY_DATA" in msg


def test_loader_missing_labels_only(tmp_path):
    make_split(tmp_path / "mnist", "test", 2, False, seed=5)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist("test", root=tmp_path)


# ----------------------------------------------------------------------------- real data
# No skip: CI fetches the data (`make data`) before running the tests.


def test_real_mnist():
    x, y = load_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert abs(float(x.mean()) - 0.1325) < 1e-3
    assert torch.bincount(y, minlength=10).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009
    ]
    train_labels = read_idx(data_dir() / "mnist" / "train-labels-idx1-ubyte")
    assert train_labels.shape == (60000,)
    assert train_labels[:6].tolist() == [5, 0, 4, 1, 9, 2]


def test_real_fashion_mnist():
    x, y = load_fashion_mnist("test", flatten=True)
    assert x.shape == (10000, 784) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10
    train_labels = read_idx(data_dir() / "fashion-mnist" / "train-labels-idx1-ubyte.gz")
    assert train_labels.shape == (60000,)
    assert train_labels[:6].tolist() == [9, 0, 0, 3, 0, 2]
