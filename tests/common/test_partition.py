"""Cross-silo splits (flwr-datasets partitioners): deterministic, disjoint, covering, skewed as asked."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from common import partition as P
from common.config import TrainConfig
from common.errors import DataError
from common.partition import label_distribution, partition_indices, skew_statistic


def iid_partitions(n: int, num_partitions: int, *, seed: int = 0) -> list[torch.Tensor]:
    """Oracle: the original torch-only IID split (disjoint near-equal shards of a seeded permutation)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [p.sort().values for p in torch.tensor_split(perm, num_partitions)]


ALL = ("iid", "dirichlet", "pathological", "size-skew")


def synthetic_labels(n: int = 6000, classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def mnist_train_labels(data_dir: str) -> torch.Tensor:
    """The 60,000 MNIST training labels, read straight from the idx file (no images)."""
    raw = np.fromfile(os.path.join(data_dir, "MNIST", "raw", "train-labels-idx1-ubyte"), dtype=np.uint8)
    return torch.from_numpy(raw[8:].astype(np.int64))


@pytest.fixture(autouse=True)
def fresh_cache():
    P.clear_cache()
    yield
    P.clear_cache()


@pytest.mark.parametrize("name", ALL)
def test_split_is_deterministic_by_seed(name):
    # Prepare
    y = synthetic_labels()
    cfg = TrainConfig(partitioner=name, seed=3, alpha=0.5, classes_per_silo=2)
    # Execute
    first = partition_indices(y, 10, cfg)
    P.clear_cache()
    again = partition_indices(y, 10, cfg)
    P.clear_cache()
    other = partition_indices(y, 10, cfg.replace(seed=4))
    P.clear_cache()
    unseeded = partition_indices(y, 10, cfg.replace(seed=-1))
    P.clear_cache()
    seed0 = partition_indices(y, 10, cfg.replace(seed=0))
    # Assert
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(unseeded, seed0, strict=True))


@pytest.mark.parametrize("name", ALL)
def test_split_is_sorted_disjoint_covering_and_respects_min_size(name):
    # Prepare
    y = synthetic_labels(n=5003)
    cfg = TrainConfig(partitioner=name, seed=1, alpha=0.3, classes_per_silo=2, min_silo_size=40)
    # Execute
    parts = partition_indices(y, 10, cfg)
    # Assert
    assert len(parts) == 10
    assert all(p.dtype == torch.int64 for p in parts)
    assert all(torch.equal(p, p.sort().values) for p in parts)
    everything = torch.cat(parts)
    assert everything.numel() == torch.unique(everything).numel()  # disjoint
    assert torch.equal(everything.sort().values, torch.arange(5003))  # covers (10 silos >= 10 classes)
    assert min(p.numel() for p in parts) >= 40


def test_iid_split_equals_the_previous_torch_split():
    # Prepare
    y = synthetic_labels(n=1001)
    # Execute
    parts = partition_indices(y, 7, TrainConfig(partitioner="iid", seed=5))
    # Assert
    assert all(torch.equal(a, b) for a, b in zip(parts, iid_partitions(1001, 7, seed=5), strict=True))
    assert {p.numel() for p in parts} == {143}


def test_dirichlet_label_skew_grows_as_alpha_falls(data_dir):
    # Prepare
    y = mnist_train_labels(data_dir)
    # Execute
    skew = {
        alpha: skew_statistic(
            label_distribution(y, partition_indices(y, 10, TrainConfig(partitioner="dirichlet", alpha=alpha)))
        )
        for alpha in (100.0, 1.0, 0.1)
    }
    iid = skew_statistic(label_distribution(y, partition_indices(y, 10, TrainConfig(partitioner="iid"))))
    # Assert
    assert iid < skew[100.0] < skew[1.0] < skew[0.1]
    assert iid < 0.05 and skew[100.0] < 0.1 and skew[0.1] > 0.5


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_at_most_k_classes_per_silo(k):
    # Prepare
    y = synthetic_labels()
    cfg = TrainConfig(partitioner="pathological", classes_per_silo=k, seed=2)
    # Execute
    dist = label_distribution(y, partition_indices(y, 10, cfg))
    # Assert
    classes_per_silo = (dist > 0).sum(axis=1)
    assert classes_per_silo.max() <= k
    assert classes_per_silo.min() >= 1


def test_size_skew_gives_unequal_sizes_with_iid_labels():
    # Prepare
    y = synthetic_labels(n=11000)
    cfg = TrainConfig(partitioner="size-skew", seed=0)
    # Execute
    parts = partition_indices(y, 10, cfg)
    sizes = [p.numel() for p in parts]
    # Assert
    assert sizes == sorted(sizes) and len(set(sizes)) == 10
    assert max(sizes) >= 9 * min(sizes)
    assert skew_statistic(label_distribution(y, parts)) < 0.1


@pytest.mark.parametrize(
    ("n", "silos", "changes", "message"),
    [
        (5, 10, {}, "only 5 examples"),
        (100, 0, {}, "num-partitions"),
        (100, 10, {"min_silo_size": 11}, "min-silo-size 11 is unreachable"),
        (1000, 10, {"partitioner": "pathological", "classes_per_silo": 11}, "classes-per-silo 11"),
        (1000, 10, {"partitioner": "size-skew", "min_silo_size": 20}, "size-skew"),
        (300, 10, {"partitioner": "dirichlet", "alpha": 0.01, "min_silo_size": 29}, "raise alpha"),
    ],
)
def test_impossible_requests_raise_a_one_line_data_error(n, silos, changes, message):
    # Prepare
    y = synthetic_labels(n=n)
    cfg = TrainConfig(seed=0).replace(**changes)
    # Execute
    with pytest.raises(DataError) as info:
        partition_indices(y, silos, cfg)
    # Assert
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_pathological_with_more_silos_per_class_than_examples_raises():
    # Prepare: two examples of class 9, but ten silos that all need class 9
    y = torch.tensor([9, 9] + [c for c in range(9) for _ in range(50)])
    cfg = TrainConfig(partitioner="pathological", classes_per_silo=10, min_silo_size=1)
    # Execute / Assert
    with pytest.raises(DataError, match="pathological"):
        partition_indices(y, 10, cfg)


def test_split_is_computed_once_per_process_and_callers_get_copies(monkeypatch):
    # Prepare
    y = synthetic_labels()
    cfg = TrainConfig(partitioner="dirichlet", alpha=0.5, seed=0)
    calls = []
    original = P._compute
    monkeypatch.setattr(P, "_compute", lambda *a: calls.append(1) or original(*a))
    # Execute
    splits = [partition_indices(y, 10, cfg) for _ in range(10)]
    splits[0][0][:] = -1  # a caller scribbling on its copy
    other_alpha = partition_indices(y, 10, cfg.replace(alpha=5.0))
    # Assert
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(splits[1], partition_indices(y, 10, cfg), strict=True))
    assert (splits[1][0] >= 0).all()
    assert any(not torch.equal(a, b) for a, b in zip(splits[1], other_alpha, strict=True))


def test_label_distribution_counts_and_skew_statistic_values():
    # Prepare
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    one_class_each = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])]
    balanced = [torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])]
    # Execute
    dist = label_distribution(y, one_class_each, num_classes=3)
    # Assert
    assert dist.tolist() == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert skew_statistic(dist) == pytest.approx(2 / 3)
    assert skew_statistic(label_distribution(y, balanced, num_classes=3)) == pytest.approx(0.0)
    with pytest.raises(DataError):
        label_distribution(y, balanced, num_classes=2)
