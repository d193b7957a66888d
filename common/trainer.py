"""Centralized AdaDPIGU training: plan, calibrate, train, select on validation, report.

Phases (DESIGN.md §2): ``T_pre`` steps of flat DP-SGD (importance and statistics from
released gradients), then the training phase whose mode depends on the method
(``dpsgd``: flat; ``adaclip``: adaptive, r = 1; ``adadpigu-static``: adaptive on a
fixed mask at r0; ``adadpigu``: adaptive with progressive unfreezing, one schedule
stage per epoch). The noise multiplier is calibrated over the whole plan *before*
training; before each epoch the tracker checks that the epoch stays within the target.

Model selection uses the validation split; the test set is evaluated for reporting
(every epoch, never used for a decision) and at the end for the best-validation model.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from common.accounting import (
    MAX_STEPS,
    Phase,
    PrivacyTracker,
    accountant_used,
    calibrate_noise,
    compute_epsilon,
)
from common.config import TrainConfig
from common.data import Splits
from common.engine import DPEngine, evaluate, make_generator, resolve_device, step_mode
from common.errors import BudgetError, ConfigError
from common.feature_norm import NORM_RELEASES, release_channel_stats, standardize_layer
from common.masks import MaskBuilder, MovementScores, UnfreezeSchedule
from common.models import ParameterEMA, build_model_for, flat_parameters, num_parameters
from common.outputs import data_name, fmt, reproduce_command, run_dir_name, write_csv, write_json_atomic
from common.schema import schema_of
from common.server_opt import lr_factor
from common.silos import splits_for


@dataclass(frozen=True)
class Plan:
    """Everything about a run's privacy schedule, fixed before training starts."""

    n_train: int
    sample_rate: float
    expected_batch_size: float
    steps_per_epoch: int
    total_steps: int
    pretrain_steps: int
    noise_multiplier: float
    pretrain_noise_multiplier: float
    planned_epsilon: float
    # noise multiplier of the released feature statistics (scatter-norm = "data"); 0 = none
    norm_noise_multiplier: float = 0.0

    @property
    def train_steps(self) -> int:
        return self.total_steps - self.pretrain_steps

    def norm_phases(self) -> list[Phase]:
        """The feature-statistics release, before any training step (empty when there is none)."""
        return _norm_phases(self.norm_noise_multiplier)

    def phases(self) -> list[Phase]:
        if self.noise_multiplier <= 0:
            return []
        return [
            *self.norm_phases(),
            Phase(self.pretrain_noise_multiplier, self.sample_rate, self.pretrain_steps),
            Phase(self.noise_multiplier, self.sample_rate, self.train_steps),
        ]


def _norm_phases(noise_multiplier: float) -> list[Phase]:
    """The release of the feature statistics (scatter-norm = "data") as DP events; none at 0."""
    return [Phase(noise_multiplier, 1.0, NORM_RELEASES)] if noise_multiplier > 0 else []


def pretrain_steps_for(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.method in ("nonprivate", "dpsgd"):
        return 0
    if total_steps < 2:
        raise ConfigError(
            "epochs",
            cfg.epochs,
            f"the plan has {total_steps} step; method {cfg.method} needs at least 2 (one of DP-SGD "
            "pre-training for its importance scores and clipping statistics, one to use them): "
            "more epochs or a smaller batch",
        )
    steps = int(round(cfg.pretrain_fraction * total_steps))
    return min(max(steps, 1), total_steps - 1)


def make_plan(cfg: TrainConfig, n_train: int) -> Plan:
    """Sampling rate, steps and calibrated noise for a training set of ``n_train``."""
    q = cfg.resolved_sample_rate(n_train)
    steps_per_epoch = max(1, int(round(1.0 / q)))
    total = steps_per_epoch * cfg.epochs
    if total > MAX_STEPS:
        key, value = ("sample-rate", cfg.sample_rate) if cfg.sample_rate else ("batch-size", cfg.batch_size)
        raise ConfigError(
            key,
            value,
            f"gives {total} steps ({cfg.epochs} epochs at q={q:.3g}); the plan allows {MAX_STEPS:.0e}",
        )
    t_pre = pretrain_steps_for(cfg, total)
    if cfg.private and cfg.delta >= 1.0 / n_train:
        warnings.warn(
            f"delta = {cfg.delta:g} >= 1/n = {1.0 / n_train:.3g}: a mechanism that publishes one "
            "random example outright would meet it; use delta well below 1/n",
            stacklevel=2,
        )
    if not cfg.private:
        return Plan(n_train, q, q * n_train, steps_per_epoch, total, 0, 0.0, 0.0, math.inf)
    sigma_pre = cfg.pretrain_noise_multiplier
    sigma_norm = cfg.scatter_norm_noise if cfg.scatter_norm == "data" else 0.0
    norm = _norm_phases(sigma_norm)
    if cfg.noise_multiplier is not None:
        sigma = cfg.noise_multiplier
        sigma_pre = sigma_pre or sigma
    elif sigma_pre is not None:
        sigma = calibrate_noise(
            cfg.epsilon,
            cfg.delta,
            q,
            total - t_pre,
            accountant=cfg.accountant,
            fixed_phases=[*norm, Phase(sigma_pre, q, t_pre)],
        )
    else:
        sigma = calibrate_noise(
            cfg.epsilon, cfg.delta, q, total, accountant=cfg.accountant, fixed_phases=norm
        )
        sigma_pre = sigma
    phases = [*norm, Phase(sigma_pre, q, t_pre), Phase(sigma, q, total - t_pre)]
    eps = compute_epsilon(phases=phases, delta=cfg.delta, accountant=cfg.accountant)
    if cfg.epsilon is not None and eps > cfg.epsilon * (1 + 1e-9):
        raise BudgetError(
            f"the plan ({cfg.epochs} epochs, {total} steps, q={q:.4g}, sigma={sigma:g}"
            + (f", feature statistics at sigma {sigma_norm:g}" if norm else "")
            + f") spends epsilon {eps:.4f} > target {cfg.epsilon:g}: raise the noise multiplier or "
            "leave it unset to calibrate it"
        )
    return Plan(n_train, q, q * n_train, steps_per_epoch, total, t_pre, sigma, sigma_pre, eps, sigma_norm)


def _charge_epoch(tracker: PrivacyTracker, plan: Plan, step: int) -> None:
    """Check and spend the epoch starting at ``step``: its (pre-training, training) steps."""
    n_pre = max(0, min(step + plan.steps_per_epoch, plan.pretrain_steps) - step)
    for ph in (
        Phase(plan.pretrain_noise_multiplier, plan.sample_rate, n_pre),
        Phase(plan.noise_multiplier, plan.sample_rate, plan.steps_per_epoch - n_pre),
    ):
        if ph.steps:
            tracker.check(ph)
            tracker.spend(ph)


class _CentralSteps:
    """One centralized step at position ``step`` of the plan: pre-training (flat, importance
    from releases), then the adaptive phase with the mask grown one stage per epoch and,
    with ``mask-refresh`` m > 0, re-scored from the weights' movement every m epochs."""

    def __init__(self, cfg: TrainConfig, plan: Plan) -> None:
        self.cfg, self.plan = cfg, plan
        kind, values = cfg.ratio_schedule()
        self.schedule = UnfreezeSchedule(kind, cfg.r0, cfg.r_max, values)
        self.stages = math.ceil(plan.train_steps / plan.steps_per_epoch) if plan.train_steps else 0
        self.builder: MaskBuilder | None = None
        self.movement: MovementScores | None = None

    def _mask(self, engine: DPEngine, step: int) -> None:
        """Build, grow or re-score the mask before an adaptive step."""
        cfg, plan = self.cfg, self.plan
        stage, offset = divmod(step - plan.pretrain_steps, plan.steps_per_epoch)
        refresh = self.movement is not None and offset == 0 and stage > 0 and stage % cfg.mask_refresh == 0
        if self.builder is None or refresh:
            if self.movement is not None:
                scores = self.movement.refresh(flat_parameters(engine.model))
            else:
                assert engine.importance is not None
                scores = engine.importance.scores()
            self.builder = MaskBuilder(scores.float(), engine.sizes, cfg.mask_scope)
            engine.mask = None  # (re)built: set below even if the ratio is unchanged
        ratio = self.schedule.ratio(stage, self.stages)
        if engine.mask is None or abs(engine.active_ratio - ratio) > 0.5 / engine.d:
            engine.set_mask(self.builder.mask(ratio))

    def step(self, engine: DPEngine, data, step: int):
        cfg, plan = self.cfg, self.plan
        pretraining = step < plan.pretrain_steps
        mode = step_mode(cfg, pretraining=pretraining)
        if mode == "nonprivate":
            return engine.step(data, mode="nonprivate")
        if cfg.uses_mask and cfg.mask_refresh > 0 and self.movement is None:
            self.movement = MovementScores(engine.d)
            self.movement.begin(flat_parameters(engine.model))
        if mode == "flat":
            sigma = plan.pretrain_noise_multiplier if pretraining else plan.noise_multiplier
            result = engine.step(data, mode="flat", noise_multiplier=sigma, update_importance=True)
        else:
            if cfg.uses_mask:
                self._mask(engine, step)
            result = engine.step(data, mode="adaptive", noise_multiplier=plan.noise_multiplier)
        if self.movement is not None:
            self.movement.observe(engine.mask, engine.optimizer.param_groups[0]["lr"])
        return result


def _train_epoch(
    engine: DPEngine, masks: _CentralSteps, data, step: int, steps: int, ema
) -> tuple[int, float, float]:
    """``steps`` steps of the plan from ``step`` (the EMA updated after each); (next step,
    mean training loss, fraction of sampled examples clipped)."""
    loss_sum, n_clipped, n_examples = 0.0, 0, 0
    for _ in range(steps):
        res = masks.step(engine, data, step)
        step += 1
        if ema is not None:
            ema.update(flat_parameters(engine.model))
        loss_sum += res.loss
        n_clipped += res.clipped
        n_examples += res.batch_size
    return step, loss_sum / max(steps, 1), n_clipped / max(n_examples, 1)


def _save_models(engine: DPEngine, final_state: dict, best_state: dict, test, run_dir: str) -> float:
    """Write the final and best models; the best one's test accuracy (it stays loaded)."""
    torch.save(final_state, os.path.join(run_dir, "final_model.pt"))
    torch.save(best_state, os.path.join(run_dir, "best_model.pt"))
    engine.model.load_state_dict(best_state)
    return evaluate(engine.model, test)[1]


def _central_summary(
    cfg: TrainConfig, plan: Plan, tracker: PrivacyTracker, best: dict, best_test: float, final_test: float,
    t0: float, run_dir: str,
) -> dict:  # fmt: skip
    return {
        "method": cfg.method,
        "dataset": cfg.dataset,
        **(
            {"schema": data_name(cfg), "schema_digest": schema_of(cfg.dataset, cfg.schema).digest()}
            if cfg.custom
            else {}
        ),
        "model": cfg.resolved_model(),
        "target_epsilon": cfg.epsilon if cfg.private else None,
        "epsilon": tracker.epsilon() if cfg.private else math.inf,  # never a finite epsilon
        "delta": cfg.delta,
        "accountant": cfg.accountant,
        "epsilon_accountant": accountant_used(tracker.phases, cfg.accountant) if cfg.private else None,
        "noise_multiplier": plan.noise_multiplier,
        "pretrain_noise_multiplier": plan.pretrain_noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": plan.total_steps,
        "model_selection": (
            "the last epoch's model (no validation data)"
            if best["val_accuracy"] is None
            else "best validation accuracy"
        ),
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"],
        "test_accuracy_best_val": best_test,
        "test_accuracy_final": final_test,
        "seed": cfg.seed if cfg.seeded else None,
        "seeded_warning": "fixed seed: for experiments only" if cfg.seeded else None,
        "seconds": time.time() - t0,
        "run_dir": run_dir,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def _open_central_run(
    cfg: TrainConfig, plan: Plan, run_dir: str | None, command: str | None, log, n_params: int
) -> str:
    """The run folder with config.json, plan.json and command.txt; the [plan] line."""
    run_dir = run_dir or os.path.join(cfg.out_dir, run_dir_name(cfg))
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run_dir, "config.json"), cfg.to_dict())
    write_json_atomic(os.path.join(run_dir, "plan.json"), asdict(plan))
    with open(os.path.join(run_dir, "command.txt"), "w") as fh:
        fh.write((command or reproduce_command(cfg)) + "\n")
    log(
        f"[plan] {cfg.method} on {cfg.dataset}: n={plan.n_train}, q={plan.sample_rate:.5f}, "
        f"{plan.total_steps} steps ({plan.pretrain_steps} pre-training), sigma={plan.noise_multiplier:.4f}"
        f" (pre {plan.pretrain_noise_multiplier:.4f})"
        + (f", feature statistics sigma={plan.norm_noise_multiplier:g}" if plan.norm_noise_multiplier else "")
        + f", planned epsilon={plan.planned_epsilon:.4f} "
        f"at delta={cfg.delta:g}, {n_params} parameters, run folder {run_dir}"
    )
    return run_dir


def _central_engine(cfg: TrainConfig, plan: Plan, device) -> DPEngine:
    """The model (seeded when the config is) inside a DP engine with the run's generators."""
    torch.manual_seed(cfg.seed if cfg.seeded else torch.seed())
    return DPEngine(
        build_model_for(cfg),
        cfg,
        n_train=plan.n_train,
        device=device,
        noise_generator=make_generator(cfg.seed, "central", "noise", device=device),
        sampling_generator=make_generator(cfg.seed, "central", "sampling", device=device),
    )


def _release_feature_norm(
    cfg: TrainConfig, plan: Plan, tracker: PrivacyTracker, model, features, log
) -> None:
    """scatter-norm = "data": charge the release of the training features' per-channel
    statistics, then release them into the model's standardization layer (before any step).
    The nonprivate method takes the exact statistics."""
    for phase in plan.norm_phases():
        tracker.check(phase)
        tracker.spend(phase)
    mean, scale = release_channel_stats(
        features,
        clip=cfg.scatter_norm_clip,
        noise_multiplier=plan.norm_noise_multiplier,  # 0 (exact statistics) for nonprivate plans
        n_public=plan.n_train,
        generator=make_generator(cfg.seed, "central", "feature-norm"),
    )
    layer = standardize_layer(model)
    assert layer is not None, "scatter-norm = 'data' builds a ChannelStandardize layer"
    layer.set_stats(mean.to(layer.mean.device), scale.to(layer.scale.device))
    spent = f"epsilon so far {tracker.epsilon():.4f}" if cfg.private else "exact (nonprivate)"
    log(
        f"[norm] per-channel feature statistics released (sigma {plan.norm_noise_multiplier:g}, clip "
        f"{cfg.scatter_norm_clip:g}, {NORM_RELEASES} Gaussian releases): {spent}; scales "
        f"{float(scale.min()):.4g} to {float(scale.max()):.4g}"
    )


def _evaluated(model, splits: Splits) -> dict:
    """Validation and test loss and accuracy of ``model`` (the columns of a metrics row)."""
    val_loss, val_acc = evaluate(model, splits.validation)
    test_loss, test_acc = evaluate(model, splits.test)
    return dict(val_loss=val_loss, val_accuracy=val_acc, test_accuracy=test_acc, test_loss=test_loss)


def _epoch_line(row: dict, epochs: int) -> str:
    return (
        f"[epoch {row['epoch']:3d}/{epochs}] {row['phase']:8s} loss {row['train_loss']:.4f} "
        f"val acc {fmt(row['val_accuracy'])} eps {row['epsilon']:.3f} active {row['active_ratio']:.2f} "
        f"clipped {row['clipped_fraction']:.2f} ({row['seconds']:.1f}s)"
    )


def train_centralized(
    cfg: TrainConfig,
    *,
    log: Callable[[str], None] = print,
    command: str | None = None,
    run_dir: str | None = None,
    splits: Splits | None = None,
    return_model: bool = False,
) -> dict:
    """Run centralized training; returns the summary (also written to the run folder)."""
    if cfg.seeded:
        warnings.warn(
            f"seed={cfg.seed}: noise and sampling are reproducible; use a fixed seed only for "
            "experiments, never for a real release",
            stacklevel=2,
        )
    device = resolve_device(cfg.device)
    if splits is None:
        splits = splits_for(cfg)
    plan = make_plan(cfg, len(splits.train))
    engine = _central_engine(cfg, plan, device)
    train_data = splits.train.to(device)
    run_dir = _open_central_run(cfg, plan, run_dir, command, log, num_parameters(engine.model))

    tracker = PrivacyTracker(
        delta=cfg.delta, accountant=cfg.accountant, target_epsilon=cfg.epsilon if cfg.private else None
    )
    if cfg.scatter_norm == "data":
        _release_feature_norm(cfg, plan, tracker, engine.model, splits.train.x, log)
    masks = _CentralSteps(cfg, plan)
    metrics: list[dict] = []
    best = {"val_accuracy": -1.0, "epoch": 0}
    best_state = copy.deepcopy(engine.model.state_dict())
    step = 0
    ema = ParameterEMA(cfg.ema_decay, updates=plan.total_steps) if cfg.ema_decay > 0 else None
    t0 = time.time()
    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.time()
        engine.set_lr(cfg.lr * lr_factor(cfg.lr_schedule, epoch - 1, cfg.epochs))
        if cfg.private:
            _charge_epoch(tracker, plan, step)
        step, train_loss, clipped = _train_epoch(engine, masks, train_data, step, plan.steps_per_epoch, ema)
        eval_model = engine.model if ema is None else ema.averaged(engine.model)
        row = dict(
            epoch=epoch, step=step, phase="pretrain" if step <= plan.pretrain_steps else "train",
            train_loss=train_loss, **_evaluated(eval_model, splits),
            epsilon=tracker.epsilon() if cfg.private else math.inf, active_ratio=engine.active_ratio,
            clipped_fraction=clipped, seconds=time.time() - t_epoch,
        )  # fmt: skip
        metrics.append(row)
        if row["val_accuracy"] > best["val_accuracy"]:
            best = {"val_accuracy": row["val_accuracy"], "epoch": epoch}
            best_state = copy.deepcopy(eval_model.state_dict())
        write_json_atomic(os.path.join(run_dir, "metrics.json"), metrics)
        write_csv(os.path.join(run_dir, "metrics.csv"), metrics)
        log(_epoch_line(row, cfg.epochs))
    final_state = copy.deepcopy(eval_model.state_dict())
    if best["epoch"] == 0:  # no validation data (validation-fraction 0): nothing to select on,
        best, best_state = {"epoch": cfg.epochs, "val_accuracy": None}, final_state  # the last model
    best_test = _save_models(engine, final_state, best_state, splits.test, run_dir)
    final_test = metrics[-1]["test_accuracy"]
    summary = _central_summary(cfg, plan, tracker, best, best_test, final_test, t0, run_dir)
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    chosen = (
        f"last epoch {best['epoch']} (no validation data)"
        if best["val_accuracy"] is None
        else f"best epoch {best['epoch']} (val {best['val_accuracy']:.4f})"
    )
    log(
        f"[done] {chosen}: test accuracy "
        f"{best_test:.4f}; final test {final_test:.4f}; epsilon {summary['epsilon']} "
        f"in {summary['seconds']:.0f}s -> {run_dir}"
    )
    if return_model:
        engine.model.load_state_dict(final_state)
        summary["model"] = engine.model
    return summary
