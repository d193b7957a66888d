"""What a client does with a message, in plain functions (the handlers only translate)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord

from client import state as client_state
from common import protocol as P
from common.accounting import Phase, PrivacyTracker
from common.config import DEFAULT_DATA_DIR_ENV, TrainConfig
from common.data import TensorData
from common.distributed import LatticePlan, SecureRandom, noisy_share, rounding_bound_sq
from common.engine import DPEngine, evaluate, make_generator, per_example_loss, resolve_device, step_mode
from common.errors import BudgetError, DataError
from common.federated import (
    check_declared_size,
    declared_sizes,
    layout_key,
    load_silo,
    local_round,
    sparse_encode,
)
from common.masks import unpack_mask
from common.models import build_model_for
from common.schema import Schema, schema_of


@dataclass
class Silo:
    partition_id: int
    num_partitions: int
    train: TensorData
    validation: TensorData
    test: TensorData
    schema: Schema  # the schema its data were read with (its own copy, or the run's)
    declared: int  # its folder's declared size (silo.toml; 0: none)


_SILOS: dict[tuple, Silo] = {}
_ENGINES: dict[tuple, DPEngine] = {}


def data_dir_for(cfg: TrainConfig, context: Context) -> str:
    """Which data a silo reads, one rule (README "Data"): the silo's own ``data-dir`` node
    config, else the run's ``data-dir`` when it was set explicitly (run config), else this
    process's ``$ADADPIGU_DATA_DIR``, else the folder the server resolved."""
    node_dir = context.node_config.get("data-dir")
    if node_dir:
        return str(node_dir)
    run_dir = context.run_config.get("data-dir") if context.run_config else None
    if run_dir:
        return str(run_dir)
    return os.environ.get(DEFAULT_DATA_DIR_ENV) or cfg.data_dir


def get_silo(cfg: TrainConfig, context: Context) -> Silo:
    pid = int(context.node_config["partition-id"])
    nparts = int(context.node_config["num-partitions"])
    data_dir = data_dir_for(cfg, context)
    key = (layout_key(cfg, nparts, data_dir), pid)  # the one key the silo's data depend on
    if key not in _SILOS:
        s = load_silo(cfg, pid, nparts, data_dir=data_dir)
        schema = s.schema or schema_of(cfg.dataset, cfg.schema)
        _SILOS[key] = Silo(pid, nparts, s.train, s.validation, s.test, schema, s.declared)
    return _SILOS[key]


def released_sizes(cfg: TrainConfig, silo: Silo, context: Context) -> tuple[int, int, int]:
    """(training, validation, test) sizes this silo tells the server (weights, q, evaluation
    denominators): its declared, public sizes after checking them against the data, or the
    exact counts when the run opted out (``silo-sizes = "exact"``)."""
    if cfg.silo_sizes == "exact":
        return len(silo.train), len(silo.validation), len(silo.test)
    node_declared = int(context.node_config.get("declared-size", 0) or 0) or silo.declared
    sizes = declared_sizes(cfg, silo.num_partitions, node_declared)
    check_declared_size(cfg, len(silo.train) + len(silo.validation) + len(silo.test), sum(sizes))
    return sizes


def _device() -> torch.device:
    # A client uses CUDA when Ray gave it a GPU (CUDA_VISIBLE_DEVICES non-empty) or one is visible.
    return resolve_device("auto")


def get_engine(cfg: TrainConfig, silo: Silo) -> DPEngine:
    """The process's engine for these settings, shared by every silo this process serves
    (a simulation worker runs many clients in turn): model, optimizer, per-sample sampler
    and its buffers are built once. Nothing of one client survives into another's round:
    ``train_round`` loads the global weights, the client's own mask, statistics, sampling
    rate and generators, and resets the optimizer and importance sums every time."""
    key = cfg.digest()
    eng = _ENGINES.get(key)
    if eng is None:
        device = _device()
        model = build_model_for(cfg, silo.schema)
        eng = DPEngine(
            model,
            cfg.replace(sample_rate=cfg.resolved_sample_rate(len(silo.train))),
            n_train=len(silo.train),
            device=device,
            noise_generator=torch.Generator(device=device),
            sampling_generator=torch.Generator(device=device),
        )
        _ENGINES.clear()  # one engine per process at a time: bounded memory
        _ENGINES[key] = eng
    return eng


def _load_global(engine: DPEngine, arrays: ArrayRecord) -> None:
    state = arrays.to_torch_state_dict()
    engine.model.load_state_dict(state, strict=True)


# ----- client-side state in context.state ----------------------------------------------


def _mask_from_state(round_cfg: ConfigRecord, context: Context, d: int) -> tuple[torch.Tensor | None, int]:
    version = int(round_cfg.get(P.MASK_VERSION, 0))
    if version == 0:
        return None, 0
    if P.MASK_BITS in round_cfg:
        bits = bytes(round_cfg[P.MASK_BITS])
        context.state[P.STATE_MASK] = ConfigRecord({"version": version, "bits": bits, "d": d})
    stored = context.state.get(P.STATE_MASK)
    if stored is None or int(stored["version"]) != version:
        raise RuntimeError(
            f"mask version {version} requested but this client holds "
            f"{'none' if stored is None else int(stored['version'])}; the server must resend the mask bits"
        )
    return unpack_mask(bytes(stored["bits"]), d), version


def _client_tracker(cfg: TrainConfig, context: Context) -> PrivacyTracker:
    tracker = PrivacyTracker(
        delta=cfg.delta, accountant=cfg.accountant, target_epsilon=cfg.epsilon if cfg.private else None
    )
    rec = context.state.get(P.STATE_SPEND)
    if rec is not None:
        for s, q, t in zip(rec["sigma"], rec["q"], rec["steps"]):
            tracker.spend(Phase(float(s), float(q), int(t)))
    return tracker


def _save_tracker(tracker: PrivacyTracker, context: Context) -> None:
    context.state[P.STATE_SPEND] = ConfigRecord(
        {
            "sigma": [float(p.noise_multiplier) for p in tracker.phases],
            "q": [float(p.sample_rate) for p in tracker.phases],
            "steps": [int(p.steps) for p in tracker.phases],
        }
    )


# ----- handlers' work ----------------------------------------------------------------------


def _lattice_plan(cfg: TrainConfig, round_cfg: ConfigRecord, dim: int) -> LatticePlan:
    """The round's lattice, rebuilt here from the server's numbers and checked: the
    sensitivity bound is recomputed locally (never taken from the message)."""
    gamma = float(round_cfg[P.LATTICE_GAMMA])
    share_std = float(round_cfg[P.LATTICE_SHARE_STD])
    survivors, silos = int(round_cfg[P.LATTICE_SURVIVORS]), int(round_cfg[P.LATTICE_SILOS])
    if not (gamma > 0 and math.isfinite(gamma) and share_std > 0 and math.isfinite(share_std)):
        raise BudgetError(f"bad lattice from the server: gamma {gamma}, share std {share_std}")
    if not (1 <= survivors <= silos):
        raise BudgetError(f"bad lattice from the server: {survivors} survivors of {silos} silos")
    return LatticePlan(
        clip_norm=cfg.clip_norm,
        gamma=gamma,
        bound_sq=rounding_bound_sq(gamma * cfg.clip_norm, dim),
        share_std=share_std,
        survivors=survivors,
        silos=silos,
        dim=dim,
        max_batch=int(round_cfg[P.LATTICE_MAX_BATCH]),
    )


@dataclass
class _Round:
    silo: Silo
    engine: DPEngine
    server_round: int
    q: float
    steps: int
    durable: str | None
    tracker: PrivacyTracker
    mask: torch.Tensor | None
    mask_version: int


def _begin(
    cfg: TrainConfig,
    round_cfg: ConfigRecord,
    arrays: ArrayRecord,
    context: Context,
    sigma: float,
    *,
    keep_state: bool = False,
) -> _Round:
    """What every training round starts with: the silo (its durable state restored), its own
    budget checked for ``sigma`` before its data is touched, and its engine at the global
    model with its mask, this round's generators and learning rate; with ``keep_state`` also
    the silo's AdaCliP statistics and (``keep-optimizer-state``) its optimizer state, read
    after the restore."""
    silo = get_silo(cfg, context)
    engine = get_engine(cfg, silo)
    server_round = int(round_cfg[P.SERVER_ROUND])
    q = float(round_cfg[P.SAMPLE_RATE])
    steps = int(round_cfg[P.LOCAL_STEPS])
    if not (0 < q <= 1) or steps < 1:
        raise ValueError(f"bad round config: sample-rate {q}, local-steps {steps}")
    durable = client_state.state_dir(cfg, context, str(round_cfg.get(P.RUN_KEY, "")))
    client_state.restore(context, durable, silo.partition_id, server_round)
    tracker = _client_tracker(cfg, context)
    if cfg.private:
        if sigma <= 0:
            raise BudgetError(f"server asked for noise multiplier {sigma} in a private run")
        tracker.check(Phase(sigma, q, steps))
    _load_global(engine, arrays)
    mask, mask_version = _mask_from_state(round_cfg, context, engine.d)
    seed_keys = ("client", silo.partition_id, server_round)
    engine.begin_round(
        n_train=len(silo.train),
        q=q,
        noise_generator=make_generator(cfg.seed, *seed_keys, "noise", device=engine.device),
        sampling_generator=make_generator(cfg.seed, *seed_keys, "sampling", device=engine.device),
        mask=mask,
        stats_state=client_state.load_arrays(context, P.STATE_STATS)
        if keep_state and engine.stats is not None
        else None,
        optimizer_state=client_state.load_arrays(context, P.STATE_OPTIMIZER)
        if keep_state and round_cfg.get(P.KEEP_OPTIMIZER_STATE, False)
        else None,
        lr=float(round_cfg[P.CLIENT_LR]) if P.CLIENT_LR in round_cfg else None,
    )
    return _Round(silo, engine, server_round, q, steps, durable, tracker, mask, mask_version)


def _end(cfg: TrainConfig, r: _Round, sigma: float, context: Context) -> None:
    if cfg.private:
        r.tracker.spend(Phase(sigma, r.q, r.steps))
        _save_tracker(r.tracker, context)


def _round_metrics(cfg: TrainConfig, r: _Round, sigma: float, context: Context) -> dict:
    return {
        P.NUM_EXAMPLES: released_sizes(cfg, r.silo, context)[0],
        P.PARTITION_ID: r.silo.partition_id,
        P.DP_STEPS: r.steps if cfg.private else 0,
        P.DP_NOISE_MULTIPLIER: sigma,
        P.DP_SAMPLE_RATE: r.q,
        P.MASK_VERSION: r.mask_version,
    }


def train_round(
    cfg: TrainConfig, round_cfg: ConfigRecord, arrays: ArrayRecord, context: Context
) -> tuple[ArrayRecord, MetricRecord]:
    phase = str(round_cfg[P.PHASE])
    sigma = float(round_cfg[P.NOISE_MULTIPLIER])
    keep_optimizer = bool(round_cfg.get(P.KEEP_OPTIMIZER_STATE, False))
    r = _begin(cfg, round_cfg, arrays, context, sigma, keep_state=True)
    engine, silo = r.engine, r.silo
    result = local_round(
        engine,
        silo.train.to(engine.device) if engine.device.type != "cpu" else silo.train,
        mode=step_mode(cfg, pretraining=phase == P.PHASE_IMPORTANCE),
        steps=r.steps,
        noise_multiplier=sigma,
        update_importance=phase == P.PHASE_IMPORTANCE,
    )
    _end(cfg, r, sigma, context)
    if engine.stats is not None:
        client_state.save_arrays(context, P.STATE_STATS, engine.stats.state())
    if keep_optimizer:
        client_state.save_arrays(context, P.STATE_OPTIMIZER, engine.optimizer_state())
    client_state.save(context, r.durable, silo.partition_id, r.server_round)

    out = {P.UPDATE: Array(sparse_encode(result.delta, r.mask))}
    metrics = _round_metrics(cfg, r, sigma, context)
    if phase == P.PHASE_IMPORTANCE and engine.importance is not None:
        out[P.IMPORTANCE_TOTAL] = Array(engine.importance.total.float().cpu().numpy())
        out[P.IMPORTANCE_NOISE_VAR] = Array(engine.importance.noise_var.float().cpu().numpy())
        metrics[P.IMPORTANCE_STEPS] = engine.importance.steps
    return ArrayRecord(out), MetricRecord(metrics)


def distributed_share(
    cfg: TrainConfig,
    round_cfg: ConfigRecord,
    arrays: ArrayRecord,
    context: Context,
    adaclip: ArrayRecord | None = None,
) -> tuple[np.ndarray, MetricRecord]:
    """``dp-noise = "distributed"``: this silo's lattice sum of one Poisson batch's clipped
    gradients at the global model plus its discrete Gaussian share, on Z_{2^32} (not yet
    masked: :func:`client.secagg.mask_vector`). Charged to the silo's own account with the
    noise multiplier of the sum against the server (the lattice rebuilt and checked here)."""
    dim_mask = None
    d = get_engine(cfg, get_silo(cfg, context)).d
    version = int(round_cfg.get(P.MASK_VERSION, 0))
    if version:
        dim_mask, _ = _mask_from_state(round_cfg, context, d)
    dim = d if dim_mask is None else int(dim_mask.sum())
    plan = _lattice_plan(cfg, round_cfg, dim)
    sigma = plan.noise_multiplier
    sent = float(round_cfg[P.NOISE_MULTIPLIER])
    if not math.isclose(sigma, sent, rel_tol=1e-9):
        raise BudgetError(f"the lattice gives noise multiplier {sigma:.6g}, the server claims {sent:.6g}")
    steps = int(round_cfg[P.LOCAL_STEPS])
    if steps != 1:
        raise BudgetError(f"distributed noise takes one step per round, the server asked for {steps}")
    r = _begin(cfg, round_cfg, arrays, context, sigma)
    engine, silo = r.engine, r.silo
    seed_keys = ("client", silo.partition_id, r.server_round)
    center = scale = None
    if adaclip is not None:
        center = adaclip[P.CENTER].numpy()
        scale = adaclip[P.SCALE].numpy()
        if (
            center.shape != (d,)
            or scale.shape != (d,)
            or not (np.all(np.isfinite(center)) and np.all(scale > 0))
        ):
            raise BudgetError("bad clipping statistics from the server")
        center = torch.from_numpy(center.astype(np.float32)).to(engine.device)
        scale = torch.from_numpy(scale.astype(np.float32)).to(engine.device)
    rng = SecureRandom(None if not cfg.seeded else (cfg.seed, *seed_keys, "lattice"))
    ints, _ = engine.lattice_sum(
        silo.train.to(engine.device) if engine.device.type != "cpu" else silo.train,
        gamma=plan.gamma,
        bound_sq=plan.bound_sq,
        rng=rng,
        center=center,
        scale=scale,
    )
    share = noisy_share(ints, plan, rng)
    _end(cfg, r, sigma, context)
    client_state.save(context, r.durable, silo.partition_id, r.server_round)
    # nothing about the batch (its size, loss or clipping) is reported: only the masked share
    return share, MetricRecord(_round_metrics(cfg, r, sigma, context))


def evaluate_round(
    cfg: TrainConfig, arrays: ArrayRecord, context: Context, round_cfg: ConfigRecord | None = None
) -> MetricRecord:
    """Metrics of the global model on this silo's validation split (model selection,
    ``validation-release``) or its local test split (``federated-test``), released as the run
    says (docs/PRIVACY.md): ``noisy`` is charged to this silo's own account first (refused past
    its target) and released with Gaussian noise; ``exact`` (the opt-out) without."""
    purpose = "validation" if round_cfg is None else str(round_cfg.get(P.EVAL_PURPOSE, "validation"))
    key = P.TEST_RELEASE if purpose == "test" else P.VALIDATION_RELEASE
    release = None if round_cfg is None else round_cfg.get(key)
    if purpose not in ("validation", "test") or release not in ("noisy", "exact"):  # never exact silently
        raise ValueError(f"evaluate message: {key} must be 'noisy' or 'exact', got {release!r}")
    silo = get_silo(cfg, context)
    engine = get_engine(cfg, silo)
    _, n_val, n_test = released_sizes(cfg, silo, context)
    data, n = (silo.test, n_test) if purpose == "test" else (silo.validation, n_val)
    if purpose == "test" and len(silo.test) == 0:
        raise DataError(
            "federated-test: this silo has no local test split (set test-fraction > 0, or give its data a "
            "test/ sub-folder)",
            public=True,
        )
    if release == "noisy" and cfg.private:
        return _noisy_evaluation(cfg, round_cfg, arrays, context, silo, engine, purpose, data, n)
    _load_global(engine, arrays)
    loss, acc = evaluate(engine.model, data)
    accuracy, loss_key = (P.TEST_ACCURACY, P.TEST_LOSS) if purpose == "test" else (P.VAL_ACCURACY, P.VAL_LOSS)
    return MetricRecord(
        {P.NUM_EXAMPLES: max(n, 1), accuracy: float(np.nan_to_num(acc)), loss_key: float(np.nan_to_num(loss))}
    )


def _noisy_evaluation(
    cfg: TrainConfig,
    round_cfg: ConfigRecord,
    arrays: ArrayRecord,
    context: Context,
    silo: Silo,
    engine: DPEngine,
    purpose: str,
    data: TensorData,
    n: int,
) -> MetricRecord:
    """The noisy release: validation, the correct count + N(0, validation-noise^2)
    (sensitivity 1); test, the correct count and the sum of losses clipped to [0, bound] over
    the bound, each + N(0, test-noise^2) (sensitivity sqrt(2): noise multiplier
    test-noise / sqrt(2)). Both are counts over the silo's real examples: scaling an accuracy
    by the declared size instead would change by up to n_declared / n_real."""
    if purpose == "test":
        sigma = float(round_cfg[P.TEST_NOISE])
        bound = float(round_cfg[P.TEST_LOSS_BOUND])
        if not (math.isfinite(bound) and bound > 0):
            raise BudgetError(f"server asked for test-loss-bound {bound}")
        phase = Phase(sigma / math.sqrt(2.0), 1.0, 1)
    else:
        sigma, bound = float(round_cfg[P.VALIDATION_NOISE]), 0.0
        phase = Phase(sigma, 1.0, 1)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise BudgetError(f"server asked for {purpose} noise {sigma}")
    server_round = int(round_cfg.get(P.SERVER_ROUND, 0))
    durable = client_state.state_dir(cfg, context, str(round_cfg.get(P.RUN_KEY, "")))
    client_state.restore(context, durable, silo.partition_id, server_round)
    tracker = _client_tracker(cfg, context)
    tracker.check(phase)  # before touching the data
    _load_global(engine, arrays)
    correct, loss_sum = _counts(engine.model, data, bound)
    gen = make_generator(cfg.seed, "client", silo.partition_id, server_round, purpose)
    noise = sigma * torch.randn(2, generator=gen, dtype=torch.float64)
    tracker.spend(phase)
    _save_tracker(tracker, context)
    client_state.save(context, durable, silo.partition_id, server_round)
    if purpose == "test":
        return MetricRecord(
            {
                P.NUM_EXAMPLES: max(n, 1),
                P.TEST_CORRECT_NOISY: correct + float(noise[0]),
                P.TEST_LOSS_NOISY: loss_sum / bound + float(noise[1]),
            }
        )
    return MetricRecord({P.NUM_EXAMPLES: max(n, 1), P.VAL_CORRECT_NOISY: correct + float(noise[0])})


def _counts(
    model: torch.nn.Module, data: TensorData, bound: float, batch_size: int = 2048
) -> tuple[float, float]:
    """(correct predictions, sum of per-example losses clipped to [0, bound]) on ``data``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x, y = data.x[i : i + batch_size].to(device), data.y[i : i + batch_size].to(device)
            out = model(x)
            correct += float((out.argmax(1) == y).sum())
            if bound > 0:
                loss_sum += float(per_example_loss(out, y).clamp(0.0, bound).sum())
    model.train(was_training)
    return correct, loss_sum
