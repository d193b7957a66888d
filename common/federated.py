"""Flower-free pieces of the federated protocol (DESIGN.md §3).

- :class:`ClientPlan`: a silo's sampling rate, local steps per round and planned DP
  events, identical on the server (calibration, budget checks) and the client.
- Sparse updates: values on the active coordinates, in mask order.
- :func:`aggregate_sparse`: the coordinate-wise weighted average of sparse updates.
- :func:`local_round`: one client's local training for one round with the DP engine.
- Partitions: IID split of a dataset into silos, each with a local validation split.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields

import numpy as np
import torch

from common.accounting import MAX_STEPS, Phase, calibrate_noise, compute_epsilon
from common.config import FederatedConfig, TrainConfig
from common.data import TensorData, load_dataset, take_subset, train_validation_split, with_features
from common.engine import DPEngine
from common.errors import BudgetError, ConfigError, DataError
from common.schema import builtin_schema, schema_of
from common.silos import LocalSplits, declared_size, local_splits, silo_folder, silo_folders, silo_schema


@dataclass(frozen=True)
class ClientPlan:
    """A silo's DP schedule: ``local_steps`` Poisson steps at rate ``sample_rate`` per round."""

    n_train: int
    sample_rate: float
    local_steps: int

    @classmethod
    def for_silo(cls, cfg: TrainConfig, fed: FederatedConfig, n_train: int) -> ClientPlan:
        if n_train <= 0:
            raise DataError("a silo has no training examples")
        q = cfg.resolved_sample_rate(n_train)  # the one derivation (refuses batch-size > n)
        steps = fed.local_steps or max(1, int(round(fed.local_epochs / q)))
        return cls(n_train, q, steps)

    def round_phase(self, noise_multiplier: float) -> Phase:
        return Phase(noise_multiplier, self.sample_rate, self.local_steps)


def planned_rounds(fed: FederatedConfig) -> int:
    """Rounds the noise is calibrated for: the plan's, plus ``reserve-rounds`` (rounds that an
    interruption may cost: a round in flight when the server dies stays charged and is rerun)."""
    return fed.num_server_rounds + fed.reserve_rounds


def validation_phase(cfg: TrainConfig, fed: FederatedConfig, releases: int = 1) -> Phase | None:
    """The DP event of ``releases`` noisy validation releases (None when none are charged)."""
    if fed.validation_release != "noisy" or not cfg.private or releases <= 0:
        return None
    return Phase(fed.validation_noise, 1.0, releases)


def test_phase(cfg: TrainConfig, fed: FederatedConfig, releases: int = 1) -> Phase | None:
    """The DP event of ``releases`` noisy federated test releases (None when none are charged):
    each is one Gaussian release of two sums, the correct count and the loss sum over
    ``test-loss-bound`` (clipped per example), each changed by at most 1 by one example, so
    the L2 sensitivity is sqrt(2) and the noise multiplier ``test-noise / sqrt(2)``."""
    if fed.resolved_federated_test(cfg) != "noisy" or not cfg.private or releases <= 0:
        return None
    return Phase(fed.test_noise / math.sqrt(2.0), 1.0, releases)


def fixed_phases(cfg: TrainConfig, fed: FederatedConfig, rounds: int) -> tuple[Phase, ...]:
    """The releases a silo's plan holds besides its training: noisy validation and noisy
    federated test releases, as many as the plan of ``rounds`` asks for."""
    phases = [
        validation_phase(cfg, fed, len(fed.evaluation_rounds(rounds))),
        test_phase(cfg, fed, len(fed.test_rounds(cfg, rounds))),
    ]
    return tuple(p for p in phases if p is not None)


@functools.lru_cache(maxsize=64)
def _calibrated(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, fixed: tuple[Phase, ...]
) -> float:
    """:func:`calibrate_noise`, once per plan in a process: the pre-flight check of
    ``adadpigu simulate`` and its server (same process) calibrate the same plans."""
    return calibrate_noise(epsilon, delta, sample_rate, steps, accountant=accountant, fixed_phases=fixed)


def silo_noise(cfg: TrainConfig, fed: FederatedConfig, plan: ClientPlan, *, name: str = "a silo") -> float:
    """The noise multiplier of a silo's plan so that taking part in every planned round (and
    every planned noisy validation release) meets the target: calibrated, or the fixed
    ``noise-multiplier`` checked. Refusals name the setting at fault, before anything runs."""
    rounds = planned_rounds(fed)
    steps = plan.local_steps * rounds
    if steps > MAX_STEPS:
        key = "local-steps" if fed.local_steps else "local-epochs"
        raise ConfigError(
            key,
            fed.local_steps or fed.local_epochs,
            f"gives {name} {steps} steps over {rounds} rounds; the plan allows {MAX_STEPS:.0e}",
        )
    fixed = fixed_phases(cfg, fed, rounds)
    if fixed and cfg.epsilon is not None:
        for ph, key, value, fix in (
            (validation_phase(cfg, fed, len(fed.evaluation_rounds(rounds))), "validation-noise", fed.validation_noise,
             "evaluate less often (evaluate-every) or release nothing (validation-release = 'none')"),
            (test_phase(cfg, fed, len(fed.test_rounds(cfg, rounds))), "test-noise", fed.test_noise,
             "test less often (test-every) or give the server a test set (server-test-data)"),
        ):  # fmt: skip
            eps_one = compute_epsilon(phases=[ph], delta=cfg.delta, accountant=cfg.accountant) if ph else 0.0
            if ph is not None and eps_one >= cfg.epsilon:
                raise ConfigError(
                    key,
                    value,
                    f"its {ph.steps} noisy releases alone spend epsilon {eps_one:.4g} >= target "
                    f"{cfg.epsilon:g}: raise it, {fix}",
                )
        eps_fixed = compute_epsilon(phases=list(fixed), delta=cfg.delta, accountant=cfg.accountant)
        if eps_fixed >= cfg.epsilon:
            raise ConfigError(
                "test-noise",
                fed.test_noise,
                f"the noisy validation and test releases together spend epsilon {eps_fixed:.4g} >= "
                f"target {cfg.epsilon:g}: raise validation-noise / test-noise or release less often",
            )
    sigma = cfg.noise_multiplier
    if sigma is None:
        return _calibrated(cfg.epsilon, cfg.delta, plan.sample_rate, steps, cfg.accountant, fixed)
    eps = compute_epsilon(
        phases=[Phase(sigma, plan.sample_rate, steps), *fixed], delta=cfg.delta, accountant=cfg.accountant
    )
    if cfg.epsilon is not None and eps > cfg.epsilon * (1 + 1e-9):
        raise BudgetError(
            f"{name}'s plan ({rounds} rounds x {plan.local_steps} steps, q={plan.sample_rate:.4g}, "
            f"sigma={sigma:g}) spends epsilon {eps:.4f} > target {cfg.epsilon:g}: raise the noise "
            "multiplier or leave it unset to calibrate it"
        )
    return sigma


def sparse_encode(delta: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
    """The update's values on the active coordinates, in mask order (float32)."""
    flat = delta.detach().reshape(-1).float().cpu()
    if mask is not None:
        flat = flat[mask.cpu()]
    return flat.numpy().astype(np.float32, copy=False)


def sparse_decode(values: np.ndarray | torch.Tensor, mask: torch.Tensor | None, d: int) -> torch.Tensor:
    """Inverse of :func:`sparse_encode`: a dense ``[d]`` tensor, 0 off the mask."""
    v = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if mask is None:
        if v.numel() != d:
            raise ValueError(f"dense update has {v.numel()} values, expected {d}")
        return v.clone()
    k = int(mask.sum())
    if v.numel() != k:
        raise ValueError(f"sparse update has {v.numel()} values, the mask has {k} active coordinates")
    out = torch.zeros(d, dtype=torch.float32)
    out[mask.cpu()] = v
    return out


def aggregate_sparse(
    updates: Sequence[np.ndarray], weights: Sequence[float], mask: torch.Tensor | None, d: int
) -> torch.Tensor:
    """Weighted average of sparse updates on the mask (dense ``[d]``, 0 elsewhere)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("aggregation weights must be non-negative with a positive sum")
    stacked = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
    mean = (w[:, None] * stacked).sum(0) / w.sum()
    return sparse_decode(mean.astype(np.float32), mask, d)


# ----- partitions ---------------------------------------------------------------------


def load_silo(
    cfg: TrainConfig, partition_id: int, num_partitions: int, *, data_dir: str | None = None
) -> LocalSplits:
    """One silo's train / validation / test data, as the model sees it (features applied).

    User data (and ``partitioner = "none"`` on a built-in one's folder): the silo's own
    folder (:func:`common.silos.silo_folder`), read with its schema. A built-in dataset split
    into silos: views into the process's one silo-ordered copy (:func:`_silo_layout`), so
    that a worker serving many silos holds the data once, not once whole and once more in
    shards."""
    if not (0 <= partition_id < num_partitions):
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    root = data_dir or cfg.data_dir
    if cfg.custom:
        return _own_silo(cfg, partition_id, num_partitions, root)
    data, spans = _silo_layout(layout_key(cfg, num_partitions, root))
    start, n_train, n_val, n_test = spans[partition_id]
    if n_train + n_val + n_test < 2:
        raise DataError(f"silo {partition_id} has {n_train + n_val + n_test} examples; it needs at least 2")
    a, b, c = start + n_train, start + n_train + n_val, start + n_train + n_val + n_test
    return LocalSplits(
        TensorData(data.x[start:a], data.y[start:a]),
        TensorData(data.x[a:b], data.y[a:b]),
        TensorData(data.x[b:c], data.y[b:c]),
        root,
        schema=builtin_schema(cfg.dataset),
    )


def _own_silo(cfg: TrainConfig, partition_id: int, num_partitions: int, root: str) -> LocalSplits:
    """A silo's own folder read with the schema it holds (its ``schema.toml``, else the run's)."""
    folder = silo_folder(root, partition_id, num_partitions)
    schema = silo_schema(folder, lambda: schema_of(cfg.dataset, cfg.schema), root if folder != root else None)
    parts = _own_splits(folder, schema, cfg.validation_fraction, cfg.test_fraction)
    label = f"{schema.name}-{schema.digest()[:12]}-{os.path.basename(os.path.normpath(folder))}"
    train = take_subset(parts.train, cfg.train_subset)
    return LocalSplits(
        *(
            with_features(d, cfg.features, f"{label}-{name}", schema=schema)
            for name, d in (("train", train), ("validation", parts.validation), ("test", parts.test))
        ),
        folder,
        schema=schema,
        declared=declared_size(folder),
    )


@functools.lru_cache(maxsize=16)
def _own_splits(folder: str, schema, validation_fraction: float, test_fraction: float) -> LocalSplits:
    return local_splits(folder, schema, validation_fraction=validation_fraction, test_fraction=test_fraction)


def layout_key(cfg: TrainConfig, num_partitions: int, data_dir: str) -> tuple:
    """Everything the silos' data depend on (and nothing else, so a new learning rate does
    not rebuild it)."""
    part = cfg.replace(
        **{f.name: f.default for f in fields(TrainConfig) if f.name in _NOT_DATA and f.default is not MISSING}
    )
    return (part, num_partitions, data_dir)


# settings that do not change which examples a silo holds
_NOT_DATA = {
    "method", "model", "activation", "scatter_groups", "scatter_norm", "scatter_norm_noise",
    "scatter_norm_clip", "epsilon", "delta", "accountant", "noise_multiplier",
    "pretrain_noise_multiplier", "batch_size", "sample_rate", "clip_norm", "optimizer", "lr", "momentum",
    "lr_schedule", "ema_decay", "augmult", "epochs", "pretrain_fraction", "r0", "r_max", "schedule",
    "mask_scope", "mask_refresh", "importance", "beta1", "beta2", "h1", "h2", "scale_rule", "test_subset",
    "silo_sizes", "declared_silo_size", "silo_size_tolerance", "device", "per_sample_backend",
    "max_physical_batch", "out_dir", "mlp_hidden",
}  # fmt: skip


@functools.lru_cache(maxsize=1)
def _silo_layout(key: tuple) -> tuple[TensorData, list[tuple[int, int, int, int]]]:
    """One copy of the training data ordered silo by silo, each silo's training, validation
    and test examples (each in index order; without a test split exactly as before), and
    every silo's (start, n_train, n_val, n_test). The whole dataset read for it is not kept."""
    from common.partition import partition_indices

    cfg, num_partitions, data_dir = key
    full = with_features(
        take_subset(load_dataset.__wrapped__(cfg.dataset, data_dir, True), cfg.train_subset),
        cfg.features,
        f"{cfg.dataset}-train",
    )
    order, spans, start = [], [], 0
    for pid, idx in enumerate(partition_indices(full.y, num_partitions, cfg)):
        if len(idx) < 2:
            spans.append((start, len(idx), 0, 0))
            continue
        idx = torch.as_tensor(idx)
        test_idx = torch.tensor([], dtype=torch.int64)
        if cfg.test_fraction > 0:  # the silo's local test split, drawn before the validation split
            keep, test_pos = train_validation_split(len(idx), cfg.test_fraction, seed=10_000 + pid)
            test_idx, idx = idx[test_pos], idx[keep]
        train_idx, val_idx = train_validation_split(len(idx), cfg.validation_fraction, seed=pid)
        order += [idx[train_idx], idx[val_idx], test_idx]
        spans.append((start, len(train_idx), len(val_idx), len(test_idx)))
        start += len(train_idx) + len(val_idx) + len(test_idx)
    return full.subset(torch.cat(order)) if order else full, spans


def public_dataset_size(cfg: TrainConfig) -> int:
    """Training records of a built-in dataset as anyone can know them (no data read)."""
    from common.datafiles import EXPECTED_SIZE

    full = EXPECTED_SIZE[True][cfg.dataset]
    return min(cfg.train_subset, full) if cfg.train_subset > 0 else full


def declared_sizes(
    cfg: TrainConfig, num_partitions: int, node_declared: int = 0, *, where: str = "a silo"
) -> tuple[int, int, int]:
    """(training, validation, test) sizes a silo releases under ``silo-sizes = "declared"``:
    from its declared record count (the node's ``declared-size`` or its folder's
    ``silo.toml``, else ``declared-silo-size``, else, for a built-in dataset split IID, its
    share of the public dataset size), split like the data."""
    total = int(node_declared or cfg.declared_silo_size)
    if not total and cfg.custom:
        raise DataError(
            f"{where} declares no size: give it declared-size in its silo.toml (or node config), set "
            "declared-silo-size, or run with silo-sizes = 'exact' (the counts then leave the silos)",
            public=True,
        )
    if not total:
        share = public_dataset_size(cfg) // max(num_partitions, 1)
        total = share if cfg.resolved_partitioner() != "none" else public_dataset_size(cfg)
    if total < 2:
        raise ConfigError("declared-silo-size", total, "a silo must declare at least 2 records")
    n_test = int(round(total * cfg.test_fraction))
    rest = total - n_test
    n_val = int(round(rest * cfg.validation_fraction))
    return rest - n_val, n_val, n_test


def check_declared_size(cfg: TrainConfig, actual: int, declared_total: int) -> None:
    """Refuse to run when the silo's real record count is off its declaration by more than
    ``silo-size-tolerance``. The message names neither count: it may reach the server."""
    if abs(actual - declared_total) > cfg.silo_size_tolerance * declared_total:
        raise DataError(
            "this silo's number of records differs from its declared size by more than "
            f"silo-size-tolerance ({cfg.silo_size_tolerance:g}); declare the silo's size "
            "(declared-size in its silo.toml or node config, or declared-silo-size) or run with "
            "silo-sizes = 'exact' (the counts then leave the silo, outside the DP guarantee)",
            public=True,
        )


def check_silo_plans(
    cfg: TrainConfig,
    fed: FederatedConfig,
    num_partitions: int,
    *,
    data_dir: str | None = None,
    silo_dirs: list[str] | None = None,
) -> list[ClientPlan]:
    """Every silo's plan, *before* any process starts: a setting a silo cannot run (a batch
    larger than the silo, an empty silo, a silo far from its declared size, a folder that does
    not match the schema) fails here with the same message as on the centralized path, not
    after the clients have started. Built-in data: from the public partition recipe; user
    data: each silo's folder is read (and its tensors cached for the silos), the folders of
    ``silo_dirs`` (one per silo) or of ``data_dir``'s ``silos.toml``."""
    root = data_dir or cfg.data_dir
    plans = []
    for pid, (n_records, n_train, declared) in enumerate(_silo_counts(cfg, num_partitions, root, silo_dirs)):
        if n_records < 2:
            raise DataError(f"silo {pid} has {n_records} examples; it needs at least 2")
        if cfg.silo_sizes == "declared":
            sizes = declared_sizes(cfg, num_partitions, declared, where=f"silo {pid}")
            n_train = sizes[0]
            try:
                check_declared_size(cfg, n_records, sum(sizes))
            except DataError as exc:
                raise DataError(f"silo {pid}: {exc}") from None
        try:
            plans.append(ClientPlan.for_silo(cfg, fed, n_train))
        except ConfigError as exc:
            raise ConfigError(
                exc.setting, exc.value, f"{exc.allowed} (silo {pid} of {num_partitions} has {n_train})"
            ) from None
    return plans


def _silo_counts(
    cfg: TrainConfig, num_partitions: int, root: str, silo_dirs: list[str] | None = None
) -> list[tuple[int, int, int]]:
    """(records, training records, declared size) of every silo."""
    if cfg.custom:
        if silo_dirs is None and silo_folders(root) is None and num_partitions > 1:
            raise DataError(
                f"{root} has no silos.toml: a simulation of user data reads one folder per silo, listed "
                "in silos.toml (adadpigu split writes them)"
            )
        run_schema = schema_of(cfg.dataset, cfg.schema)
        out = []
        for pid in range(num_partitions):
            try:
                if silo_dirs is not None:  # the silo's own folder, as its node config will say
                    s = load_silo(cfg, pid, num_partitions, data_dir=silo_dirs[pid])
                else:
                    s = load_silo(cfg, pid, num_partitions, data_dir=root)
            except DataError as exc:
                raise DataError(f"silo {pid}: {exc}") from None
            if s.schema is not None and s.schema.digest() != run_schema.digest():
                raise DataError(
                    f"silo {pid}: the schema it holds ({s.schema.source or s.folder}) differs from the run's "
                    f"({run_schema.source}): every silo must hold the same public schema"
                )
            out.append((len(s.train) + len(s.validation) + len(s.test), len(s.train), s.declared))
        return out
    from common.partition import partition_indices

    # read uncached: the driver of a simulation must not hold the training set for the run
    full = take_subset(load_dataset.__wrapped__(cfg.dataset, root, True), cfg.train_subset)
    out = []
    for pid, idx in enumerate(partition_indices(full.y, num_partitions, cfg)):
        n = len(idx)
        if n < 2:
            out.append((n, 0, 0))
            continue
        rest = n - (
            len(train_validation_split(n, cfg.test_fraction, seed=0)[1]) if cfg.test_fraction > 0 else 0
        )
        out.append((n, len(train_validation_split(rest, cfg.validation_fraction, seed=pid)[0]), 0))
    return out


# ----- one local round ------------------------------------------------------------------


@dataclass
class LocalResult:
    delta: torch.Tensor  # new local parameters - received global parameters (flat)
    steps: int
    mean_loss: float


def local_round(
    engine: DPEngine,
    data: TensorData,
    *,
    mode: str,
    steps: int,
    noise_multiplier: float,
    update_importance: bool,
) -> LocalResult:
    """Run ``steps`` DP steps from the engine's current (global) parameters."""
    start = torch.cat([p.detach().reshape(-1) for p in engine.params]).clone()
    losses = []
    for _ in range(steps):
        res = engine.step(
            data, mode=mode, noise_multiplier=noise_multiplier, update_importance=update_importance
        )
        losses.append(res.loss)
    end = torch.cat([p.detach().reshape(-1) for p in engine.params])
    mean_loss = float(np.mean(losses)) if losses else math.nan
    return LocalResult(delta=end - start, steps=steps, mean_loss=mean_loss)
