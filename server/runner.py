"""The federated run loop on a Flower Grid: discovery, rounds, ledger, evaluation, outputs.

Written as an explicit loop over the strategy's hooks (rather than ``Strategy.start``)
because a DP run must be able to stop *before* a round that would overspend, and must
record each client's spend when the round is sent.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from common import protocol as P
from common.config import FederatedConfig, TrainConfig
from common.data import TensorData, load_dataset, take_subset, with_features
from common.engine import evaluate
from common.errors import BudgetError, ConfigError, DataError, UserError
from common.models import build_model_for
from common.outputs import (
    data_name,
    federated_command,
    fmt,
    run_dir_name,
    save_checkpoint,
    write_csv,
    write_json_atomic,
)
from common.schema import schema_of
from common.silos import read_dataset
from server.ledger import PrivacyLedger
from server.secagg import SecAggRefused
from server.strategy import AdaDPIGUStrategy, RoundError


def _info(msg: str) -> None:
    log(INFO, msg)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.time() > deadline:
            raise RoundError(
                f"only {len(nodes)} of the {minimum} required clients connected within {timeout:g}s"
            )
        time.sleep(0.5)


def fed_run_dir(cfg: TrainConfig, fed: FederatedConfig) -> str:
    """A new run folder under out-dir, named by the time and a hash of every result-changing
    setting (federated ones too); never one that exists (two runs started in one second)."""
    blob = json.dumps(config_fingerprint(cfg, fed), sort_keys=True, default=str).encode()
    base = os.path.join(cfg.out_dir, run_dir_name(cfg, "fed", hashlib.sha256(blob).hexdigest()[:10]))
    path, n = base, 1
    while os.path.exists(path):
        path, n = f"{base}-{n}", n + 1
    return path


_NOT_RESULT_CHANGING = {"out-dir", "data-dir", "device", "resume", "round-timeout", "startup-timeout"}


# Settings added after runs were checkpointed, each with the value that reproduces what those
# runs did: a checkpoint without the key resumes as if it had this value. Only keys whose
# default is the old behaviour belong here (silo-sizes, for one, does not: its default changed
# what a run sends).
ADDED_SETTINGS = {
    "features": "pixels",
    "scatter-groups": 27,
    "scatter-norm": "group",
    "scatter-norm-noise": 8.0,
    "scatter-norm-clip": 1.0,
    # issue 26 (own data, federated evaluation): their defaults are the old behaviour
    "schema": "",
    "test-fraction": 0.0,
    "mlp-hidden": "64",
    "server-test-data": "auto",
    "federated-test": "auto",
    "test-noise": 10.0,
    "test-loss-bound": 5.0,
}


def config_fingerprint(cfg: TrainConfig, fed: FederatedConfig) -> dict:
    """The settings a resumed run must share with the run it continues."""
    merged = {**cfg.to_dict(), **fed.to_dict()}
    merged["partitioner"] = cfg.resolved_partitioner()  # "auto" was "iid" before it existed
    return {k: v for k, v in merged.items() if k not in _NOT_RESULT_CHANGING}


def load_checkpoint(run_dir: str, cfg: TrainConfig, fed: FederatedConfig) -> tuple[dict, PrivacyLedger]:
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        raise UserError(f"resume: {path} does not exist (no round of that run finished)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"resume: {path} cannot be read: {exc}") from None
    old, new = {**ADDED_SETTINGS, **ckpt["fingerprint"]}, config_fingerprint(cfg, fed)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
        raise UserError(
            f"resume: the settings differ from the run in {run_dir} ({shown}); refusing to continue"
        )
    ledger_path = os.path.join(run_dir, "ledger.json")
    try:
        with open(ledger_path) as fh:
            ledger = PrivacyLedger.from_dict(json.load(fh))  # write-ahead: may include an interrupted round
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"resume: the ledger {ledger_path} cannot be read ({exc}); refusing to continue"
        ) from None
    return ckpt, ledger


def _write_label_distribution(cfg: TrainConfig, num_partitions: int, run_dir: str, log_fn) -> None:
    """``label-distribution.json``: examples per class per silo, recomputed from the public
    partition recipe (``simulations`` draws it: ``adadpigu plot``, ``adadpigu simulate``).

    Possible in simulation and on-loopback runs, where the server can load the same
    dataset; clients never send label counts (they are not DP).
    """
    try:
        from common.partition import label_distribution, partition_indices, skew_statistic

        labels = take_subset(load_dataset(cfg.dataset, cfg.data_dir, True), cfg.train_subset).y
        dist = label_distribution(labels, partition_indices(labels, num_partitions, cfg))
        title = f"{cfg.dataset}, {cfg.partitioner}, {num_partitions} silos (skew {skew_statistic(dist):.3f})"
        write_json_atomic(
            os.path.join(run_dir, "label-distribution.json"), {"counts": dist.tolist(), "title": title}
        )
    except Exception as exc:  # missing counts must not stop a DP run
        log_fn(f"[plan] no label distribution: {exc}")


@dataclass
class FederatedRun:
    """What a federated run carries from one round to the next (and into its checkpoint)."""

    cfg: TrainConfig
    fed: FederatedConfig
    run_dir: str
    strategy: AdaDPIGUStrategy
    ledger: PrivacyLedger
    test: TensorData | None  # the server's own test set (None: federated evaluation only)
    log_fn: Callable[[str], None]
    t0: float
    rows: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"round": 0, "val_accuracy": -1.0})
    best_state: dict = field(default_factory=dict)
    first_round: int = 1


def run_federated(
    grid: Grid,
    cfg: TrainConfig,
    fed: FederatedConfig,
    *,
    log_fn: Callable[[str], None] = _info,
    command: str | None = None,
    run_dir: str | None = None,
) -> dict:
    """Run the whole federated training; returns the summary (also in the run folder)."""
    run = set_up(grid, cfg, fed, log_fn=log_fn, command=command, run_dir=run_dir)
    arrays = ArrayRecord(run.strategy.model.state_dict())
    stop_reason = "completed"
    for rnd in range(run.first_round, fed.num_server_rounds + 1):
        arrays, stop_reason = run_round(grid, run, rnd, arrays)
        if stop_reason != "completed":
            break
    return finish(run, stop_reason)


# ----- set up ---------------------------------------------------------------------------


def set_up(
    grid: Grid,
    cfg: TrainConfig,
    fed: FederatedConfig,
    *,
    log_fn: Callable[[str], None],
    command: str | None,
    run_dir: str | None,
) -> FederatedRun:
    """Open (or reopen) the run folder, find and plan the silos, restore a checkpoint."""
    t0 = time.time()
    fed.check_with(cfg)  # before a run folder exists
    ckpt, resumed_ledger = open_checkpoint(fed.resume, cfg, fed) if fed.resume else (None, None)
    # every file the server reads is read before its run folder exists: a corrupt one leaves nothing
    test = server_test_set(cfg, fed)
    target = fed.resume or run_dir or fed_run_dir(cfg, fed)
    made = not os.path.exists(target)
    run_dir = _open_run_dir(cfg, fed, target, fresh=ckpt is None, command=command)
    try:
        return _set_up_in(grid, cfg, fed, run_dir, ckpt, resumed_ledger, test, log_fn, t0)
    except UserError:
        if made:  # refused before round 1 (nothing was spent): leave no half-made run folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _set_up_in(
    grid: Grid,
    cfg: TrainConfig,
    fed: FederatedConfig,
    run_dir: str,
    ckpt: dict | None,
    resumed_ledger: PrivacyLedger | None,
    test: TensorData | None,
    log_fn: Callable[[str], None],
    t0: float,
) -> FederatedRun:
    # silos without a state-dir of their own (simulation) keep their state in
    # <run folder>/client-state, whatever out-dir says (a resume from another out-dir too)
    cfg = cfg.replace(out_dir=os.path.dirname(os.path.normpath(run_dir)) or ".")
    torch.manual_seed(cfg.seed if cfg.seeded else torch.seed())
    model = build_model_for(cfg)
    ledger = (
        resumed_ledger
        if resumed_ledger is not None
        else PrivacyLedger(
            delta=cfg.delta,
            accountant=cfg.accountant,
            target_epsilon=cfg.epsilon if cfg.private else None,
            private=cfg.private,
        )
    )
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    strategy = AdaDPIGUStrategy(cfg, fed, model=model, ledger=ledger)
    strategy.run_key = _run_key(run_dir)
    run = FederatedRun(cfg, fed, run_dir, strategy, ledger, test, log_fn, t0)
    _discover_and_plan(grid, run, ckpt)
    if ckpt is None:
        # the initial model on the server's test set; with federated evaluation only, it is not
        # measured (that would be one more release charged to every silo)
        test_loss, test_acc = evaluate(strategy.model, test) if test is not None else (math.nan, math.nan)
        run.rows = [
            {
                "round": 0,
                "phase": "init",
                "retention_ratio": 1.0,
                "test_accuracy": test_acc,
                "test_loss": test_loss,
                **ledger.summary([]),  # 0 before any round (infinite for a non-private run)
            }
        ]
        log_fn(f"[round   0] init test acc {fmt(test_acc)}")
        run.best_state = copy.deepcopy(model.state_dict())
    else:
        _restore_progress(run, ckpt)
    return run


def server_test_set(cfg: TrainConfig, fed: FederatedConfig) -> TensorData | None:
    """The server's own test set (``server-test-data``): a built-in dataset's test split, the
    coordinator's dataset read with the run's schema, or None (federated evaluation only)."""
    where = fed.server_test(cfg)
    if where is None:
        return None
    if where == "builtin":
        return with_features(
            take_subset(load_dataset(cfg.dataset, cfg.data_dir, False), cfg.test_subset),
            cfg.features,
            f"{cfg.dataset}-test",
        )
    schema = schema_of(cfg.dataset, cfg.schema)
    try:
        data = read_dataset(where, schema)
    except DataError as exc:
        raise DataError(f"server-test-data: {exc}") from None
    return with_features(
        take_subset(data, cfg.test_subset), cfg.features, f"{schema.name}-server-test", schema=schema
    )


def _run_key(run_dir: str) -> str:
    """The run's name for the silos: they keep their durable state (momentum, statistics,
    their own privacy account) under ``<state-dir>/<run key>/client-state``."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", os.path.basename(os.path.normpath(run_dir))).lstrip("._=-")


def open_checkpoint(resume: str, cfg: TrainConfig, fed: FederatedConfig) -> tuple[dict, PrivacyLedger]:
    """:func:`load_checkpoint` of a run that can be continued: not finished, and not renamed
    (the silos keep their state and their own privacy accounts under the run's name: another
    name would give them fresh momentum and empty accounts)."""
    ckpt, ledger = load_checkpoint(resume, cfg, fed)
    saved = ckpt.get("run_key")
    if saved is not None and saved != _run_key(resume):
        raise UserError(
            f"resume: the run folder was renamed (it was {saved!r}); the silos keep their state and "
            "their own privacy accounts under the run's name: rename it back"
        )
    if ckpt["round"] >= fed.num_server_rounds:
        raise UserError(f"resume: the run in {resume} finished all its {fed.num_server_rounds} rounds")
    return ckpt, ledger


def _open_run_dir(
    cfg: TrainConfig, fed: FederatedConfig, run_dir: str, *, fresh: bool, command: str | None
) -> str:
    os.makedirs(run_dir, exist_ok=True)
    if fresh:
        write_json_atomic(
            os.path.join(run_dir, "config.json"), {"train": cfg.to_dict(), "federated": fed.to_dict()}
        )
        with open(os.path.join(run_dir, "command.txt"), "w") as fh:
            fh.write((command or federated_command(cfg, fed)) + "\n")
    return run_dir


def _discover_and_plan(grid: Grid, run: FederatedRun, ckpt: dict | None) -> None:
    """Wait for the nodes, ask each for its silo's sizes, calibrate the noise, write plan.json."""
    cfg, fed, strategy = run.cfg, run.fed, run.strategy
    nodes = wait_for_nodes(grid, fed.min_available_nodes, fed.startup_timeout)
    t_nodes = time.time()
    query = ConfigRecord({P.TRAIN_CONFIG: strategy.train_config_json})
    replies = grid.send_and_receive(
        [
            Message(RecordDict({P.CONFIG: query}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes
        ],
        timeout=fed.startup_timeout,
    )
    strategy.register_silos(replies)
    t_query = time.time()
    if len(strategy.silos) < fed.min_train_nodes:
        raise RoundError(
            f"{len(strategy.silos)} clients registered; min-train-nodes is {fed.min_train_nodes}"
        )
    if strategy.distributed and fed.secagg_survivors > len(strategy.silos):
        raise ConfigError(
            "secagg-survivors",
            fed.secagg_survivors,
            f"exceeds the {len(strategy.silos)} silos that registered: no round could be aggregated",
        )
    strategy.calibrate()
    if ckpt is not None:
        strategy.load_state(ckpt["strategy"])
        own_path = os.path.join(run.run_dir, OWN_SHARE_LEDGER)
        if strategy.distributed and os.path.exists(own_path):
            # written ahead like ledger.json: it may hold an interrupted round the checkpoint has not
            with open(own_path) as fh:
                strategy.own_ledger = PrivacyLedger.from_dict(json.load(fh))
        now = {s.name: s.noise_multiplier for s in strategy.silos.values()}
        if now != ckpt["strategy"]["noise"]:
            raise UserError(
                "resume: the silos or their sizes changed since the checkpoint (noise multipliers "
                f"{ckpt['strategy']['noise']} -> {now}); refusing to continue"
            )
    run.log_fn(
        f"[setup] {len(nodes)} nodes after {t_nodes - run.t0:.1f}s; silo query {t_query - t_nodes:.1f}s; "
        f"noise calibration {time.time() - t_query:.1f}s"
    )
    plans = {
        s.name: {
            "n_train": s.n_train,
            "n_val": s.n_val,
            "sample_rate": s.plan.sample_rate,
            "local_steps": s.plan.local_steps,
            "noise_multiplier": s.noise_multiplier,
        }
        for s in sorted(strategy.silos.values(), key=lambda s: s.name)
    }
    write_json_atomic(os.path.join(run.run_dir, "plan.json"), plans)
    if ckpt is None and not cfg.custom and cfg.resolved_partitioner() != "none":
        _write_label_distribution(cfg, len(strategy.silos), run.run_dir, run.log_fn)
    sigmas = sorted({round(s.noise_multiplier, 6) for s in strategy.silos.values()})
    run.log_fn(
        f"[plan] {cfg.method} on {cfg.dataset}: {len(strategy.silos)} silos, {fed.num_server_rounds} rounds "
        f"({strategy.importance_rounds} importance), noise multiplier {sigmas}, target epsilon "
        f"{cfg.epsilon if cfg.private else 'inf'} at delta {cfg.delta:g}; model selection: "
        f"{_selection_words(cfg, fed)}; silo sizes: "
        f"{'declared (public)' if cfg.silo_sizes == 'declared' else 'EXACT counts, outside the DP guarantee (opt-out)'}; "
        f"noise: {_noise_words(fed, len(strategy.silos))}; test: {_test_words(run)}; "
        f"run folder {run.run_dir}"
    )
    if cfg.silo_sizes == "exact" and cfg.private:
        log(
            WARNING,
            "silo-sizes = 'exact': the silos' exact example counts leave them, outside the DP guarantee",
        )
    if fed.validation_release == "exact" and cfg.private:
        log(
            WARNING,
            "validation-release = 'exact': validation accuracy and loss leave the silos without noise, outside the DP guarantee",
        )
    if fed.resolved_federated_test(cfg) == "exact" and cfg.private and run.test is None:
        log(
            WARNING,
            "federated-test = 'exact': test accuracy and loss leave the silos without noise, outside the DP guarantee",
        )
    strategy.warn_if_test_is_noise(run.test is None)


def _restore_progress(run: FederatedRun, ckpt: dict) -> None:
    run.rows, run.best, run.best_state = ckpt["rows"], ckpt["best"], ckpt["best_state"]
    run.first_round = int(ckpt["round"]) + 1
    charged = max((h["round"] for hs in run.ledger.history.values() for h in hs), default=0)
    run.log_fn(f"[resume] continuing {run.run_dir} at round {run.first_round}")
    if charged >= run.first_round:
        log(
            WARNING,
            "round %d was sent before the interruption: its privacy spend stays charged "
            "(clients may have trained on it) and the round is run again; the plan has %d "
            "reserve round(s) for this (reserve-rounds), without them the last round may "
            "not fit the budget",
            charged,
            run.fed.reserve_rounds,
        )


# ----- one round ------------------------------------------------------------------------


OWN_SHARE_LEDGER = "ledger-own-share.json"


def _write_ledgers_ahead(run: FederatedRun) -> None:
    """The ledgers as charged so far (epsilons not yet derived), before clients train: what a
    resume reads back, so an interrupted round stays charged. Distributed noise: the
    own-share ledger too (from the checkpoint alone, a resume would forget that round)."""
    write_json_atomic(os.path.join(run.run_dir, "ledger.json"), run.ledger.to_dict(pending=True))
    if run.strategy.distributed:
        write_json_atomic(
            os.path.join(run.run_dir, OWN_SHARE_LEDGER), run.strategy.own_ledger.to_dict(pending=True)
        )


def run_round(grid: Grid, run: FederatedRun, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord, str]:
    """Check the budget, charge, train, aggregate, evaluate, write; (new arrays, stop reason)."""
    strategy, fed = run.strategy, run.fed
    t_round = time.time()
    try:
        messages = strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
    except (BudgetError, RoundError, SecAggRefused) as exc:
        kind = "budget" if isinstance(exc, BudgetError) else "clients"
        log(WARNING, "stopping before round %d: %s", rnd, exc)
        return arrays, f"{kind}: {exc}"
    strategy.record_spend(rnd)
    # write-ahead: the spend (its phases) is on disk before any client starts training; the
    # epsilons it implies, and the next round's budget check, are computed while they train
    _write_ledgers_ahead(run)
    accounting = _Prefetch(run.ledger, strategy.planned_phases() if run.cfg.private else {})
    t_send = time.time()
    replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
    t_clients = time.time() - t_send
    accounting.join()
    try:
        new_arrays, agg = strategy.aggregate_train(rnd, replies)
    except SecAggRefused as exc:
        # nothing of this round was unmasked, so nothing was released: its charge is withdrawn
        names = run.ledger.revoke(rnd)  # this attempt's charge only (an interrupted one's stays)
        strategy.own_ledger.revoke(rnd)
        _write_ledgers_ahead(run)
        log(
            WARNING,
            "round %d was not aggregated: %s; its privacy charge to %d silo(s) is withdrawn (nothing was unmasked)",
            rnd,
            exc,
            len(names),
        )
        return arrays, f"secure aggregation: {exc}"
    arrays = new_arrays if new_arrays is not None else arrays
    agg_d = dict(agg) if agg is not None else {}
    stop_reason = "completed"
    if agg_d.get("insufficient"):
        stop_reason = (
            f"clients: round {rnd} got {int(agg_d.get('clients-valid', 0))} valid updates of "
            f"{int(agg_d.get('clients-sent', 0))} sent, fewer than min-train-nodes ({fed.min_train_nodes})"
        )
    eval_model = strategy.evaluation_model()  # the EMA of the weights when ema-decay > 0
    row = _round_row(grid, run, rnd, arrays, eval_model, agg_d)
    row.update(seconds=time.time() - t_round, seconds_clients=t_clients, started_at=t_round)
    # "seconds_clients": from sending the training messages to the last reply (the rest of
    # "seconds" is the server's own work: checks, aggregation, evaluation, files)
    run.rows.append(row)
    if not math.isnan(row["val_accuracy"]) and row["val_accuracy"] > run.best["val_accuracy"]:
        run.best = {"round": rnd, "val_accuracy": row["val_accuracy"]}
        run.best_state = copy.deepcopy(eval_model.state_dict())
    _write_round(run, rnd, eval_model)
    run.log_fn(
        f"[round {rnd:3d}] {row['phase']:10s} r={row['retention_ratio']:.2f} test acc {fmt(row['test_accuracy'])}"
        f"{_std_words(row['test_accuracy_std'])} "
        f"val acc {fmt(row['val_accuracy'])} eps max {row['max_epsilon']:.3f} mean {row['mean_epsilon']:.3f} "
        f"up {row['bytes_up_per_client'] / 1e3:.1f} kB down {row['bytes_down_per_client'] / 1e3:.1f} kB "
        f"rejected {row['rejected_updates']} failed {row['failed_clients']} ({row['seconds']:.1f}s)"
        + (
            f" own-share eps {row['max_epsilon_own_share']:.3g}"
            if not math.isnan(row.get("max_epsilon_own_share", math.nan))
            else ""
        )
    )
    if stop_reason != "completed":
        log(WARNING, "stopping after round %d: %s", rnd, stop_reason)
    return arrays, stop_reason


class _Prefetch(threading.Thread):
    """The ledger's accounting for this round and the next check, off the critical path.
    Only fills the accountant's cache and derived epsilons: an error here is raised again
    where the same numbers are computed on the main thread."""

    def __init__(self, ledger: PrivacyLedger, planned: dict) -> None:
        super().__init__(name="ledger-prefetch", daemon=True)
        self.ledger, self.planned = ledger, planned
        self.start()

    def run(self) -> None:
        try:
            self.ledger.prefetch(self.planned)
        except Exception:  # noqa: BLE001 - recomputed (and raised) on the main thread
            pass


def _round_row(
    grid: Grid, run: FederatedRun, rnd: int, arrays: ArrayRecord, eval_model: torch.nn.Module, agg_d: dict
) -> dict:
    """The round's metrics row: test and validation accuracy of ``eval_model``, epsilon, traffic."""
    strategy, fed = run.strategy, run.fed
    last = rnd == fed.num_server_rounds
    eval_arrays = arrays if eval_model is strategy.model else ArrayRecord(eval_model.state_dict())
    val = None
    if fed.validation_release != "none" and (rnd % fed.evaluate_interval == 0 or last):
        val = _ask_silos(grid, run, rnd, eval_arrays, "validation")
    test = {"test_accuracy": math.nan, "test_loss": math.nan, "test_accuracy_std": math.nan}
    if rnd % fed.test_interval == 0 or last:
        test = _test_metrics(grid, run, rnd, eval_model, eval_arrays)
    eps = run.ledger.summary(s.name for s in strategy.silos.values())
    n_sent = max(int(agg_d.get("clients-sent", 0)), 1)
    return {
        "round": rnd,
        "phase": strategy.phase_of(rnd),
        "retention_ratio": strategy.ratio_of(rnd),
        "active_ratio": 1.0 if strategy.mask is None else float(strategy.mask.float().mean()),
        "mask_version": strategy.mask_version,
        **test,
        "val_accuracy": float(val[P.VAL_ACCURACY]) if val is not None else math.nan,
        "max_epsilon": eps["max_epsilon"],
        "mean_epsilon": eps["mean_epsilon"],
        "clients": int(agg_d.get("clients-sent", 0)),
        "valid_updates": int(agg_d.get("clients-valid", 0)),
        "rejected_updates": int(agg_d.get("rejected", 0)),
        "failed_clients": int(agg_d.get("failed", 0)),
        "bytes_down_per_client": float(agg_d.get("bytes-down", 0.0)) / n_sent,
        "bytes_up_per_client": float(agg_d.get("bytes-up", 0.0)) / max(int(agg_d.get("clients-valid", 0)), 1),
        "dense_bytes": 4 * strategy.d,
        **_distributed_columns(run, rnd, agg_d, test_round=rnd % fed.test_interval == 0 or last),
    }


def _ask_silos(
    grid: Grid, run: FederatedRun, rnd: int, arrays: ArrayRecord, purpose: str
) -> MetricRecord | None:
    """Ask the silos for validation or test metrics of ``arrays``: a noisy release is charged
    in the ledger (written ahead, as for training) before the messages go out."""
    strategy = run.strategy
    messages = strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid, purpose)
    phase = strategy.test_phase() if purpose == "test" else strategy.validation_phase()
    if messages and phase is not None:
        _write_ledgers_ahead(run)
    replies = grid.send_and_receive(messages, timeout=run.fed.round_timeout)
    return strategy.aggregate_evaluate(rnd, replies, purpose)


def _test_metrics(
    grid: Grid, run: FederatedRun, rnd: int, eval_model: torch.nn.Module, arrays: ArrayRecord
) -> dict:
    """The test columns of a row: the server's own test set, else the silos' federated test
    release (its accuracy with the std of its noise)."""
    if run.test is not None:
        loss, acc = evaluate(eval_model, run.test)
        return {"test_accuracy": acc, "test_loss": loss, "test_accuracy_std": 0.0}
    if run.fed.resolved_federated_test(run.cfg) == "none":
        return {"test_accuracy": math.nan, "test_loss": math.nan, "test_accuracy_std": math.nan}
    got = _ask_silos(grid, run, rnd, arrays, "test")
    if got is None:
        return {"test_accuracy": math.nan, "test_loss": math.nan, "test_accuracy_std": math.nan}
    return {
        "test_accuracy": float(got[P.TEST_ACCURACY]),
        "test_loss": float(got[P.TEST_LOSS]),
        "test_accuracy_std": float(got["accuracy-std"]),
    }


def _distributed_columns(run: FederatedRun, rnd: int, agg_d: dict, *, test_round: bool) -> dict:
    """Distributed noise: the secure sum's headroom (1 = at the 32-bit wrap) and, on test
    rounds, the epsilon of a silo's own share alone (all other silos colluding)."""
    strategy = run.strategy
    if not strategy.distributed:
        return {}
    own = (
        strategy.own_ledger.summary(s.name for s in strategy.silos.values())["max_epsilon"]
        if test_round
        else math.nan
    )
    return {"secagg_headroom": float(agg_d.get("secagg-headroom", math.nan)), "max_epsilon_own_share": own}


def _write_round(run: FederatedRun, rnd: int, eval_model: torch.nn.Module) -> None:
    """The ledger and the checkpoint every round; metrics files and the released model on
    test-evaluation rounds (``test-every``) and at the end. Each written atomically."""
    if rnd % run.fed.test_interval == 0 or rnd == run.fed.num_server_rounds:
        _write_metrics(run)
        torch.save(eval_model.state_dict(), os.path.join(run.run_dir, "final_model.pt"))
    write_json_atomic(os.path.join(run.run_dir, "ledger.json"), run.ledger.to_dict())
    save_checkpoint(
        os.path.join(run.run_dir, "checkpoint.pt"),
        {
            "round": rnd,
            "fingerprint": config_fingerprint(run.cfg, run.fed),
            "model": run.strategy.model.state_dict(),
            "strategy": run.strategy.state_dict(),
            "rows": run.rows,
            "best": run.best,
            "best_state": run.best_state,
            "run_key": run.strategy.run_key,
        },
    )


def _write_metrics(run: FederatedRun) -> None:
    write_json_atomic(os.path.join(run.run_dir, "metrics.json"), run.rows)
    write_csv(os.path.join(run.run_dir, "metrics.csv"), run.rows)


# ----- finish ---------------------------------------------------------------------------


def _test_words(run: FederatedRun) -> str:
    """Where the test accuracy comes from, as the summary and the plan line say it."""
    if run.test is not None:
        return (
            "server" if run.fed.server_test(run.cfg) == "builtin" else f"server ({run.fed.server_test_data})"
        )
    release = run.fed.resolved_federated_test(run.cfg)
    if release == "none":
        return "none"
    if release == "noisy" and not run.cfg.private:
        release = "exact"
    return {
        "noisy": f"federated, noisy (Gaussian std {run.fed.test_noise:g} on each silo's counts, in the ledger)",
        "exact": "federated, EXACT (outside the DP guarantee)" if run.cfg.private else "federated, exact",
    }[release]


def _std_words(std: float) -> str:
    return f" (noise std {std:.4f})" if isinstance(std, float) and std > 0 and math.isfinite(std) else ""


def _noise_words(fed: FederatedConfig, silos: int) -> str:
    if fed.dp_noise == "local":
        return "local (each silo adds all of it; the server sees each update)"
    t = fed.secagg_survivors or silos
    return (
        f"distributed (secure aggregation: the server sees the sum; epsilon assumes at least "
        f"max({t}, {silos // 2 + 1}) honest surviving silos)"
    )


def _selection_words(cfg: TrainConfig, fed: FederatedConfig) -> str:
    """How the released model is chosen, in the words the run folder and console use."""
    if fed.validation_release == "noisy" and not cfg.private:
        return "best exact validation accuracy (a nonprivate run adds no noise)"
    return {
        "none": "the last round's model (no validation metrics leave the silos)",
        "noisy": f"best noisy validation accuracy (Gaussian std {fed.validation_noise:g} on counts, in the ledger)",
        "exact": "best EXACT validation accuracy: released without noise, OUTSIDE the DP guarantee (opt-out)",
    }[fed.validation_release]


def _choose_released(run: FederatedRun) -> str:
    """Settle ``run.best`` (the released model) and say how it was chosen."""
    rows = run.rows
    if (run.fed.validation_release == "none" or run.best["round"] == 0) and len(rows) > 1:
        # nothing left the silos for selection (validation-release none, or no validation
        # accuracy at all, e.g. validation-fraction 0): the last round's model, never the initial
        run.best = {"round": rows[-1]["round"], "val_accuracy": None}
        run.best_state = copy.deepcopy(run.strategy.evaluation_model().state_dict())
        if run.fed.validation_release != "none":
            return "the last round's model (no validation accuracy was measured)"
    elif len(rows) == 1:  # stopped before round 1: the initial model, no validation accuracy
        run.best = {"round": 0, "val_accuracy": None}
        return "the initial model (no round completed)"
    return _selection_words(run.cfg, run.fed)


def finish(run: FederatedRun, stop_reason: str) -> dict:
    """The best model on validation, the final files and ``summary.json``."""
    selection = _choose_released(run)
    cfg, strategy, ledger, rows, best = run.cfg, run.strategy, run.ledger, run.rows, run.best
    if len(rows) > 1 and math.isnan(rows[-1]["test_accuracy"]) and run.test is not None:
        final = strategy.evaluation_model()  # stopped between test rounds
        rows[-1]["test_loss"], rows[-1]["test_accuracy"] = evaluate(final, run.test)
        rows[-1]["test_accuracy_std"] = 0.0
        torch.save(final.state_dict(), os.path.join(run.run_dir, "final_model.pt"))
    _write_metrics(run)
    torch.save(run.best_state, os.path.join(run.run_dir, "best_model.pt"))
    strategy.model.load_state_dict(run.best_state)
    best_row = next((r for r in rows if r["round"] == best["round"]), rows[-1])
    if run.test is not None:
        _, best_test = evaluate(strategy.model, run.test)
    else:  # federated: what was released for the chosen round (NaN if it was not a test round)
        best_test = best_row["test_accuracy"]
    write_json_atomic(os.path.join(run.run_dir, "ledger.json"), ledger.to_dict())
    write_json_atomic(os.path.join(run.run_dir, "rejections.json"), strategy.rejections)
    if strategy.distributed:  # what each silo's own share alone is worth (everyone else colluding)
        write_json_atomic(
            os.path.join(run.run_dir, OWN_SHARE_LEDGER),
            strategy.own_ledger.to_dict(round_epsilons=False),
        )
    summary = {
        "method": cfg.method,
        "dataset": cfg.dataset,
        **(
            {"schema": data_name(cfg), "schema_digest": schema_of(cfg.dataset, cfg.schema).digest()}
            if cfg.custom
            else {}
        ),
        "num_silos": len(strategy.silos),
        "rounds_completed": len(rows) - 1,
        "stop_reason": stop_reason,
        "target_epsilon": cfg.epsilon if cfg.private else None,
        "delta": cfg.delta,
        **ledger.summary(),  # infinite for a non-private run, never 0
        "best_round": best["round"],
        "best_val_accuracy": best["val_accuracy"],
        "test_accuracy_best_val": best_test,
        "test_accuracy_final": rows[-1]["test_accuracy"],
        "initial_test_accuracy": rows[0]["test_accuracy"],
        "test_source": _test_words(run),
        "test_accuracy_std": best_row.get("test_accuracy_std", 0.0) if run.test is None else 0.0,
        "rejected_updates": len(
            [r for r in strategy.rejections if not r["reason"].startswith("client error")]
        ),
        "validation_release": run.fed.validation_release,
        "dp_noise": run.fed.dp_noise,
        **(
            {
                "max_epsilon_own_share": strategy.own_ledger.summary()["max_epsilon"],
                "secagg_survivors": strategy.lattice.survivors if strategy.lattice else None,
                "lattice": strategy.lattice.to_dict() if strategy.lattice else None,
            }
            if strategy.distributed
            else {}
        ),
        "silo_sizes": cfg.silo_sizes,
        "model_selection": selection,
        "seed": cfg.seed if cfg.seeded else None,
        "seconds": time.time() - run.t0,
        "run_dir": run.run_dir,
    }
    write_json_atomic(os.path.join(run.run_dir, "summary.json"), summary)
    run.log_fn(
        f"[done] {summary['rounds_completed']} rounds ({stop_reason}); best round {best['round']} "
        f"test acc {fmt(best_test)}{_std_words(summary['test_accuracy_std'])}; final "
        f"{fmt(summary['test_accuracy_final'])}; max epsilon "
        f"{summary['max_epsilon']}"
        + (
            f" against the server (a silo's own share alone: {summary['max_epsilon_own_share']:.4g})"
            if strategy.distributed
            else ""
        )
        + f"; {run.run_dir}"
    )
    return summary


__all__ = ["run_federated", "federated_command", "UserError"]
