"""A simulation worker serves many clients with one engine: nothing of one client leaks
into the next client's round (same seed, same reply as a fresh process)."""

from __future__ import annotations

import os

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client import task
from common import protocol as P
from common.config import TrainConfig
from common.masks import pack_mask
from common.models import build_model


def _round(cfg, ctx, arrays, *, server_round, phase, mask=None, version=0):
    rc = {
        P.SERVER_ROUND: server_round,
        P.PHASE: phase,
        P.NOISE_MULTIPLIER: 1.0,
        P.SAMPLE_RATE: 0.1,
        P.LOCAL_STEPS: 3,
        P.MASK_VERSION: version,
    }
    if mask is not None:
        rc[P.MASK_BITS] = pack_mask(mask)
    out, metrics = task.train_round(cfg, ConfigRecord(rc), arrays, ctx)
    return {k: v.numpy() for k, v in out.items()}


def _ctx(pid):
    return Context(
        run_id=1,
        node_id=100 + pid,
        node_config={"partition-id": pid, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def test_shared_engine_gives_each_client_the_reply_of_a_fresh_process(data_dir):
    cfg = TrainConfig(
        method="adadpigu",
        epsilon=50.0,
        batch_size=16,
        train_subset=900,
        test_subset=100,
        seed=3,
        data_dir=data_dir,
    )
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("mnist-cnn", "mnist").state_dict())
    d = 26010
    mask = torch.rand(d) < 0.6

    def client_b_history(ctx):
        first = _round(cfg, ctx, arrays, server_round=1, phase=P.PHASE_IMPORTANCE)
        second = _round(cfg, ctx, arrays, server_round=2, phase=P.PHASE_TRAIN, mask=mask, version=1)
        return first, second

    # client A (partition 0) trains first in the same process, with its own statistics
    task._ENGINES.clear()
    ctx_a, ctx_b = _ctx(0), _ctx(1)
    _round(cfg, ctx_a, arrays, server_round=1, phase=P.PHASE_IMPORTANCE)
    b1_shared = _round(cfg, ctx_b, arrays, server_round=1, phase=P.PHASE_IMPORTANCE)
    _round(cfg, ctx_a, arrays, server_round=2, phase=P.PHASE_TRAIN, mask=mask, version=1)
    b2_shared = _round(cfg, ctx_b, arrays, server_round=2, phase=P.PHASE_TRAIN, mask=mask, version=1)
    assert len(task._ENGINES) == 1  # one engine served both clients

    task._ENGINES.clear()  # a fresh process serving only client B
    b1_fresh, b2_fresh = client_b_history(_ctx(1))
    for shared, fresh in ((b1_shared, b1_fresh), (b2_shared, b2_fresh)):
        assert shared.keys() == fresh.keys()
        for k in shared:
            np.testing.assert_array_equal(shared[k], fresh[k])


def test_which_data_a_silo_reads_follows_one_rule(monkeypatch, tmp_path):
    """node config > the run's explicit data-dir > $ADADPIGU_DATA_DIR > the server's folder."""
    cfg = TrainConfig(method="dpsgd", data_dir=str(tmp_path / "server"))

    def ctx(node=None, run=None):
        return Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 2, **({"data-dir": node} if node else {})},
            state=RecordDict(),
            run_config={"data-dir": run} if run else {},
        )

    monkeypatch.delenv("ADADPIGU_DATA_DIR", raising=False)
    assert task.data_dir_for(cfg, ctx()) == str(tmp_path / "server")
    monkeypatch.setenv("ADADPIGU_DATA_DIR", "/env/data")
    assert task.data_dir_for(cfg, ctx()) == "/env/data"
    assert task.data_dir_for(cfg, ctx(run="/flag/data")) == "/flag/data"  # the run's flag beats the env
    assert task.data_dir_for(cfg, ctx(node="/silo/own", run="/flag/data")) == "/silo/own"


def test_simulate_makes_every_worker_read_the_runs_data(monkeypatch, data_dir):
    import flwr.simulation

    from simulations import launcher

    seen = {}
    monkeypatch.setenv("ADADPIGU_DATA_DIR", "/somewhere/else")
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: seen.update(os.environ))
    cfg = TrainConfig(method="dpsgd", data_dir=data_dir)
    launcher.simulate(cfg, launcher.FederatedConfig(), num_supernodes=2)
    assert seen["ADADPIGU_DATA_DIR"] == os.path.abspath(data_dir)
