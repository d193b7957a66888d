"""Run folders and what is written into them, in one place: the folder's name, atomic JSON /
CSV / checkpoint writes (a crash never leaves a half-written file), and the command that
reproduces a run."""

from __future__ import annotations

import csv
import json
import math
import os
import time

import torch

from common.config import APP_DEFAULTS, FederatedConfig, TrainConfig


def run_dir_name(cfg: TrainConfig, kind: str = "central", digest: str | None = None) -> str:
    """``<time>-<kind>-<method>-<dataset>-eps<ε>-<settings hash>`` (kind: central, fed; the
    hash is the training settings' unless ``digest`` gives one over more settings)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    eps = (
        "inf" if not cfg.private else f"{cfg.epsilon:g}" if cfg.epsilon else f"sigma{cfg.noise_multiplier:g}"
    )
    return f"{stamp}-{kind}-{cfg.method}-{data_name(cfg)}-eps{eps}-{digest or cfg.digest()}"


def data_name(cfg: TrainConfig) -> str:
    """The data's name in run folders and reports: the built-in dataset, or the schema's name."""
    if not cfg.custom:
        return cfg.dataset
    from common.schema import schema_of

    try:
        return schema_of(cfg.dataset, cfg.schema).name
    except Exception:  # noqa: BLE001 - a name only; the schema's own errors come where it is read
        return "custom"


def write_json_atomic(path: str, obj: object) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    os.replace(tmp, path)


def write_csv(path: str, rows: list[dict]) -> None:
    """The rows as CSV; a value not measured (NaN, None) is an empty cell, the convention."""
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows({k: "" if _unmeasured(v) else v for k, v in r.items()} for r in rows)
    os.replace(tmp, path)


def _unmeasured(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value, spec: str = ".4f") -> str:
    """A metric for the console: ``-`` where it was not measured (NaN or None), never ``nan``.

    >>> fmt(0.97123), fmt(float("nan")), fmt(None, ".3f")
    ('0.9712', '-', '-')
    """
    return "-" if _unmeasured(value) else format(value, spec)


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: write then rename, so a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _changed(values: dict, defaults: dict) -> dict:
    """The settings that differ from their defaults (paths left out: they are the machine's)."""
    return {k: v for k, v in values.items() if k not in ("data-dir", "out-dir") and v != defaults.get(k)}


def reproduce_command(cfg: TrainConfig, subcommand: str = "train", fed: FederatedConfig | None = None) -> str:
    """``adadpigu <subcommand> --key value ...`` for the settings that differ from the defaults."""
    values = {**cfg.to_dict(), **(fed.to_dict() if fed else {})}
    defaults = {**TrainConfig().to_dict(), **(FederatedConfig().to_dict() if fed else {})}
    changed = _changed(values, defaults)
    return f"adadpigu {subcommand} " + " ".join(
        f"--{k} {'none' if v is None else v}" for k, v in changed.items()
    )


def federated_command(cfg: TrainConfig, fed: FederatedConfig) -> str:
    """``flwr run`` command that reproduces a federated run: the settings that differ from the
    Flower app's (pyproject.toml, :data:`~common.config.APP_DEFAULTS` over the dataclass
    defaults); then the ``adadpigu simulate`` one (settings that differ from the dataclass)."""
    defaults = {**TrainConfig().to_dict(), **FederatedConfig().to_dict(), **APP_DEFAULTS}
    changed = _changed({**cfg.to_dict(), **fed.to_dict()}, defaults)
    pairs = [
        f"{k}={json.dumps(v)}" if isinstance(v, str) else f"{k}={v}"
        for k, v in changed.items()
        if v is not None
    ]
    return f"flwr run . --run-config '{' '.join(pairs)}'  # or: " + reproduce_command(cfg, "simulate", fed)
