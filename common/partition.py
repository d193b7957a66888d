"""Cross-silo partitions of a labelled dataset.

The splits come from ``flwr-datasets`` partitioners applied to an in-memory HuggingFace
``datasets.Dataset`` built from the label tensor (columns ``label`` and ``idx``), so
nothing is downloaded from the hub. ``cfg.partitioner`` selects:

``iid``
    :class:`~flwr_datasets.partitioner.IidPartitioner` over a seeded permutation of the
    data: near-equal random shards (the first ``n % num_partitions`` silos get one
    example more). Identical to the earlier torch-only split (tests/test_partition.py keeps it as the oracle).
``dirichlet``
    :class:`~flwr_datasets.partitioner.DirichletPartitioner` (Yurochkin et al. 2019):
    per class, the shares of the silos are drawn from Dirichlet(``alpha``); small
    ``alpha`` means strong label skew. ``self_balancing=True``: a silo that already holds
    more than ``n / num_partitions`` examples gets no more classes, which keeps the silo
    sizes (and so each silo's sampling rate q) usable. The draw is repeated (at most 10
    times) until every silo holds ``min-silo-size`` examples.
``pathological``
    :class:`~flwr_datasets.partitioner.PathologicalPartitioner` (Li et al. 2021,
    arXiv 2102.02079), ``class_assignment_mode="first-deterministic"``: each silo holds
    exactly ``classes-per-silo`` classes, silo ``i`` always has class ``i % C``, the
    others are drawn at random; a class is divided evenly among the silos that hold it.
    A class no silo draws is left out (only possible when ``num_partitions`` is smaller
    than the number of classes), so this split may not cover the data.
``size-skew``
    :class:`~flwr_datasets.partitioner.LinearPartitioner` over a seeded permutation:
    silo ``i`` gets a share proportional to ``i + 1`` (silo ``M-1`` is ``M`` times larger
    than silo 0); labels stay IID. (``ExponentialPartitioner`` also exists but gives
    the first of 10 silos 0.008 % of the data, too little to train with DP.)

Every split is deterministic by seed (``cfg.seed``, or 0 when ``cfg.seed < 0``: all
processes must agree on it), returns sorted, disjoint index tensors and gives every silo
at least ``min-silo-size`` examples; an impossible request raises
:class:`~common.errors.DataError` with a one-line reason.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict

import numpy as np
import torch

from common.config import TrainConfig
from common.errors import DataError

_CACHE: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
_CACHE_SIZE = 8
_LOCK = threading.Lock()
_MAX_DIRICHLET_TRIES = 10  # fixed inside flwr-datasets' DirichletPartitioner


def partition_seed(cfg: TrainConfig) -> int:
    """The seed of the split: ``cfg.seed``, or 0 when unseeded (the split must agree across processes)."""
    return cfg.seed if cfg.seed >= 0 else 0


def partition_indices(labels: torch.Tensor, num_partitions: int, cfg: TrainConfig) -> list[torch.Tensor]:
    """Index tensors of the ``num_partitions`` silos for ``cfg.partitioner``.

    Results are cached per process (keyed by a hash of ``labels`` and the settings that
    shape the split), so ten clients in one process compute the split once. The
    returned tensors are fresh copies.
    """
    labels = torch.as_tensor(labels).reshape(-1).to("cpu", torch.int64)
    key = _cache_key(labels, num_partitions, cfg)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            _CACHE.move_to_end(key)
            return [p.clone() for p in cached]
    parts = _compute(labels, num_partitions, cfg)
    with _LOCK:
        _CACHE[key] = parts
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return [p.clone() for p in parts]


def clear_cache() -> None:
    """Forget cached splits (tests)."""
    with _LOCK:
        _CACHE.clear()


def _cache_key(labels: torch.Tensor, num_partitions: int, cfg: TrainConfig) -> tuple:
    digest = hashlib.sha256(labels.numpy().tobytes()).hexdigest()
    return (
        digest,
        int(labels.shape[0]),
        int(num_partitions),
        cfg.resolved_partitioner(),
        float(cfg.alpha),
        int(cfg.classes_per_silo),
        int(cfg.min_silo_size),
        partition_seed(cfg),
    )


def _compute(labels: torch.Tensor, num_partitions: int, cfg: TrainConfig) -> list[torch.Tensor]:
    n = int(labels.shape[0])
    seed = partition_seed(cfg)
    name = cfg.resolved_partitioner()
    if num_partitions < 1:
        raise DataError(f"num-partitions must be >= 1, got {num_partitions}")
    if name == "none":  # every data holder trains on all of the records it reads
        return [torch.arange(n) for _ in range(num_partitions)]
    if num_partitions > n:
        raise DataError(f"{num_partitions} silos but only {n} examples: every silo needs data")
    if num_partitions * cfg.min_silo_size > n:
        raise DataError(
            f"min-silo-size {cfg.min_silo_size} is unreachable: {num_partitions} silos x "
            f"{cfg.min_silo_size} > {n} examples"
        )
    if name == "pathological":
        num_classes = int(torch.unique(labels).numel())
        if cfg.classes_per_silo > num_classes:
            raise DataError(
                f"classes-per-silo {cfg.classes_per_silo} exceeds the {num_classes} classes in the data"
            )
    if name == "size-skew":
        smallest = _linear_smallest(n, num_partitions)
        if smallest < cfg.min_silo_size:
            raise DataError(
                f"size-skew gives the smallest of {num_partitions} silos {smallest} examples "
                f"(< min-silo-size {cfg.min_silo_size}): use fewer silos or more data"
            )

    from datasets import Dataset

    ds = Dataset.from_dict({"label": labels.tolist(), "idx": list(range(n))})
    partitioner = _make_partitioner(name, num_partitions, cfg, seed)
    if name in ("iid", "size-skew"):
        # both cut the dataset into contiguous blocks: shuffle it first (same permutation
        # as the earlier torch-only split, so the IID split is unchanged)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        ds = ds.select(perm.tolist())
    partitioner.dataset = ds
    try:
        with warnings.catch_warnings():
            # DirichletPartitioner warns on every redraw; PathologicalPartitioner on unused classes
            warnings.simplefilter("ignore", UserWarning)
            raw = [_indices_of(partitioner.load_partition(pid)) for pid in range(num_partitions)]
    except ValueError as exc:
        raise DataError(_explain(name, num_partitions, cfg, exc)) from None

    parts = [torch.from_numpy(np.sort(r).astype(np.int64)) for r in raw]
    sizes = [int(p.numel()) for p in parts]
    if min(sizes) < cfg.min_silo_size:
        pid = sizes.index(min(sizes))
        raise DataError(
            f"{name} split gives silo {pid} {sizes[pid]} examples (< min-silo-size {cfg.min_silo_size})"
        )
    total = int(sum(sizes))
    if int(torch.unique(torch.cat(parts)).numel()) != total:  # guard against a partitioner bug
        raise DataError(f"{name} split is not disjoint")
    return parts


def _make_partitioner(name: str, num_partitions: int, cfg: TrainConfig, seed: int):
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        LinearPartitioner,
        PathologicalPartitioner,
    )

    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(cfg.alpha),
            min_partition_size=cfg.min_silo_size,
            self_balancing=True,
            shuffle=False,
            seed=seed,
        )
    if name == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=cfg.classes_per_silo,
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=seed,
        )
    if name == "size-skew":
        return LinearPartitioner(num_partitions=num_partitions)
    raise DataError(f"unknown partitioner '{name}' (available: iid, dirichlet, pathological, size-skew)")


def _indices_of(part) -> np.ndarray:
    col = part.with_format("arrow")["idx"]
    return np.asarray(col.to_numpy() if hasattr(col, "to_numpy") else col, dtype=np.int64)


def _linear_smallest(n: int, num_partitions: int) -> int:
    """Size of silo 0 under LinearPartitioner (shares 1 : 2 : ... : M, rounded down)."""
    return int(n / (num_partitions * (num_partitions + 1) / 2))


def _explain(name: str, num_partitions: int, cfg: TrainConfig, exc: ValueError) -> str:
    if name == "dirichlet":
        return (
            f"dirichlet split with alpha {cfg.alpha:g} could not give each of {num_partitions} silos "
            f"min-silo-size {cfg.min_silo_size} examples in {_MAX_DIRICHLET_TRIES} draws: "
            "raise alpha or lower min-silo-size"
        )
    if name == "pathological":
        return (
            f"pathological split with {num_partitions} silos x classes-per-silo {cfg.classes_per_silo} "
            f"is impossible for this data ({' '.join(str(exc).split())})"
        )
    return f"{name} split is impossible: {' '.join(str(exc).split())}"


# ----- heterogeneity ----------------------------------------------------------------------


def label_distribution(labels: torch.Tensor, parts: list[torch.Tensor], num_classes: int = 10) -> np.ndarray:
    """Example counts ``[num_partitions, num_classes]`` (int64): row i counts silo i's labels."""
    y = torch.as_tensor(labels).reshape(-1).to("cpu", torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    rows = [torch.bincount(y[torch.as_tensor(p, dtype=torch.int64)], minlength=num_classes) for p in parts]
    if not rows:
        return np.zeros((0, num_classes), dtype=np.int64)
    return torch.stack(rows).numpy().astype(np.int64)


def skew_statistic(dist: np.ndarray) -> float:
    """Label skew: mean total-variation distance between each silo's label distribution and
    the pooled one (silos without examples are ignored).

    0 when every silo has the pooled class proportions; approaches 1 - (pooled share of
    a silo's classes) when each silo holds a single class. ``dist`` holds counts (or
    any non-negative weights) per silo and class, as from :func:`label_distribution`.
    """
    d = np.asarray(dist, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"dist must be a non-empty [silos, classes] array, got shape {d.shape}")
    if np.any(d < 0):
        raise ValueError("dist must be non-negative")
    sizes = d.sum(axis=1)
    d = d[sizes > 0]
    if d.shape[0] == 0:
        raise ValueError("every silo is empty")
    pooled = d.sum(axis=0) / d.sum()
    per_silo = d / d.sum(axis=1, keepdims=True)
    tv = 0.5 * np.abs(per_silo - pooled).sum(axis=1)
    return float(tv.mean())
