"""Cross-silo partitions of a labelled dataset (DESIGN.md §4).

IID for now; every partitioner is deterministic by seed and returns disjoint index
tensors that cover the data.
"""

from __future__ import annotations

import torch

from common.config import TrainConfig
from common.errors import DataError


def partition_indices(labels: torch.Tensor, num_partitions: int, cfg: TrainConfig) -> list[torch.Tensor]:
    """Index tensors of the ``num_partitions`` silos for ``cfg.partitioner``."""
    n = int(labels.shape[0])
    seed = cfg.seed if cfg.seed >= 0 else 0  # the split must agree across processes
    if cfg.partitioner == "iid":
        from common.federated import iid_partitions

        return iid_partitions(n, num_partitions, seed=seed)
    raise DataError(f"partitioner '{cfg.partitioner}' is not available yet (available: iid)")
