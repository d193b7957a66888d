"""The dataset files read directly: MNIST / FashionMNIST idx files and CIFAR-10's pickled
batches, in torchvision's folder layout, without importing torchvision (~2 s per process,
which a deployment ClientApp would pay on every message).

Every file is checked before it is used: the idx header's shape must match the file's
size and the known number of examples, CIFAR-10 batches must hold 10,000 images of
3x32x32 with labels in 0..9. A truncated or foreign file is reported as *corrupt*, with its
path; a missing one as *missing*. Nothing is ever written into the data folder here.
CIFAR-10's batches are Python pickles: they are read with an unpickler that accepts
nothing but NumPy arrays, lists, dicts and strings.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle

import numpy as np

from common.errors import DataError

MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}
EXPECTED_SIZE = {True: {"mnist": 60000, "fashionmnist": 60000, "cifar10": 50000},
                 False: {"mnist": 10000, "fashionmnist": 10000, "cifar10": 10000}}  # fmt: skip


class MissingDataError(DataError):
    """A dataset file is not where torchvision's layout puts it."""


def _open(path: str) -> bytes:
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            try:
                with open(candidate, "rb") as fh:
                    raw = fh.read()
                return gzip.decompress(raw) if candidate.endswith(".gz") else raw
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise DataError(f"{candidate} is corrupt: {exc}") from None
    raise MissingDataError(f"{path} is missing")


def read_idx(path: str, *, dims: int, count: int) -> np.ndarray:
    """An idx file (LeCun's format) of unsigned bytes with ``dims`` dimensions and ``count`` items."""
    data = _open(path)
    if len(data) < 4 + 4 * dims:
        raise DataError(f"{path} is corrupt: {len(data)} bytes, shorter than its header")
    magic = int.from_bytes(data[0:4], "big")
    if magic != 0x0800 + dims:
        raise DataError(
            f"{path} is corrupt: magic number {magic:#x}, expected {0x0800 + dims:#x} (unsigned bytes, {dims}-d)"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = 4 + 4 * dims + int(np.prod(shape))
    if len(data) != expected or shape[0] != count:
        raise DataError(
            f"{path} is corrupt: {len(data)} bytes for shape {shape} (expected {expected} bytes and {count} items)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def read_mnist(folder: str, name: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images ``[N, 28, 28]`` uint8, labels ``[N]`` int64) of MNIST or FashionMNIST."""
    images, labels = MNIST_FILES[train]
    count = EXPECTED_SIZE[train][name]
    x = read_idx(os.path.join(folder, images), dims=3, count=count)
    y = read_idx(os.path.join(folder, labels), dims=1, count=count).astype(np.int64)
    if x.shape[1:] != (28, 28):
        raise DataError(f"{os.path.join(folder, images)} is corrupt: images of {x.shape[1:]}, expected 28x28")
    return x, y


class _ArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays and plain containers, nothing that could run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a dataset file")


def read_cifar10(folder: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images ``[N, 32, 32, 3]`` uint8, labels ``[N]`` int64), torchvision's layout and order."""
    xs, ys = [], []
    for name in CIFAR_FILES[train]:
        path = os.path.join(folder, name)
        data = _open(path)
        try:
            batch = _ArraysOnly(io.BytesIO(data), encoding="latin1").load()
            x = np.asarray(batch["data"], dtype=np.uint8)
            y = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
        except Exception as exc:
            raise DataError(f"{path} is corrupt: {type(exc).__name__}: {exc}") from None
        if x.shape != (10000, 3072) or y.shape != (10000,) or y.min() < 0 or y.max() > 9:
            raise DataError(f"{path} is corrupt: images {x.shape}, labels {y.shape}; expected 10000 of each")
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(y)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)
