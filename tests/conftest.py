"""Shared fixtures. The real datasets come from ``$ADADPIGU_DATA_DIR`` (CI: ../shared/data)."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _data_dir() -> str:
    env = os.environ.get("ADADPIGU_DATA_DIR")
    if env:
        return env
    return str((ROOT / ".." / "shared" / "data").resolve())


os.environ.setdefault("ADADPIGU_DATA_DIR", _data_dir())
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> str:
    path = _data_dir()
    assert os.path.isdir(os.path.join(path, "MNIST", "raw")), (
        f"MNIST not found under {path}: set ADADPIGU_DATA_DIR to torchvision's data folder"
    )
    return path
