"""Offline loaders for MNIST and Fashion-MNIST stored as raw IDX files.

The files are fetched once with ``make data`` (or ``bash scripts/fetch_data.sh``)
into a data directory (see :func:`data_dir`) and read here with numpy only; no
torchvision and no network access are needed at load time.

Layout of the data directory::

    <data>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte            (plain or .gz)
    <data>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (.gz or plain)

Example:
    >>> from torch_modularity.datasets import load_mnist
    >>> x, y = load_mnist("test", flatten=True)  # doctest: +SKIP
    >>> x.shape, x.dtype, y.dtype                 # doctest: +SKIP
    (torch.Size([10000, 784]), torch.float32, torch.int64)
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FETCH_HINT",
    "data_dir",
    "read_idx",
    "load_mnist",
    "load_fashion_mnist",
]

FETCH_HINT = (
    "run `make data` (or `bash scripts/fetch_data.sh`), or set "
    "TORCH_MODULARITY_DATA to a directory holding the IDX files"
)
"""How to obtain the dataset files; appended to error messages."""


def data_dir() -> Path:
    """Return the directory holding the datasets.

    The environment variable ``TORCH_MODULARITY_DATA`` wins when set (and
    non-empty). Otherwise, in a development checkout (the package's parent
    directory contains ``setup.cfg``) it is ``<checkout>/data``; in any other
    install it is ``data`` under the current working directory.

    Example:
        >>> data_dir() / "mnist"  # with TORCH_MODULARITY_DATA=/srv/idx  # doctest: +SKIP
        PosixPath('/srv/idx/mnist')

    Returns:
        The data directory. It is not checked for existence.
    """
    env = os.environ.get("TORCH_MODULARITY_DATA")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "setup.cfg").is_file():
        return checkout / "data"
    return Path.cwd() / "data"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file of unsigned bytes into a numpy array.

    The file is decompressed with gzip when its name ends in ``.gz``. The
    header is validated: magic number ``0x00 0x00 0x08 ndim`` (only the uint8
    type is supported) followed by one big-endian 32-bit size per dimension,
    and the payload must hold exactly the product of the sizes.

    Example:
        >>> y = read_idx("data/mnist/t10k-labels-idx1-ubyte")  # doctest: +SKIP
        >>> y.shape, y.dtype                                    # doctest: +SKIP
        ((10000,), dtype('uint8'))

    Args:
        path: Path to the IDX file, plain or gzip-compressed (``.gz``).

    Returns:
        A writable ``uint8`` array (a copy) with the shape declared in the header.

    Raises:
        FileNotFoundError: The file does not exist; the message says how to fetch it.
        ValueError: The file is not an IDX file of uint8, or is truncated/corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}; {FETCH_HINT}")
    refetch = f"delete {path.parent} and re-run the fetch: {FETCH_HINT}"
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a cut-off gzip stream raises EOFError.
        raise ValueError(
            f"truncated or corrupt IDX file: {path} ({exc}); {refetch}"
        ) from exc

    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(
            f"corrupt or not an IDX file: {path} (expected magic bytes "
            f"00 00 08 <ndim> for uint8 data, got {data[:4].hex(' ') or 'an empty file'})"
        )
    ndim = data[3]
    if ndim == 0:
        raise ValueError(f"corrupt or not an IDX file: {path} (header declares 0 dimensions)")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(
            f"truncated or corrupt IDX file: {path} (header cut short: {len(data)} bytes "
            f"for {ndim} dimensions); {refetch}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    actual = len(data) - offset
    if actual != expected:
        raise ValueError(
            f"truncated or corrupt IDX file: {path} (header declares shape {dims}, i.e. "
            f"{expected} bytes, but the payload holds {actual} bytes); {refetch}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()


def _find(directory: Path, stem: str, prefer_gz: bool) -> Path:
    """Return ``directory/stem`` or its ``.gz`` variant, whichever exists first."""
    plain, gz = directory / stem, directory / f"{stem}.gz"
    candidates = (gz, plain) if prefer_gz else (plain, gz)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    other = candidates[1].name
    raise FileNotFoundError(
        f"dataset file not found: {candidates[0]} (nor {other}); {FETCH_HINT}"
    )


def _load(
    subdir: str,
    prefer_gz: bool,
    split: str,
    root: str | os.PathLike[str] | None,
    flatten: bool,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared body of :func:`load_mnist` and :func:`load_fashion_mnist`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = (Path(root).expanduser() if root is not None else data_dir()) / subdir
    prefix = "train" if split == "train" else "t10k"
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte", prefer_gz)
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte", prefer_gz)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(
            f"expected a 3-d image file (N, rows, cols), got shape {images.shape}: {images_path}"
        )
    if labels.ndim != 1:
        raise ValueError(f"expected a 1-d label file, got shape {labels.shape}: {labels_path}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"image and label counts disagree: {images.shape[0]} images in {images_path} "
            f"but {labels.shape[0]} labels in {labels_path}"
        )
    x = torch.from_numpy(images).to(torch.float32)
    if normalize:
        x.div_(255.0)
    if flatten:
        x = x.reshape(x.shape[0], -1)
    y = torch.from_numpy(labels).to(torch.int64)
    return x, y


def load_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    flatten: bool = False,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST handwritten digits from ``<root>/mnist``.

    Reads the four standard IDX files (plain, or ``.gz`` if only those exist):
    60,000 training and 10,000 test images of 28x28 pixels, labels 0-9, in
    the canonical order.

    Example:
        >>> x, y = load_mnist("test")  # doctest: +SKIP
        >>> x.shape, y[:3].tolist()    # doctest: +SKIP
        (torch.Size([10000, 28, 28]), [7, 2, 1])

    Args:
        split: ``"train"`` or ``"test"``.
        root: Data directory; defaults to :func:`data_dir`.
        flatten: Return images as ``(N, 784)`` instead of ``(N, 28, 28)``.
        normalize: Scale pixels to ``[0, 1]`` (pixel / 255); otherwise keep 0-255.

    Returns:
        ``(images, labels)``: float32 images and int64 labels.

    Raises:
        ValueError: Unknown split, corrupt files, or image/label counts disagree.
        FileNotFoundError: A file is missing; the message names it and how to fetch it.
    """
    return _load("mnist", False, split, root, flatten, normalize)


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    flatten: bool = False,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load Fashion-MNIST (Zalando) from ``<root>/fashion-mnist``.

    Reads the four standard gzipped IDX files (or plain ones if only those
    exist): 60,000 training and 10,000 test images of 28x28 pixels, 10 clothing
    classes, in the canonical order.

    Example:
        >>> x, y = load_fashion_mnist("train", flatten=True)  # doctest: +SKIP
        >>> x.shape, y[:3].tolist()                           # doctest: +SKIP
        (torch.Size([60000, 784]), [9, 0, 0])

    Args:
        split: ``"train"`` or ``"test"``.
        root: Data directory; defaults to :func:`data_dir`.
        flatten: Return images as ``(N, 784)`` instead of ``(N, 28, 28)``.
        normalize: Scale pixels to ``[0, 1]`` (pixel / 255); otherwise keep 0-255.

    Returns:
        ``(images, labels)``: float32 images and int64 labels.

    Raises:
        ValueError: Unknown split, corrupt files, or image/label counts disagree.
        FileNotFoundError: A file is missing; the message names it and how to fetch it.
    """
    return _load("fashion-mnist", True, split, root, flatten, normalize)
