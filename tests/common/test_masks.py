"""Top-k masks, ties, per-layer scope and the unfreezing schedule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.masks import MaskBuilder, UnfreezeSchedule, pack_mask, top_k_count, unpack_mask


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 500), r=st.floats(0.001, 1.0), seed=st.integers(0, 10**6))
def test_global_mask_has_exactly_ceil_rd(d, r, seed):
    scores = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    mask = MaskBuilder(scores, [d]).mask(r)
    assert int(mask.sum()) == max(1, math.ceil(round(r * d, 9)))
    # the kept coordinates are the largest scores
    if 0 < int(mask.sum()) < d:
        assert float(scores[mask].min()) >= float(scores[~mask].max())


def test_ceil_guard_against_float_error():
    assert top_k_count(0.6, 10) == 6
    assert top_k_count(0.7, 10) == 7
    assert top_k_count(0.61, 10) == 7


def test_ties_keep_lower_index_and_are_deterministic():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    mask = MaskBuilder(scores, [6]).mask(0.5)  # 3 of the four tied 2.0s
    assert mask.tolist() == [False, True, True, True, False, False]
    assert torch.equal(mask, MaskBuilder(scores.clone(), [6]).mask(0.5))


def test_nan_scores_rank_last():
    scores = torch.tensor([float("nan"), 0.1, 0.2])
    assert MaskBuilder(scores, [3]).mask(0.6).tolist() == [False, True, True]


def test_per_layer_scope_keeps_ratio_in_each_layer():
    scores = torch.cat([torch.full((10,), 100.0), torch.rand(30)])  # layer 0 dominates globally
    sizes = [10, 30]
    per_layer = MaskBuilder(scores, sizes, "per-layer").mask(0.5)
    assert int(per_layer[:10].sum()) == 5 and int(per_layer[10:].sum()) == 15
    glob = MaskBuilder(scores, sizes, "global").mask(0.5)
    assert int(glob[:10].sum()) == 10


@settings(max_examples=40, deadline=None)
@given(
    r0=st.floats(0.05, 1.0),
    r_max=st.floats(0.05, 1.0),
    stages=st.integers(1, 30),
    d=st.integers(5, 300),
    scope=st.sampled_from(["global", "per-layer"]),
    seed=st.integers(0, 10**6),
)
def test_schedule_monotone_nested_reaches_rmax(r0, r_max, stages, d, scope, seed):
    r0, r_max = min(r0, r_max), max(r0, r_max)
    sched = UnfreezeSchedule("linear", r0, r_max)
    ratios = [sched.ratio(s, stages) for s in range(stages)]
    assert all(b >= a - 1e-12 for a, b in zip(ratios, ratios[1:]))
    assert ratios[-1] == pytest.approx(r_max)
    scores = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    sizes = [d // 2, d - d // 2] if scope == "per-layer" else [d]
    builder = MaskBuilder(scores, sizes, scope)
    masks = [builder.mask(r) for r in ratios]
    for a, b in zip(masks, masks[1:]):
        assert torch.all(b | ~a), "a coordinate was re-frozen"
        newly = b & ~a
        if scope == "global" and bool(newly.any()) and bool((~b).any()):
            # the unfrozen coordinates are the most important of those that were frozen
            assert float(scores[newly].min()) >= float(scores[~b].max())


def test_steps_schedule_holds_last_value():
    sched = UnfreezeSchedule("steps", 0.6, 1.0, (0.6, 0.8))
    assert [sched.ratio(i, 5) for i in range(4)] == [0.6, 0.8, 0.8, 0.8]
    assert UnfreezeSchedule("none", 0.3, 1.0).ratio(9, 10) == 0.3


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 1000), seed=st.integers(0, 10**6))
def test_pack_unpack_round_trip(d, seed):
    mask = torch.rand(d, generator=torch.Generator().manual_seed(seed)) < 0.4
    data = pack_mask(mask)
    assert len(data) == math.ceil(d / 8)
    assert torch.equal(unpack_mask(data, d), mask)


def test_movement_scores_against_a_naive_loop():
    """Dynamic-mask scores: squared mean step of coordinates active throughout the window,
    divided by their mean; coordinates frozen at any update keep their last score."""
    from common.masks import MovementScores

    gen = torch.Generator().manual_seed(3)
    d = 12
    theta = torch.randn(d, generator=gen, dtype=torch.float64)
    tracker = MovementScores(d)
    tracker.begin(theta)
    # window 1: every coordinate active, three updates
    lrs = [0.5, 0.25, 0.25]
    start = theta.clone()
    for lr in lrs:
        theta = theta + lr * torch.randn(d, generator=gen, dtype=torch.float64)
        tracker.observe(None, lr)
    got1 = tracker.refresh(theta)
    raw = [((theta[j] - start[j]) / sum(lrs)) ** 2 for j in range(d)]
    mean = sum(raw) / d
    expected1 = [float(r / mean) for r in raw]
    assert got1.tolist() == pytest.approx(expected1, rel=1e-12)
    # window 2: coordinate 0 frozen for one update, 1-3 frozen throughout
    masks = [torch.tensor([j >= 4 or j == 0 for j in range(d)]), torch.tensor([j >= 4 for j in range(d)])]
    start = theta.clone()
    for mask, lr in zip(masks, [0.1, 0.2]):
        theta = theta + lr * torch.randn(d, generator=gen, dtype=torch.float64) * mask
        tracker.observe(mask, lr)
    got2 = tracker.refresh(theta)
    measured = [j for j in range(d) if all(bool(m[j]) for m in masks)]
    assert measured == list(range(4, d))
    raw2 = {j: float(((theta[j] - start[j]) / 0.3) ** 2) for j in measured}
    mean2 = sum(raw2.values()) / len(raw2)
    for j in range(d):
        want = raw2[j] / mean2 if j in raw2 else expected1[j]
        assert float(got2[j]) == pytest.approx(want, rel=1e-12), j
    # the state round-trips (resume)
    again = MovementScores(d)
    again.load_state_dict(tracker.state_dict())
    assert torch.equal(again.scores, tracker.scores) and torch.equal(again.start, tracker.start)
