"""Issue 13's federated optimisation switches: client optimizer state kept across rounds,
local steps per round, learning-rate schedules, EMA of the weights, sweep variants."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client import task
from common import protocol as P
from common.config import FederatedConfig, TrainConfig
from common.data import TensorData
from common.engine import DPEngine
from common.errors import ConfigError
from common.federated import ClientPlan
from common.models import ParameterEMA, build_model, flat_parameters
from simulations.sweep import load_sweep


def _engine(cfg, n=64, seed=0):
    torch.manual_seed(seed)
    return DPEngine(
        build_model("mnist-cnn", "mnist"),
        cfg,
        n_train=n,
        device=torch.device("cpu"),
        noise_generator=torch.Generator().manual_seed(1),
        sampling_generator=torch.Generator().manual_seed(2),
    )


def _data(n=64):
    gen = torch.Generator().manual_seed(5)
    return TensorData(torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_state_round_trip_continues_exactly(optimizer):
    """Saving the optimizer state and loading it into a fresh optimizer continues the same
    trajectory as never stopping (what a client does between rounds with 'keep')."""
    cfg = TrainConfig(method="dpsgd", epsilon=8.0, batch_size=16, optimizer=optimizer, lr=0.1)
    data = _data()
    a = _engine(cfg)
    for _ in range(3):
        a.step(data, mode="flat", noise_multiplier=1.0)
    state = a.optimizer_state()
    assert ("momentum_buffer" in state) == (optimizer == "sgd") and state[next(iter(state))].numel() in (
        a.d,
        1,
    )
    b = _engine(cfg)
    b.model.load_state_dict(a.model.state_dict())
    b.noise_generator.set_state(a.noise_generator.get_state())
    b.sampling_generator.set_state(a.sampling_generator.get_state())
    b.load_optimizer_state(state)
    for eng in (a, b):
        eng.step(data, mode="flat", noise_multiplier=1.0)
    assert torch.equal(flat_parameters(a.model), flat_parameters(b.model))


def _ctx():
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def _round(cfg, ctx, arrays, server_round, keep, lr=None, steps=2):
    rc = {
        P.SERVER_ROUND: server_round,
        P.PHASE: P.PHASE_TRAIN,
        P.NOISE_MULTIPLIER: 1.0,
        P.SAMPLE_RATE: 0.1,
        P.LOCAL_STEPS: steps,
        P.MASK_VERSION: 0,
        P.KEEP_OPTIMIZER_STATE: keep,
    }
    if lr is not None:
        rc[P.CLIENT_LR] = lr
    out, _ = task.train_round(cfg, ConfigRecord(rc), arrays, ctx)
    return out[P.UPDATE].numpy()


def test_client_keeps_its_momentum_across_rounds_only_when_told(data_dir):
    cfg = TrainConfig(
        method="dpsgd", epsilon=50.0, batch_size=16, train_subset=900, seed=3, data_dir=data_dir
    )
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("mnist-cnn", "mnist").state_dict())
    keep, reset = _ctx(), _ctx()
    first = [_round(cfg, c, arrays, 1, flag) for c, flag in ((keep, True), (reset, False))]
    np.testing.assert_array_equal(first[0], first[1])  # nothing to keep yet
    assert P.STATE_OPTIMIZER in keep.state and P.STATE_OPTIMIZER not in reset.state
    momentum = keep.state[P.STATE_OPTIMIZER]["momentum_buffer"].numpy()
    assert np.abs(momentum).sum() > 0
    kept, fresh = _round(cfg, keep, arrays, 2, True), _round(cfg, reset, arrays, 2, False)
    assert not np.array_equal(kept, fresh)
    # the kept momentum is exactly what moved the first step: same seeds, lr -> 0 leaves only it
    tiny = _round(cfg, _ctx(), arrays, 2, False, lr=1e-12)
    assert np.abs(tiny).max() < 1e-9


def test_client_lr_from_the_round_config_is_used(data_dir):
    cfg = TrainConfig(
        method="dpsgd", epsilon=50.0, batch_size=16, train_subset=900, seed=3, data_dir=data_dir
    )
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("mnist-cnn", "mnist").state_dict())
    base = _round(cfg, _ctx(), arrays, 1, False, lr=cfg.lr, steps=1)
    half = _round(cfg, _ctx(), arrays, 1, False, lr=cfg.lr / 2, steps=1)
    np.testing.assert_allclose(half, base / 2, rtol=1e-4, atol=2e-7)  # one step: -lr * g (float32 p + d - p)


def test_local_steps_override_local_epochs_and_batch_larger_than_silo_is_refused():
    cfg = TrainConfig(method="dpsgd", batch_size=50)
    assert ClientPlan.for_silo(cfg, FederatedConfig(local_epochs=1.0), 1000).local_steps == 20
    assert ClientPlan.for_silo(cfg, FederatedConfig(local_steps=3), 1000).local_steps == 3
    with pytest.raises(ConfigError, match="batch-size"):
        ClientPlan.for_silo(cfg, FederatedConfig(), 40)


def test_parameter_ema_matches_a_naive_average():
    torch.manual_seed(0)
    model = build_model("mnist-cnn", "mnist")
    ema, decay = ParameterEMA(0.9), 0.9
    ref = None
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        flat = flat_parameters(model).double()
        ref = flat.clone() if ref is None else decay * ref + (1 - decay) * flat
        ema.update(flat_parameters(model))
    averaged = ema.averaged(model)
    assert averaged is not model
    torch.testing.assert_close(flat_parameters(averaged).double(), ref, rtol=0, atol=1e-6)
    assert torch.equal(flat_parameters(model), flat.float())  # the trained model is untouched
    with pytest.raises(ValueError):
        ParameterEMA(1.0)


def test_an_ema_longer_than_the_plan_is_warned_about():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ParameterEMA(0.999, updates=9)
        ParameterEMA(0.9, updates=100)  # horizon 10 <= 100: no warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "ema-decay 0.999 averages over ~1000 updates but the plan has 9" in messages[0]


def test_centralized_run_with_ema_and_cosine_schedule(tmp_path, data_dir):
    from common.trainer import train_centralized

    cfg = TrainConfig(
        method="dpsgd",
        epsilon=8.0,
        epochs=3,
        batch_size=128,
        train_subset=4000,
        test_subset=1000,
        ema_decay=0.9,
        lr_schedule="cosine",
        seed=0,
        data_dir=data_dir,
        out_dir=str(tmp_path),
    )
    with pytest.warns(UserWarning):
        summary = train_centralized(cfg, log=lambda s: None)
    assert summary["best_val_accuracy"] > 0.6  # chance is 0.1


def test_sweep_variants_are_combined_whole_with_the_grid(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text(
        '[sweep]\nmode = "federated"\n[base]\nmethod = "dpsgd"\n[grid]\nseed = [0, 1]\n'
        "[[variant]]\nnum-server-rounds = 30\n[[variant]]\nnum-server-rounds = 60\nserver-lr = 2.0\n"
    )
    cells = load_sweep(str(path)).cells()
    assert cells == [  # grid-major: complete pairs first when a sweep is cut short
        {"num-server-rounds": 30, "seed": 0},
        {"num-server-rounds": 60, "server-lr": 2.0, "seed": 0},
        {"num-server-rounds": 30, "seed": 1},
        {"num-server-rounds": 60, "server-lr": 2.0, "seed": 1},
    ]
    path.write_text("[sweep]\n[base]\n[grid]\nseed = [0]\n[[variant]]\nseed = 1\n")
    with pytest.raises(ConfigError, match="variant.seed"):
        load_sweep(str(path))
