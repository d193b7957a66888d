"""Secure aggregation for distributed noise: Flower's SecAgg+ stages driven by our server.

The silos run :mod:`client.secagg` (Flower's stage functions plus our masked vector) on their
own ``context.state``; the server only ever sees masked vectors and shares, yet recovers the
exact integer sum modulo 2^32, also when silos drop after the key share."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from benchmarks.bench_secagg import KeyRouter as KeyGrid
from client import secagg as client_secagg
from common import protocol as P
from common.distributed import MODULUS, add_mod, to_signed
from server.secagg import SecAggRefused, SecureAggregator


def _vectors(nodes, n, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.integers(-(2**20), 2**20, size=n) for k in nodes}


def test_the_sum_is_exact_and_no_single_vector_is_visible():
    nodes = [11, 12, 13, 14]
    grid = KeyGrid(nodes)
    agg = SecureAggregator(survivors=0, key_rounds=3, timeout=10, train_config_json="{}")
    for rnd in range(5):  # two key set-ups (3 instances each): fresh masks every round
        agg.prepare(grid, nodes)
        vectors = _vectors(nodes, 257, seed=rnd)
        masked = grid.masked(agg, vectors)
        for n in nodes:  # a masked vector is far from its plain one (uniform on Z_2^32)
            plain = np.mod(vectors[n], MODULUS).astype(np.uint32)
            assert np.mean(masked[n] == plain) < 0.01
        total = agg.unmask(grid, masked)
        assert np.array_equal(to_signed(total), sum(vectors.values()))
    assert agg.epoch.number == 2


def test_survivors_of_a_dropout_are_summed_exactly():
    nodes = [1, 2, 3, 4, 5]
    grid = KeyGrid(nodes)
    agg = SecureAggregator(survivors=3, key_rounds=4, timeout=10, train_config_json="{}")
    agg.prepare(grid, nodes)
    vectors = _vectors(nodes, 100)
    masked = grid.masked(agg, vectors)
    del masked[2], masked[5]  # two silos drop after the key share, before sending
    total = agg.unmask(grid, masked)
    assert np.array_equal(to_signed(total), vectors[1] + vectors[3] + vectors[4])
    assert agg.dropped_last_round
    # the next round re-keys without carrying the dropped silos' exposed keys forward
    agg.prepare(grid, [1, 3, 4])
    assert agg.epoch.number == 2 and agg.epoch.members == [1, 3, 4]


def test_too_few_survivors_are_refused_before_any_share_is_asked():
    nodes = [1, 2, 3, 4]
    grid = KeyGrid(nodes)
    agg = SecureAggregator(survivors=4, key_rounds=2, timeout=10, train_config_json="{}")
    agg.prepare(grid, nodes)
    masked = grid.masked(agg, _vectors(nodes, 10))
    del masked[3]
    grid.seen.clear()
    with pytest.raises(SecAggRefused, match="3 of 4 silos"):
        agg.unmask(grid, masked)
    assert not [c for c in grid.seen if c[P.CONFIG][P.SECAGG_STAGE] == P.STAGE_UNMASK]


def test_a_silo_refuses_to_mask_twice_or_unmask_twice_in_one_instance():
    nodes = [1, 2, 3]
    grid = KeyGrid(nodes)
    agg = SecureAggregator(survivors=0, key_rounds=2, timeout=10, train_config_json="{}")
    agg.prepare(grid, nodes)
    rc = ConfigRecord(agg.collect_fields(1))
    client_secagg.mask_vector(rc, grid.contexts[1], np.zeros(4, dtype=np.uint32))
    with pytest.raises(client_secagg.SecAggError, match="already used"):
        client_secagg.mask_vector(rc, grid.contexts[1], np.ones(4, dtype=np.uint32))
    unmask = ConfigRecord(
        {
            P.SECAGG_STAGE: P.STAGE_UNMASK,
            P.SECAGG_EPOCH: agg.epoch.number,
            P.SECAGG_INSTANCE: 0,
            P.SECAGG_ACTIVE: [1, 2, 3],
            P.SECAGG_DEAD: [],
        }
    )
    client_secagg.unmask(unmask, grid.contexts[1])
    with pytest.raises(client_secagg.SecAggError, match="already unmasked"):
        client_secagg.unmask(unmask, grid.contexts[1])
    # a silo that sent nothing in an instance gives no shares for it
    with pytest.raises(client_secagg.SecAggError, match="no masked vector"):
        client_secagg.unmask(unmask, grid.contexts[2])


def test_wrapping_arithmetic():
    a = np.array([MODULUS - 1, 5], dtype=np.uint32)
    assert add_mod(a, np.array([2, 7], dtype=np.uint32)).tolist() == [1, 12]
    assert to_signed(
        add_mod(np.zeros(2, dtype=np.uint32), np.array([3, 0], dtype=np.uint32), -1)
    ).tolist() == [-3, 0]
