"""Experiment sweeps: a grid of runs from one TOML file, resumable, collected into tables.

A sweep file::

    [sweep]
    name = "central-mnist"
    mode = "central"            # or "federated"
    out-dir = "results/central-mnist"
    num-supernodes = 10         # federated only
    [base]                      # any setting of TrainConfig / FederatedConfig
    epochs = 40
    [grid]                      # every combination is one run
    method = ["adadpigu", "dpsgd"]
    epsilon = [3.0, 8.0]
    seed = [0, 1, 2]

``adadpigu sweep FILE`` runs the cells in sequence, skipping those already finished
(a cell is finished when its folder holds ``summary.json``) and those another live
``adadpigu sweep`` process has claimed (a ``.running`` file with its PID), so one grid
can be shared by several processes, one per core; then it writes ``results.csv``
(one row per run) and ``results.md`` (mean ± std over seeds). ``adadpigu report DIR``
builds the same tables from any folder of run folders.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields

from common.config import APP_DEFAULTS, FederatedConfig, TrainConfig, check_number, refuse_centralized_only
from common.errors import ConfigError, UserError, read_toml
from simulations.processes import process_alive
from simulations.results import collect, stopped_early

SWEEP_TABLES = ("sweep", "base", "grid", "variant")
SWEEP_KEYS = ("name", "mode", "out-dir", "num-supernodes", "num-cpus")


@dataclass(frozen=True)
class Sweep:
    name: str
    mode: str
    out_dir: str
    base: dict
    grid: dict
    num_supernodes: int = 10
    num_cpus: float = 1.0
    # [[variant]] tables: named settings combined as a whole (not as a product) with the grid
    variants: list[dict] = field(default_factory=list)

    def cells(self) -> list[dict]:
        keys = list(self.grid)
        grid = [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
        if not self.variants:
            return grid
        # grid-major: every variant of seed 0 before seed 1, so a sweep cut short leaves
        # complete pairs for `adadpigu compare`
        return [{**variant, **cell} for cell in grid for variant in self.variants]


def load_sweep(path: str) -> Sweep:
    data = read_toml(path, UserError, what="sweep file")
    unknown = sorted(set(data) - set(SWEEP_TABLES))
    if unknown:
        raise ConfigError(
            unknown[0], data[unknown[0]], f"unknown table; a sweep file has {', '.join(SWEEP_TABLES)}"
        )
    for table in ("sweep", "base", "grid"):
        if not isinstance(data.get(table, {}), dict):
            raise ConfigError(table, data[table], f"must be a [{table}] table")
    head = data.get("sweep", {})
    unknown = sorted(set(head) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(
            f"sweep.{unknown[0]}", head[unknown[0]], f"unknown key; allowed: {', '.join(SWEEP_KEYS)}"
        )
    mode = head.get("mode", "central")
    if mode not in ("central", "federated"):
        raise ConfigError("sweep.mode", mode, "allowed: central, federated")
    grid = data.get("grid", {})
    if not grid:
        raise ConfigError("grid", grid, "a sweep needs at least one [grid] key with a list of values")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"grid.{k}", v, "must be a non-empty list")
    variants = data.get("variant", [])
    if not isinstance(variants, list) or not all(isinstance(v, dict) and v for v in variants):
        raise ConfigError("variant", variants, "must be [[variant]] tables of settings")
    for v in variants:
        overlap = sorted(set(v) & set(grid))
        if overlap:
            raise ConfigError(f"variant.{overlap[0]}", v[overlap[0]], "is also a [grid] key")
    sweep = Sweep(
        name=str(head.get("name", os.path.splitext(os.path.basename(path))[0])),
        mode=mode,
        out_dir=str(head.get("out-dir", os.path.join("results", head.get("name", "sweep")))),
        base=dict(data.get("base", {})),
        grid=grid,
        num_supernodes=_sweep_number(head, "num-supernodes", 10, integer=True),
        num_cpus=_sweep_number(head, "num-cpus", 1.0),
        variants=[dict(v) for v in variants],
    )
    for cell in sweep.cells():  # validate every cell before running anything
        configs_for(sweep, cell)
    return sweep


def _sweep_number(head: dict, key: str, default: float, *, integer: bool = False):
    """A number of the [sweep] table: an integer >= 1 (num-supernodes) or a number > 0."""
    value = head.get(key, default)
    if integer:
        check_number(f"sweep.{key}", value, lo=1, integer=True)
        return int(value)
    check_number(f"sweep.{key}", value, lo=0.0, lo_open=True)
    return float(value)


def configs_for(sweep: Sweep, cell: dict) -> tuple[TrainConfig, FederatedConfig]:
    values = {**sweep.base, **cell}
    train_keys = {f.name.replace("_", "-") for f in fields(TrainConfig)}
    fed_keys = {f.name.replace("_", "-") for f in fields(FederatedConfig)}
    unknown = set(values) - train_keys - fed_keys
    if unknown:
        k = sorted(unknown)[0]
        raise ConfigError(k, values[k], "unknown setting")
    cfg = TrainConfig.from_mapping({k: v for k, v in values.items() if k in train_keys})
    fed = FederatedConfig.from_mapping({k: v for k, v in values.items() if k in fed_keys})
    if sweep.mode == "federated":
        refuse_centralized_only(values)
        fed.importance_rounds_for(cfg)
        fed.check_with(cfg)
    else:
        federated = sorted(k for k in values if k in fed_keys and k not in train_keys)
        if federated:
            raise ConfigError(
                federated[0], values[federated[0]], "is a federated setting; this sweep's mode is central"
            )
    return cfg, fed


def cell_dir(sweep: Sweep, cell: dict) -> str:
    label = "-".join(f"{k}={cell[k]}" for k in cell)
    digest = hashlib.sha256(json.dumps({**sweep.base, **cell}, sort_keys=True).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "=.-_" else "_" for c in label)
    return os.path.join(sweep.out_dir, f"{safe}-{digest}")


def unset_app_settings(sweep: Sweep) -> list[str]:
    """The settings in which `flwr run .` (pyproject.toml) differs from the dataclass defaults
    and which a federated sweep leaves unset in some cell: those cells run the dataclass's
    values, not the Flower app's (empty for a centralized sweep)."""
    if sweep.mode != "federated":
        return []
    return [k for k in APP_DEFAULTS if any(k not in {**sweep.base, **cell} for cell in sweep.cells())]


def run_sweep(sweep: Sweep, *, log: Callable[[str], None] = print) -> list[dict]:
    cells = sweep.cells()
    os.makedirs(sweep.out_dir, exist_ok=True)
    unset = unset_app_settings(sweep)
    if unset:
        log(
            "[sweep] note: a federated sweep starts from the dataclass defaults, as adadpigu simulate; "
            f"these cells use them, not flwr run's pyproject values, for: {', '.join(unset)}"
        )
    stopped: list[str] = []
    for i, cell in enumerate(cells, start=1):
        tag, target = f"[sweep {i}/{len(cells)}]", cell_dir(sweep, cell)
        summary_path = os.path.join(target, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as fh:
                reason = stopped_early(json.load(fh))
            if reason is None:
                log(f"{tag} done already: {cell}")
            else:
                log(
                    f"{tag} {cell} stopped before the end of its plan ({reason}): not a result; "
                    f"move its folder away to run it again: {target}"
                )
                stopped.append(f"{cell}: {reason}")
            continue
        if not _claim(target):
            log(f"{tag} running in another process: {cell}")
            continue
        try:
            reason = _run_cell(sweep, cell, target, tag, log)
        finally:
            _release(target)
        if reason is not None:
            stopped.append(f"{cell}: {reason}")
    rows = collect(sweep.out_dir)
    write_tables(rows, sweep.out_dir, group=[k for k in sweep.grid if k != "seed"])
    if stopped:
        raise UserError(
            f"{len(stopped)} cell(s) stopped before the end of their plan and are left out of the tables: "
            + "; ".join(stopped)
        )
    return rows


CLAIM_FILE = ".running"


def _claim(target: str) -> bool:
    """Claim a cell for this process (so several ``adadpigu sweep`` processes can share one
    grid); a claim whose process is gone (killed, crashed) is taken over."""
    os.makedirs(target, exist_ok=True)
    path = os.path.join(target, CLAIM_FILE)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as fh:
                    owner = int(fh.read().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and process_alive(owner):
                return False
            try:
                os.remove(path)  # stale claim
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def _release(target: str) -> None:
    try:
        os.remove(os.path.join(target, CLAIM_FILE))
    except FileNotFoundError:
        pass


def _run_cell(sweep: Sweep, cell: dict, target: str, tag: str, log: Callable[[str], None]) -> str | None:
    """Run one cell into ``target``; why it stopped early (None when it finished its plan)."""
    cfg, fed = configs_for(sweep, cell)
    cfg = cfg.replace(out_dir=target)
    log(f"{tag} running {cell}")
    t0 = time.time()
    if sweep.mode == "central":
        from common.trainer import train_centralized

        summary = train_centralized(cfg, log=lambda s: None, run_dir=target)
    else:
        from simulations.launcher import simulate

        if os.path.exists(os.path.join(target, "checkpoint.pt")):
            # a cell cut short (killed sweep, crashed Ray): continue its run rather than start
            # afresh, which would charge the silos again (their own accounts remember the
            # first attempt and refuse; the ledger would not)
            log(f"{tag} resuming the cell's interrupted run")
            fed = dataclasses.replace(fed, resume=target)
        summary = simulate(
            cfg, fed, num_supernodes=sweep.num_supernodes, num_cpus=sweep.num_cpus, run_dir=target
        )
        if summary is None or "error" in summary:
            reason = "see the log" if summary is None else summary["error"]
            raise UserError(f"federated cell {cell} did not complete: {reason}")
    reason = stopped_early(summary)
    if reason is not None:
        log(f"{tag} {cell}: stopped before the end of its plan ({reason}) after {time.time() - t0:.0f}s")
        return reason
    log(f"{tag} {cell}: test accuracy {summary.get('test_accuracy_best_val'):.4f} in {time.time() - t0:.0f}s")
    return None


def _fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    if any(math.isinf(v) for v in vals):
        return "∞"  # a non-private run: no finite epsilon
    mean = statistics.fmean(vals) * scale
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(vals) * scale:.{digits}f}"


def table(rows: list[dict], group: list[str]) -> str:
    """Markdown: one line per group, mean ± std (sample std) over the runs (seeds) in it."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group), []).append(r)
    head = [
        *group,
        "runs",
        "val acc % (best)",
        "test acc % (best val)",
        "test acc % (final)",
        "ε spent",
        "minutes/run",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def sort_key(item):
        return tuple((str(type(v)), v if v is not None else 0) for v in item[0])

    for key, runs in sorted(groups.items(), key=sort_key):
        eps = [r.get("epsilon_spent") for r in runs]
        eps_s = "∞" if all(e is None for e in eps) else _fmt([e for e in eps if e is not None], 1.0, 3)
        lines.append(
            "| " + " | ".join(str(k) for k in key) + f" | {len(runs)} | "
            f"{_fmt([r.get('best_val_accuracy') for r in runs])} | "
            f"{_fmt([r.get('test_accuracy_best_val') for r in runs])} | "
            f"{_fmt([r.get('test_accuracy_final') for r in runs])} | {eps_s} | "
            f"{_fmt([r.get('seconds') for r in runs], 1 / 60, 1)} |"
        )
    return "\n".join(lines) + "\n"


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]  # fmt: skip


def _setting_default(key: str):
    """Today's default of a setting, for runs made before the setting existed."""
    from common.config import FederatedConfig, TrainConfig

    name = key.replace("-", "_")
    for cls in (TrainConfig, FederatedConfig):
        for f in fields(cls):
            if f.name == name and f.default is not MISSING:
                return f.default
    return None


def _matches(row: dict, selector: dict[str, str]) -> bool:
    """``selector`` (setting -> value, as text) holds for ``row``; a setting the run
    predates counts as today's default (e.g. mask-refresh 0 for runs before it existed)."""
    return all(str(row.get(k, _setting_default(k))) == v for k, v in selector.items())


def paired_difference(
    rows: list[dict],
    *,
    by: str,
    a: str,
    b: str,
    pair_on: list[str] | None = None,
    metric: str = "test_accuracy_best_val",
) -> dict:
    """Mean of ``metric``(side a) - ``metric``(side b) over runs paired on ``pair_on``
    (default: every other setting, i.e. runs that differ only in ``by``), with a two-sided
    95% t-interval; pairs missing either side are left out.

    A side is a value of ``by`` or, when it contains "=", a selector
    ``"key=value,key=value"`` (e.g. ``method=adadpigu,mask-refresh=5`` against
    ``method=dpsgd`` paired on ``seed``)."""
    sel = {
        name: dict(item.split("=", 1) for item in value.split(",")) if "=" in value else {by: value}
        for name, value in (("a", a), ("b", b))
    }
    skip = set(_RUN_ONLY) | {k for s_ in sel.values() for k in s_}
    side: dict[str, dict[tuple, float]] = {"a": {}, "b": {}}
    ambiguous = False
    for r in rows:
        if r.get(metric) is None:
            continue
        for name in ("a", "b"):
            if _matches(r, sel[name]):
                keys = pair_on if pair_on else [k for k in r if k not in skip]
                key = tuple(sorted((k, str(r.get(k))) for k in keys))
                ambiguous |= key in side[name]
                side[name][key] = float(r[metric])
    if ambiguous:
        raise UserError(
            "more than one run per pair on one side: narrow the sides (key=value selectors) or pair on more settings"
        )
    keys = sorted(set(side["a"]) & set(side["b"]))
    diffs = [side["a"][k] - side["b"][k] for k in keys]
    out = {"pairs": len(diffs), "a": a, "b": b, "metric": metric, "differences": diffs}
    if len(diffs) >= 2:
        mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        half = (_T975[len(diffs) - 2] if len(diffs) - 1 <= len(_T975) else 1.96) * sd / math.sqrt(len(diffs))
        out.update(mean=mean, ci95=(mean - half, mean + half))
    elif diffs:
        out.update(mean=diffs[0], ci95=None)
    return out


# per-run columns that are outcomes, not settings (left out when pairing runs)
_RUN_ONLY = {
    "test_accuracy_best_val", "test_accuracy_final", "best_val_accuracy", "epsilon_spent",
    "rounds_completed", "seconds", "run_dir", "command", "out-dir", "data-dir", "resume",
}  # fmt: skip


def write_tables(rows: list[dict], out_dir: str, group: list[str]) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w") as fh:
        fh.write(table(rows, group))
    return csv_path, md_path
