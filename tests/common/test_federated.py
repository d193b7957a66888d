"""The sparse update codec and the coordinate-wise weighted aggregation of common.federated,
against naive per-coordinate loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.federated import aggregate_sparse, sparse_decode, sparse_encode


def naive_encode(delta, mask):
    return [float(delta[j]) for j in range(len(delta)) if mask is None or mask[j]]


def naive_aggregate(updates, weights, mask, d):
    active = [j for j in range(d) if mask is None or mask[j]]
    out = [0.0] * d
    for pos, j in enumerate(active):
        out[j] = sum(w * float(u[pos]) for u, w in zip(updates, weights)) / sum(weights)
    return out


@pytest.mark.parametrize("with_mask", [True, False])
def test_codec_round_trip_in_mask_order(with_mask):
    d = 50
    mask = (torch.arange(d) % 3 == 0) if with_mask else None
    delta = torch.randn(d) * (mask if with_mask else 1)
    vals = sparse_encode(delta, mask)
    assert vals.dtype == np.float32 and vals.tolist() == pytest.approx(naive_encode(delta, mask))
    torch.testing.assert_close(sparse_decode(vals, mask, d), delta)


def test_codec_refuses_the_wrong_length():
    mask = torch.arange(10) < 4
    with pytest.raises(ValueError, match="active coordinates"):
        sparse_decode(np.zeros(5, np.float32), mask, 10)
    with pytest.raises(ValueError, match="dense update"):
        sparse_decode(np.zeros(9, np.float32), None, 10)


def test_aggregation_equals_the_naive_weighted_average():
    d = 40
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(d, generator=g) < 0.5
    updates = [sparse_encode(torch.randn(d, generator=g), mask) for _ in range(3)]
    w = [1.0, 2.0, 7.0]
    agg = aggregate_sparse(updates, w, mask, d)
    torch.testing.assert_close(agg, torch.tensor(naive_aggregate(updates, w, mask, d)), rtol=1e-6, atol=1e-7)
    assert torch.all(agg[~mask] == 0)
    with pytest.raises(ValueError, match="weights"):
        aggregate_sparse(updates, [0.0, 0.0, 0.0], mask, d)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_silos_are_views_of_one_copy_and_hold_exactly_their_examples(partitioner, data_dir):
    """load_silo returns, in the same order, the examples of partition + split applied to
    the dataset, as slices of one silo-ordered copy (a worker serving many silos holds the
    data once)."""
    from common.config import TrainConfig
    from common.data import load_dataset, take_subset, train_validation_split
    from common.federated import load_silo
    from common.partition import partition_indices

    cfg = TrainConfig(dataset="mnist", train_subset=3000, partitioner=partitioner, seed=3, data_dir=data_dir)
    full = take_subset(load_dataset("mnist", data_dir, True), 3000)
    parts = partition_indices(full.y, 5, cfg)
    storages = set()
    for pid in range(5):
        shard = full.subset(parts[pid])
        tr, va = train_validation_split(len(shard), cfg.validation_fraction, seed=pid)
        silo = load_silo(cfg, pid, 5)
        train, val = silo.train, silo.validation
        assert len(silo.test) == 0  # test-fraction 0: no local test split
        assert torch.equal(train.x, shard.subset(tr).x) and torch.equal(train.y, shard.subset(tr).y)
        assert torch.equal(val.x, shard.subset(va).x) and torch.equal(val.y, shard.subset(va).y)
        storages |= {train.x.untyped_storage().data_ptr(), val.x.untyped_storage().data_ptr()}
    assert len(storages) == 1
