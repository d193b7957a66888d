"""The client's durable state: restored after a restart, and never a reason to stop training."""

from __future__ import annotations

import os

import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client import state as client_state
from common import protocol as P


def _ctx():
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _saved_context(round_, momentum):
    ctx = _ctx()
    ctx.state[P.STATE_SPEND] = ConfigRecord(
        {"sigma": [1.0] * round_, "q": [0.1] * round_, "steps": [5] * round_}
    )
    client_state.save_arrays(ctx, P.STATE_OPTIMIZER, {"momentum_buffer": torch.full((4,), momentum)})
    return ctx


def test_restore_takes_arrays_from_before_the_replayed_round_and_spend_from_the_latest(tmp_path):
    d = str(tmp_path / "client-state")
    for r in (1, 2, 3):
        client_state.save(_saved_context(r, float(r)), d, 0, r)
    assert sorted(os.listdir(d)) == ["silo-0-round-2.pt", "silo-0-round-3.pt"]  # the last two
    fresh = _ctx()
    assert client_state.restore(fresh, d, 0, server_round=3) == 2  # round 3 is replayed
    assert torch.equal(
        client_state.load_arrays(fresh, P.STATE_OPTIMIZER)["momentum_buffer"], torch.full((4,), 2.0)
    )
    assert list(fresh.state[P.STATE_SPEND]["steps"]) == [5, 5, 5]  # round 3 ran: it stays spent
    current = _saved_context(3, 3.0)
    current.state[P.STATE_ROUND] = ConfigRecord({"round": 3})
    assert client_state.restore(current, d, 0, server_round=4) is None  # in-memory state wins


def test_an_unwritable_or_corrupt_copy_never_stops_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    ctx = _saved_context(1, 1.0)
    client_state.save(ctx, str(blocker / "client-state"), 0, 1)  # cannot create: warns, goes on
    assert P.STATE_ROUND in ctx.state
    d = tmp_path / "cs"
    d.mkdir()
    (d / "silo-0-round-1.pt").write_bytes(b"truncated")
    fresh = _ctx()
    assert client_state.restore(fresh, str(d), 0, server_round=2) is None
    assert P.STATE_OPTIMIZER not in fresh.state


def test_a_run_key_that_is_not_a_plain_folder_name_is_refused():
    import pytest

    from common.config import TrainConfig

    with pytest.raises(ValueError, match="plain folder name"):
        client_state.state_dir(TrainConfig(), _ctx(), "../../etc")


def test_one_process_serving_a_pixels_run_then_a_scatter_run_gets_each_its_own_features(data_dir):
    """Issue 28.3: the client process's silo cache was keyed without ``features``, so a second
    run with ScatterNet features was handed the first run's pixels."""
    from client.task import get_silo
    from common.config import TrainConfig

    ctx = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={"data-dir": data_dir},
    )
    base = TrainConfig(dataset="mnist", train_subset=200, seed=0)
    pixels = get_silo(base.replace(features="pixels", model="mnist-cnn"), ctx)
    scatter = get_silo(base.replace(features="scatter", model="scatter-linear"), ctx)
    assert tuple(pixels.train.x.shape[1:]) == (1, 28, 28)
    assert tuple(scatter.train.x.shape[1:]) == (81, 7, 7)
    assert len(pixels.train) == len(scatter.train)
