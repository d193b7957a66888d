"""What a client keeps between rounds, and where.

In memory, in Flower's ``context.state`` (per node, kept by the SuperNode / simulation):
the mask bits, the AdaCliP statistics, the optimizer state (momentum, Adam moments) and the
client's own privacy spend. All of it is post-processing of this client's released
(noised) gradients or public metadata.

Durably, after every round, a copy on the silo's own disk
(``<state-dir>/<run>/client-state/silo-<partition-id>-round-<r>.pt``, written atomically;
the last two rounds are kept), so that a resumed run continues exactly where it stopped
(the server's checkpoint holds the global model, the client holds its own state). After a
restart ``context.state`` is empty and :func:`restore` reloads it: statistics and optimizer
state from the last round *before* the one now asked for (a replayed round starts from
the same state as the interrupted one), the privacy spend from the latest file (a round
that ran before the interruption stays spent). ``state-dir`` comes from the node config,
then ``$ADADPIGU_STATE_DIR``, then the run's ``out-dir``.
"""

from __future__ import annotations

import glob
import os
import re
from logging import WARNING

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common import log

from common import protocol as P
from common.config import TrainConfig

STATE_DIR_ENV = "ADADPIGU_STATE_DIR"
_ARRAY_KEYS = (P.STATE_STATS, P.STATE_OPTIMIZER)
_SAFE_RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,200}$")


def state_dir(cfg: TrainConfig, context: Context, run_key: str) -> str | None:
    """The folder for this run's durable client state (None: the server sent no run key)."""
    if not run_key:
        return None
    if not _SAFE_RUN_KEY.match(run_key):
        raise ValueError(f"run key {run_key!r} from the server is not a plain folder name")
    base = str(context.node_config.get("state-dir") or os.environ.get(STATE_DIR_ENV) or cfg.out_dir)
    return os.path.join(base, run_key, "client-state")


def _files(directory: str, pid: int) -> dict[int, str]:
    out = {}
    for path in glob.glob(os.path.join(directory, f"silo-{pid}-round-*.pt")):
        m = re.search(r"-round-(\d+)\.pt$", path)
        if m:
            out[int(m.group(1))] = path
    return out


def load_arrays(context: Context, key: str) -> dict[str, torch.Tensor] | None:
    rec = context.state.get(key)
    if rec is None:
        return None
    return {k: torch.from_numpy(rec[k].numpy().copy()) for k in rec}


def save_arrays(context: Context, key: str, tensors: dict[str, torch.Tensor]) -> None:
    context.state[key] = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in tensors.items()})


def restore(context: Context, directory: str | None, pid: int, server_round: int) -> int | None:
    """Reload this silo's state from disk into an empty ``context.state``; returns the round
    whose statistics and optimizer state were loaded (None: nothing loaded)."""
    if directory is None or P.STATE_ROUND in context.state:
        return None  # no durable copy, or the in-memory state is current
    files = _files(directory, pid)
    if not files:
        return None
    try:
        return _load(context, files, server_round)
    except Exception as exc:  # unreadable copy: start afresh; the server's ledger still binds
        log(
            WARNING, "client state of silo %d in %s cannot be read (%s): starting afresh", pid, directory, exc
        )
        return None


def _load(context: Context, files: dict[int, str], server_round: int) -> int | None:
    latest = torch.load(files[max(files)], map_location="cpu", weights_only=True)
    context.state[P.STATE_SPEND] = ConfigRecord(latest["spend"])
    earlier = [r for r in files if r < server_round]
    if not earlier:
        return None
    saved = torch.load(files[max(earlier)], map_location="cpu", weights_only=True)
    for key, tensors in saved["arrays"].items():
        save_arrays(context, key, tensors)
    return max(earlier)


def save(context: Context, directory: str | None, pid: int, server_round: int) -> None:
    """Mark ``context.state`` current for ``server_round`` and write its durable copy.

    A silo whose disk cannot take the copy still trains (the in-memory state is complete);
    it only loses exact continuation after a restart, and says so."""
    context.state[P.STATE_ROUND] = ConfigRecord({"round": server_round})
    if directory is None:
        return
    try:
        _write(context, directory, pid, server_round)
    except OSError as exc:
        log(
            WARNING,
            "client state of silo %d not written to %s (%s): a restart will not continue it",
            pid,
            directory,
            exc,
        )


def _write(context: Context, directory: str, pid: int, server_round: int) -> None:
    os.makedirs(directory, exist_ok=True)
    spend = context.state.get(P.STATE_SPEND)
    blob = {
        "round": server_round,
        "spend": {k: list(spend[k]) for k in spend}
        if spend is not None
        else {"sigma": [], "q": [], "steps": []},
        "arrays": {key: load_arrays(context, key) for key in _ARRAY_KEYS if key in context.state},
    }
    path = os.path.join(directory, f"silo-{pid}-round-{server_round}.pt")
    torch.save(blob, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    for r, old in _files(directory, pid).items():
        if r < server_round - 1:
            os.remove(old)
