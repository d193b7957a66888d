"""The AdaDPIGU strategy with mocked messages: sparse aggregation, validation, mask bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import protocol as P
from common.config import FederatedConfig, TrainConfig
from common.masks import unpack_mask
from common.models import build_model, flat_parameters, load_flat_parameters
from common.server_opt import ServerOptimizer
from server.ledger import PrivacyLedger
from server.strategy import AdaDPIGUStrategy
from tests.fl_fakes import FakeGrid, error_reply, query_reply, train_reply

NODES = [11, 22, 33]
SIZES = {11: 100, 22: 300, 33: 600}


def make_strategy(method="adadpigu", rounds=3, epsilon=8.0, noise_multiplier=2.0, **cfg_kw):
    cfg = TrainConfig(
        method=method,
        epsilon=epsilon,
        noise_multiplier=noise_multiplier,
        batch_size=20,
        seed=0,
        r0=0.5,
        **cfg_kw,
    )
    fed = FederatedConfig(num_server_rounds=rounds, importance_rounds=1, local_epochs=1.0)
    torch.manual_seed(0)
    model = build_model("mnist-cnn", "mnist")
    ledger = PrivacyLedger(delta=cfg.delta, accountant="rdp", target_epsilon=cfg.epsilon)
    strat = AdaDPIGUStrategy(cfg.replace(accountant="rdp"), fed, model=model, ledger=ledger)
    grid = FakeGrid(NODES)
    queries = [
        Message(RecordDict({P.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in NODES
    ]
    strat.register_silos(
        [query_reply(q, pid, SIZES[q.metadata.dst_node_id], strategy=strat) for pid, q in enumerate(queries)]
    )
    strat.calibrate()
    return strat, grid, ArrayRecord(model.state_dict())


def test_a_fixed_noise_multiplier_over_the_target_is_refused_before_round_one():
    """As centrally: a fixed sigma whose planned rounds exceed epsilon fails at calibration
    (nothing sent, nothing spent), naming the silo; one within the target is kept as given."""
    from common.errors import BudgetError

    with pytest.raises(BudgetError, match=r"silo-0's plan .*sigma=0.5\) spends epsilon .* > target 8"):
        make_strategy(noise_multiplier=0.5)
    strat, _, _ = make_strategy(noise_multiplier=2.0)
    assert {s.noise_multiplier for s in strat.silos.values()} == {2.0}


def by_node(messages):
    return {m.metadata.dst_node_id: m for m in messages}


def test_importance_round_then_sparse_training_round():
    strat, grid, arrays = make_strategy()
    start = flat_parameters(strat.model).clone()
    d = strat.d
    msgs = by_node(strat.configure_train(1, arrays, ConfigRecord(), grid))
    assert set(msgs) == set(NODES)
    rc = msgs[11].content[P.CONFIG]
    assert rc[P.PHASE] == P.PHASE_IMPORTANCE and rc[P.MASK_VERSION] == 0 and P.MASK_BITS not in rc
    # importance: node 33 (weight 600) says the first half matters, others the second half
    imp_first = np.r_[np.ones(d // 2), np.zeros(d - d // 2)]
    updates = {n: np.full(d, 0.01 * (i + 1), np.float32) for i, n in enumerate(NODES)}
    replies = [
        train_reply(
            msgs[n], updates[n], n_examples=SIZES[n], importance=imp_first if n == 33 else 1 - imp_first
        )
        for n in NODES
    ]
    new_arrays, metrics = strat.aggregate_train(1, replies)
    expected = start + torch.from_numpy(sum(SIZES[n] * updates[n] for n in NODES) / 1000.0).float()
    strat.model.load_state_dict(new_arrays.to_torch_state_dict())
    torch.testing.assert_close(flat_parameters(strat.model), expected)
    assert metrics["rejected"] == 0 and metrics["clients-valid"] == 3

    # round 2: a mask at r0 = 0.5 built from the weighted importance (node 33 dominates)
    msgs = by_node(strat.configure_train(2, new_arrays, ConfigRecord(), grid))
    rc = msgs[22].content[P.CONFIG]
    assert rc[P.PHASE] == P.PHASE_TRAIN and rc[P.MASK_VERSION] == 1
    mask = unpack_mask(bytes(rc[P.MASK_BITS]), d)
    assert int(mask.sum()) == int(np.ceil(0.5 * d))
    assert bool(mask[: d // 2].all())
    before = flat_parameters(strat.model).clone()
    k = int(mask.sum())
    replies = [train_reply(msgs[n], np.full(k, 1.0, np.float32), n_examples=SIZES[n]) for n in NODES]
    new_arrays, metrics = strat.aggregate_train(2, replies)
    strat.model.load_state_dict(new_arrays.to_torch_state_dict())
    after = flat_parameters(strat.model)
    assert torch.equal(after[~mask], before[~mask]), "frozen coordinates moved"
    torch.testing.assert_close(after[mask], before[mask] + 1.0)
    assert metrics["bytes-up"] == pytest.approx(3 * (4 * k), rel=0.01)
    # the mask bits are sent only to nodes whose copy is stale
    for n in NODES:
        strat.node_mask_version[n] = 1
    msgs = by_node(strat.configure_train(3, new_arrays, ConfigRecord(), grid))
    assert msgs[11].content[P.CONFIG][P.MASK_VERSION] == 2  # r grows to r_max: a new mask
    assert P.MASK_BITS in msgs[11].content[P.CONFIG]


def _train_round_messages():
    strat, grid, arrays = make_strategy(method="adadpigu")
    msgs = by_node(strat.configure_train(1, arrays, ConfigRecord(), grid))
    d = strat.d
    reps = [
        train_reply(msgs[n], np.full(d, 1e-3, np.float32), n_examples=SIZES[n], importance=np.ones(d))
        for n in NODES
    ]
    arrays, _ = strat.aggregate_train(1, reps)
    msgs = by_node(strat.configure_train(2, arrays, ConfigRecord(), grid))
    return strat, msgs, int(strat.mask.sum())


@pytest.mark.parametrize(
    ("make_bad", "reason"),
    [
        (lambda m, k: train_reply(m, np.ones(k + 1, np.float32), n_examples=5), "shape"),
        (
            lambda m, k: train_reply(m, np.r_[np.ones(k - 1), np.nan].astype(np.float32), n_examples=5),
            "NaN or inf",
        ),
        (
            lambda m, k: train_reply(m, np.r_[np.ones(k - 1), np.inf].astype(np.float32), n_examples=5),
            "NaN or inf",
        ),
        (
            lambda m, k: train_reply(m, np.ones(k, np.float32), n_examples=5, override={P.MASK_VERSION: 0}),
            "outside the current mask",
        ),
        (
            lambda m, k: train_reply(m, np.ones(k, np.float32), n_examples=5, drop_metric=P.DP_STEPS),
            "lack 'dp-steps'",
        ),
        (lambda m, k: train_reply(m, np.ones(k, np.float32), n_examples=0), "positive integer"),
        (
            lambda m, k: train_reply(
                m, np.ones(k, np.float32), n_examples=5, override={P.DP_NOISE_MULTIPLIER: 0.01}
            ),
            "DP events",
        ),
        (lambda m, k: train_reply(m, np.ones((k, 1), np.float32), n_examples=5), "shape"),
        (lambda m, k: Message(RecordDict({}), reply_to=m), "lacks its 'arrays'"),
        (lambda m, k: train_reply(m, np.zeros(k, np.float32), n_examples=5), "exactly zero"),
        (lambda m, k: train_reply(m, np.full(k, 1e3, np.float32), n_examples=5), "exceeds max-update-norm"),
        (lambda m, k: train_reply(m, np.ones(k, np.float32), n_examples=SIZES[33] + 1), "registered"),
    ],
)
def test_malformed_reply_is_rejected_and_counted(make_bad, reason):
    strat, msgs, k = _train_round_messages()
    before = flat_parameters(strat.model).clone()
    good = [train_reply(msgs[n], np.full(k, 0.5, np.float32), n_examples=SIZES[n]) for n in (11, 22)]
    bad = make_bad(msgs[33], k)
    _, metrics = strat.aggregate_train(2, [*good, bad])
    assert metrics["rejected"] == 1 and metrics["clients-valid"] == 2
    assert reason in strat.rejections[-1]["reason"]
    after = flat_parameters(strat.model)
    torch.testing.assert_close(after[strat.mask], before[strat.mask] + 0.5)  # only the good ones averaged


def test_error_and_missing_replies_count_as_failed_and_nothing_changes():
    strat, msgs, k = _train_round_messages()
    before = flat_parameters(strat.model).clone()
    new_arrays, metrics = strat.aggregate_train(2, [error_reply(msgs[11])])
    assert new_arrays is None
    assert metrics["failed"] == 3 and metrics["rejected"] == 0
    load_flat_parameters(strat.model, before)
    assert torch.equal(flat_parameters(strat.model), before)


def test_server_momentum_accumulates_and_frozen_coordinates_stay():
    strat, msgs, k = _train_round_messages()
    strat.fed = FederatedConfig(
        num_server_rounds=3, importance_rounds=1, server_optimizer="fedavgm", server_momentum=0.5
    )
    strat.server_opt = ServerOptimizer("fedavgm", strat.d, momentum=0.5)
    before = flat_parameters(strat.model).clone()
    reps = [train_reply(msgs[n], np.full(k, 0.1, np.float32), n_examples=SIZES[n]) for n in NODES]
    arrays, _ = strat.aggregate_train(2, reps)
    after1 = flat_parameters(strat.model).clone()
    torch.testing.assert_close(after1[strat.mask], before[strat.mask] + 0.1)
    strat.current_flat = after1
    arrays, _ = strat.aggregate_train(2, reps)
    after2 = flat_parameters(strat.model)
    torch.testing.assert_close(after2[strat.mask], after1[strat.mask] + 0.15)  # 0.5 * 0.1 + 0.1
    assert torch.equal(after2[~strat.mask], before[~strat.mask])
