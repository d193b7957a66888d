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
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields

import numpy as np
import torch

from common.accounting import MAX_STEPS, Phase, calibrate_noise, compute_epsilon
from common.config import FederatedConfig, TrainConfig
from common.data import TensorData, load_dataset, take_subset, train_validation_split, with_features
from common.engine import DPEngine
from common.errors import BudgetError, ConfigError, DataError


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
    fixed = tuple(p for p in [validation_phase(cfg, fed, len(fed.evaluation_rounds(rounds)))] if p)
    if fixed and cfg.epsilon is not None:
        eps_fixed = compute_epsilon(phases=list(fixed), delta=cfg.delta, accountant=cfg.accountant)
        if eps_fixed >= cfg.epsilon:
            raise ConfigError(
                "validation-noise",
                fed.validation_noise,
                f"its {fixed[0].steps} noisy validation releases alone spend epsilon {eps_fixed:.4g} "
                f">= target {cfg.epsilon:g}: raise it, evaluate less often (evaluate-every) or "
                "release nothing (validation-release = 'none')",
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
) -> tuple[TensorData, TensorData]:
    """(train, validation) data of one silo: views into the process's one silo-ordered copy
    of the dataset (:func:`_silo_layout`), so that a worker serving many silos holds the
    data once, not once whole and once more in shards."""
    if not (0 <= partition_id < num_partitions):
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    data, spans = _silo_layout(layout_key(cfg, num_partitions, data_dir or cfg.data_dir))
    start, n_train, n_val = spans[partition_id]
    if n_train + n_val < 2:
        raise DataError(f"silo {partition_id} has {n_train + n_val} examples; it needs at least 2")
    end = start + n_train
    return (
        TensorData(data.x[start:end], data.y[start:end]),
        TensorData(data.x[end : end + n_val], data.y[end : end + n_val]),
    )


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
    "max_physical_batch", "out_dir",
}  # fmt: skip


@functools.lru_cache(maxsize=1)
def _silo_layout(key: tuple) -> tuple[TensorData, list[tuple[int, int, int]]]:
    """One copy of the training data ordered silo by silo, each silo's training examples
    then its validation examples (each in index order, exactly as before), and every silo's
    (start, n_train, n_val). The whole dataset read for it is not kept."""
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
            spans.append((start, len(idx), 0))
            continue
        train_idx, val_idx = train_validation_split(len(idx), cfg.validation_fraction, seed=pid)
        idx = torch.as_tensor(idx)
        order += [idx[train_idx], idx[val_idx]]
        spans.append((start, len(train_idx), len(val_idx)))
        start += len(idx)
    return full.subset(torch.cat(order)) if order else full, spans


def public_dataset_size(cfg: TrainConfig) -> int:
    """Training records of the run's dataset as anyone can know them (no data read)."""
    from common.datafiles import EXPECTED_SIZE

    full = EXPECTED_SIZE[True][cfg.dataset]
    return min(cfg.train_subset, full) if cfg.train_subset > 0 else full


def declared_sizes(cfg: TrainConfig, num_partitions: int, node_declared: int = 0) -> tuple[int, int]:
    """(training, validation) sizes a silo releases under ``silo-sizes = "declared"``: from
    its declared record count (the node's ``declared-size``, else ``declared-silo-size``,
    else the IID share of the public dataset size), split like the data."""
    total = int(node_declared or cfg.declared_silo_size or public_dataset_size(cfg) // max(num_partitions, 1))
    if total < 2:
        raise ConfigError("declared-silo-size", total, "a silo must declare at least 2 records")
    n_val = int(round(total * cfg.validation_fraction))
    return total - n_val, n_val


def check_declared_size(cfg: TrainConfig, actual: int, declared_total: int) -> None:
    """Refuse to run when the silo's real record count is off its declaration by more than
    ``silo-size-tolerance``. The message names neither count: it may reach the server."""
    if abs(actual - declared_total) > cfg.silo_size_tolerance * declared_total:
        raise DataError(
            "this silo's number of records differs from its declared size by more than "
            f"silo-size-tolerance ({cfg.silo_size_tolerance:g}); declare the silo's size "
            "(node config declared-size, or declared-silo-size) or run with silo-sizes = "
            "'exact' (the counts then leave the silo, outside the DP guarantee)"
        )


def check_silo_plans(
    cfg: TrainConfig, fed: FederatedConfig, num_partitions: int, *, data_dir: str | None = None
) -> list[ClientPlan]:
    """Every silo's plan from the public partition recipe, *before* any process starts: a
    setting a silo cannot run (a batch larger than the silo, an empty silo) fails here with
    the same message as on the centralized path, not after the clients have started."""
    from common.partition import partition_indices

    # read uncached: the driver of a simulation must not hold the training set for the run
    full = take_subset(
        load_dataset.__wrapped__(cfg.dataset, data_dir or cfg.data_dir, True), cfg.train_subset
    )
    plans = []
    for pid, idx in enumerate(partition_indices(full.y, num_partitions, cfg)):
        if len(idx) < 2:
            raise DataError(f"silo {pid} has {len(idx)} examples; it needs at least 2")
        n_train = len(train_validation_split(len(idx), cfg.validation_fraction, seed=pid)[0])
        if cfg.silo_sizes == "declared":  # the simulation's silos declare no size of their own
            n_train = declared_sizes(cfg, num_partitions)[0]
            try:
                check_declared_size(cfg, len(idx), sum(declared_sizes(cfg, num_partitions)))
            except DataError as exc:
                raise DataError(f"silo {pid}: {exc}") from None
        try:
            plans.append(ClientPlan.for_silo(cfg, fed, n_train))
        except ConfigError as exc:
            raise ConfigError(
                exc.setting, exc.value, f"{exc.allowed} (silo {pid} of {num_partitions} has {n_train})"
            ) from None
    return plans


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
