"""The direct file readers return exactly torchvision's tensors on the real files, refuse
truncated or foreign files as corrupt, and never write into the data folder."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from common.data import load_dataset
from common.datafiles import read_cifar10, read_mnist
from common.errors import DataError


@pytest.mark.parametrize("name", ["mnist", "fashionmnist", "cifar10"])
@pytest.mark.parametrize("train", [True, False])
def test_same_arrays_as_torchvision(data_dir, name, train):
    import torchvision

    cls = {
        "mnist": torchvision.datasets.MNIST,
        "fashionmnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]
    ref = cls(data_dir, train=train, download=False)
    if name == "cifar10":
        x, y = read_cifar10(os.path.join(data_dir, "cifar-10-batches-py"), train)
    else:
        x, y = read_mnist(os.path.join(data_dir, cls.__name__, "raw"), name, train)
    np.testing.assert_array_equal(x, np.asarray(ref.data))
    np.testing.assert_array_equal(y, np.asarray(ref.targets))


def _copy(data_dir, tmp_path, name):
    dst = tmp_path / "data"
    shutil.copytree(os.path.join(data_dir, name), dst / name)
    return dst


def _listing(root):
    return sorted((p, os.path.getsize(os.path.join(p, f))) for p, _, fs in os.walk(root) for f in fs)


def test_a_truncated_idx_file_is_corrupt_and_nothing_is_written(data_dir, tmp_path):
    root = _copy(data_dir, tmp_path, "MNIST")
    path = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    before = _listing(root)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is corrupt"):
        load_dataset("mnist", str(root), False)
    assert _listing(root) == before


def test_a_foreign_cifar_pickle_is_refused(data_dir, tmp_path):
    import pickle

    root = _copy(data_dir, tmp_path, "cifar-10-batches-py")
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": torch.zeros(2)}))
    with pytest.raises(DataError, match="test_batch is corrupt"):
        load_dataset("cifar10", str(root), False)


def test_a_missing_folder_is_reported_and_left_alone(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="could not be downloaded"):
        load_dataset("fashionmnist", str(empty), True)
    assert os.listdir(empty) == []  # no half-made folders
