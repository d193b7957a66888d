"""Datasets: torchvision MNIST, FashionMNIST and CIFAR-10 as in-memory tensors.

Files are read from a data directory in torchvision's layout (``MNIST/raw``,
``FashionMNIST/raw``, ``cifar-10-batches-py``); ``ADADPIGU_DATA_DIR`` or the
``data-dir`` setting points there. When they are missing a download is tried; without
a network the error says exactly where the files must go.

Splits (DESIGN.md §4): the training set is divided into a training part and a
validation part (model selection); the test set is used for reporting only.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

import torch

from common.errors import DataError
from common.scatter import FEATURES

_FOLDERS = {"mnist": "MNIST/raw", "fashionmnist": "FashionMNIST/raw", "cifar10": "cifar-10-batches-py"}
_NORMALIZE = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashionmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass(frozen=True)
class TensorData:
    """Inputs ``x`` (float32, normalized, NCHW) and integer labels ``y``."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"{self.x.shape[0]} inputs but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: torch.Tensor) -> TensorData:
        return TensorData(self.x[index], self.y[index])

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(self.x.to(device), self.y.to(device))


def _read_files(name: str, root: str, train: bool):
    from common import datafiles

    folder = os.path.join(root, _FOLDERS[name])
    if name == "cifar10":
        return datafiles.read_cifar10(folder, train)
    return datafiles.read_mnist(folder, name, train)


@functools.lru_cache(maxsize=8)
def load_dataset(name: str, data_dir: str, train: bool) -> TensorData:
    """Load a whole split into memory (cached per process), reading the files directly
    (:mod:`common.datafiles`); missing files are downloaded when a network allows."""
    from common.datafiles import MissingDataError

    if name not in _FOLDERS:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(_FOLDERS)})")
    root = os.path.abspath(os.path.expanduser(data_dir))
    try:
        images, labels = _read_files(name, root, train)
    except MissingDataError as missing:
        _try_download(name, root, missing)
        images, labels = _read_files(name, root, train)
    x = torch.from_numpy(images.copy()).float().div_(255.0)
    y = torch.from_numpy(labels.copy())
    if x.ndim == 3:  # N, H, W (MNIST family)
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[-1] == 3:  # N, H, W, C (CIFAR)
        x = x.permute(0, 3, 1, 2).contiguous()
    mean, std = _NORMALIZE[name]
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    x = (x - m) / s
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DataError(f"{name} labels under {root} are outside 0..9: the files are corrupt")
    return TensorData(x.contiguous(), y)


def with_features(data: TensorData, features: str, label: str = "data", *, schema=None) -> TensorData:
    """``data`` as the model sees it: the images (``pixels``) or their ScatterNet features
    (``scatter``, :mod:`common.scatter`, from its disk cache when computed before). Applied
    after subsetting, so a subset costs only its own examples."""
    if features not in FEATURES:
        raise DataError(f"unknown features '{features}' (known: {', '.join(FEATURES)})")
    if features == "pixels":
        return data
    if schema is not None and schema.kind != "image":
        raise DataError(
            f"features = 'scatter' transforms images; the schema '{schema.name}' is a {schema.kind}"
        )
    from common.scatter import cached_scatter_features

    return TensorData(cached_scatter_features(data.x, label=label), data.y)


def _try_download(name: str, root: str, missing: Exception) -> None:
    """torchvision's download into a temporary folder, copied into ``root`` only when whole:
    a failed download leaves the data folder as it was."""
    import shutil
    import tempfile

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    tmp = tempfile.mkdtemp(prefix="adadpigu-download-")
    try:
        import torchvision

        cls = {
            "mnist": torchvision.datasets.MNIST,
            "fashionmnist": torchvision.datasets.FashionMNIST,
            "cifar10": torchvision.datasets.CIFAR10,
        }[name]
        for train in (True, False):
            cls(tmp, train=train, download=True)
    except Exception as exc:
        raise DataError(
            f"{name} is not under {os.path.join(root, _FOLDERS[name])} ({missing}) and could not be "
            f"downloaded ({type(exc).__name__}). Put torchvision's files there (or set "
            "ADADPIGU_DATA_DIR / data-dir to a folder that has them)."
        ) from None
    finally:
        socket.setdefaulttimeout(old)
    try:
        shutil.copytree(
            os.path.join(tmp, _FOLDERS[name]), os.path.join(root, _FOLDERS[name]), dirs_exist_ok=True
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_validation_split(
    n: int, validation_fraction: float, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split of ``range(n)`` into (train, validation) index tensors."""
    if n <= 0:
        raise DataError("cannot split an empty dataset")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(validation_fraction * n))
    if validation_fraction > 0 and n_val == 0:
        n_val = 1
    if n - n_val <= 0:
        raise DataError(f"validation fraction {validation_fraction} leaves no training data out of {n}")
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def take_subset(data: TensorData, size: int, *, seed: int = 0) -> TensorData:
    """A fixed random subset of ``size`` examples (``0`` = everything)."""
    if size <= 0 or size >= len(data):
        return data
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[:size].sort().values)


@dataclass(frozen=True)
class Splits:
    train: TensorData
    validation: TensorData
    test: TensorData


def load_splits(
    name: str,
    data_dir: str,
    *,
    validation_fraction: float = 0.1,
    train_subset: int = 0,
    test_subset: int = 0,
    features: str = "pixels",
) -> Splits:
    """Train / validation / test splits for centralized training."""
    full = with_features(
        take_subset(load_dataset(name, data_dir, True), train_subset), features, f"{name}-train"
    )
    train_idx, val_idx = train_validation_split(len(full), validation_fraction)
    test = with_features(
        take_subset(load_dataset(name, data_dir, False), test_subset), features, f"{name}-test"
    )
    return Splits(full.subset(train_idx), full.subset(val_idx), test)
