"""Server optimizers against their formulas (a per-coordinate loop) and against Flower's own
strategies (``flwr.serverapp.strategy``) on dense updates; learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from common.config import FederatedConfig
from common.errors import ConfigError
from common.server_opt import SERVER_OPTIMIZERS, ServerOptimizer, lr_factor
from tests.fl_fakes import FakeGrid

D = 7


def naive(kind, x, deltas, masks, *, lr, mu, b1, b2, tau):
    """One coordinate at a time, straight from Reddi et al. 2021 / Hsu et al. 2019."""
    x = [float(v) for v in x]
    m, v = [0.0] * D, [0.0] * D
    for t, (delta, mask) in enumerate(zip(deltas, masks), start=1):
        for j in range(D):
            if not mask[j]:
                if kind == "fedavgm":
                    m[j] = 0.0
                continue
            g = float(delta[j])
            if kind == "fedavg":
                x[j] += lr * g
            elif kind == "fedavgm":
                m[j] = mu * m[j] + g
                x[j] += lr * m[j]
            else:
                m[j] = b1 * m[j] + (1 - b1) * g
                if kind == "fedadagrad":
                    v[j] = v[j] + g * g
                    eta = lr
                elif kind == "fedadam":
                    v[j] = b2 * v[j] + (1 - b2) * g * g
                    eta = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                else:
                    v[j] = v[j] - (1 - b2) * g * g * (
                        1.0 if v[j] - g * g > 0 else -1.0 if v[j] - g * g < 0 else 0.0
                    )
                    eta = lr
                x[j] += eta * m[j] / (math.sqrt(v[j]) + tau)
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("kind", SERVER_OPTIMIZERS)
def test_each_server_optimizer_follows_its_formula_with_a_mask(kind):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(D, generator=gen, dtype=torch.float64)
    deltas = [torch.randn(D, generator=gen, dtype=torch.float64) * 0.1 for _ in range(4)]
    masks = [torch.ones(D, dtype=torch.bool)] * 2 + [
        torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    ] * 2
    hp = {"lr": 0.3, "mu": 0.8, "b1": 0.9, "b2": 0.99, "tau": 1e-3}
    opt = ServerOptimizer(kind, D, momentum=hp["mu"], beta1=hp["b1"], beta2=hp["b2"], tau=hp["tau"])
    x = x0.clone()
    for delta, mask in zip(deltas, masks):
        before = x.clone()
        x = opt.step(x, delta, lr=hp["lr"], mask=mask)
        assert torch.equal(x[~mask], before[~mask]), "a frozen coordinate moved"
    torch.testing.assert_close(x, naive(kind, x0, deltas, masks, **hp), rtol=1e-12, atol=1e-12)


def test_state_round_trips_and_refuses_another_kind():
    a = ServerOptimizer("fedyogi", D)
    a.step(torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64), lr=0.1)
    b = ServerOptimizer("fedyogi", D)
    b.load_state_dict(a.state_dict())
    delta = torch.full((D,), 0.5, dtype=torch.float64)
    x = torch.zeros(D, dtype=torch.float64)
    assert torch.equal(a.step(x, delta, lr=0.1), b.step(x, delta, lr=0.1))
    with pytest.raises(ValueError, match="fedyogi"):
        ServerOptimizer("fedadam", D).load_state_dict(a.state_dict())


def _flower_rounds(strategy, x0: np.ndarray, aggregated: list[np.ndarray]) -> np.ndarray:
    """Drive a Flower strategy: one client whose reply *is* the aggregated model."""
    arrays = ArrayRecord({"w": Array(x0.astype(np.float64))})
    for rnd, target in enumerate(aggregated, start=1):
        sent = strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid([5]))
        reply = Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(target.astype(np.float64))}),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            ),
            reply_to=sent[0],
        )
        arrays, _ = strategy.aggregate_train(rnd, [reply])
    return arrays["w"].numpy()


@pytest.mark.parametrize(
    "kind,flower",
    [
        (
            "fedavgm",
            lambda: FedAvgM(
                server_learning_rate=0.7, server_momentum=0.6, min_available_nodes=1, min_train_nodes=1
            ),
        ),
        (
            "fedadagrad",
            lambda: FedAdagrad(eta=0.05, tau=1e-3, min_available_nodes=1, min_train_nodes=1),
        ),
        (
            "fedyogi",
            lambda: FedYogi(
                eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3, min_available_nodes=1, min_train_nodes=1
            ),
        ),
    ],
)
def test_same_numbers_as_flowers_strategy(kind, flower):
    """Where Flower's maths applies (dense updates, no mask) we compute exactly what it does."""
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=D)
    strategy = flower()
    # Flower's FedAdagrad has no first moment (beta_1 = 0)
    opt = ServerOptimizer(
        kind, D, momentum=0.6, beta1=0.0 if kind == "fedadagrad" else 0.9, beta2=0.99, tau=1e-3
    )
    lr = 0.7 if kind == "fedavgm" else 0.05
    x = torch.from_numpy(x0.copy())
    targets = []
    for _ in range(4):
        delta = torch.from_numpy(rng.normal(size=D) * 0.1)
        targets.append((x + delta).numpy())  # the clients' average lands here
        x = opt.step(x, delta, lr=lr)
    ours = x.numpy()
    theirs = _flower_rounds(strategy, x0, targets)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_fedadam_matches_flower_up_to_its_bias_correction_step_count():
    """Flower's FedAdam corrects with server_round + 1; ours counts optimizer steps from 1.
    Same moments, so one step differs from Flower's exactly by that factor."""
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=D)
    delta = rng.normal(size=D) * 0.1
    flower = FedAdam(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3, min_available_nodes=1, min_train_nodes=1)
    theirs = _flower_rounds(flower, x0, [x0 + delta]) - x0
    ours = ServerOptimizer("fedadam", D, beta1=0.9, beta2=0.99, tau=1e-3)
    mine = (ours.step(torch.from_numpy(x0), torch.from_numpy(delta), lr=0.05) - torch.from_numpy(x0)).numpy()
    flower_factor = math.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # server_round = 1 -> exponent 2
    our_factor = math.sqrt(1 - 0.99) / (1 - 0.9)
    np.testing.assert_allclose(mine / our_factor, theirs / flower_factor, rtol=1e-10)


def test_lr_schedules():
    assert [lr_factor("constant", i, 4) for i in range(4)] == [1.0] * 4
    assert [lr_factor("linear", i, 4) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cos = [lr_factor("cosine", i, 4) for i in range(4)]
    assert cos[0] == 1.0 and cos[2] == pytest.approx(0.5) and all(a > b > 0 for a, b in zip(cos, cos[1:]))
    with pytest.raises(ValueError):
        lr_factor("warm", 0, 4)


def test_server_momentum_only_with_fedavgm():
    with pytest.raises(ConfigError, match="server-momentum"):
        FederatedConfig(server_momentum=0.9)
    FederatedConfig(server_optimizer="fedavgm", server_momentum=0.9)
    with pytest.raises(ConfigError, match="server-optimizer"):
        FederatedConfig(server_optimizer="sgd")
