"""The AdaDPIGU strategy: a FedAvg subclass for importance rounds, masks and sparse updates.

Per round (DESIGN.md §3):
- ``configure_train`` samples clients, checks the privacy ledger (no participant may
  pass the target), moves the retention ratio along the schedule, and sends each client
  the global model plus its round config: phase, noise multiplier, sample rate, local
  steps, r(t), and the global mask as packed bits (only to nodes whose copy is stale);
- ``aggregate_train`` validates every reply (shape, finite values, mask version, DP
  events as planned) and rejects bad ones with a logged reason; the valid sparse
  updates are averaged coordinate-wise (weighted by examples) into the global model;
  frozen coordinates stay put. After the last importance round the released importance
  sums are aggregated (weighted by examples) into one global top-k ranking.

The maths (sparse encoding, weighted averaging, masks) lives in ``common``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import protocol as P
from common.accounting import Phase
from common.adaclip import AdaClipStatistics
from common.config import FederatedConfig, TrainConfig
from common.distributed import LatticePlan, headroom, plan_lattice, to_signed
from common.engine import derive_seed, step_mode
from common.errors import BudgetError, UserError
from common.federated import ClientPlan, aggregate_sparse, silo_noise, test_phase, validation_phase
from common.masks import (
    ImportanceAccumulator,
    MaskBuilder,
    MovementScores,
    UnfreezeSchedule,
    importance_scores,
    pack_mask,
)
from common.models import ParameterEMA, flat_parameters, load_flat_parameters, model_signature
from common.privacy import release_secure_sum
from common.schema import schema_of
from common.server_opt import ServerOptimizer, lr_factor
from server.ledger import PrivacyLedger
from server.secagg import SecAggRefused, SecureAggregator


class RoundError(UserError):
    """A round cannot run (too few clients, nothing valid came back)."""


@dataclass
class SiloInfo:
    node_id: int
    name: str  # "silo-<partition-id>", the ledger key
    n_train: int
    n_val: int
    plan: ClientPlan
    noise_multiplier: float = 0.0
    n_test: int = 0


@dataclass
class Sent:
    """What a node was asked to do this round (to check its reply against)."""

    silo: SiloInfo
    phase_name: str
    phase: Phase
    mask_version: int
    expected_len: int
    down_bytes: int


class AdaDPIGUStrategy(FedAvg):
    def __init__(
        self,
        cfg: TrainConfig,
        fed: FederatedConfig,
        *,
        model: torch.nn.Module,
        ledger: PrivacyLedger,
    ) -> None:
        super().__init__(
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_train_nodes=fed.min_train_nodes,
            min_evaluate_nodes=1,
            min_available_nodes=fed.min_available_nodes,
        )
        self.cfg, self.fed = cfg, fed
        self.model = model
        self.sizes = [p.numel() for p in model.parameters() if p.requires_grad]
        self.d = sum(self.sizes)
        self.ledger = ledger
        self.rng = random.Random(derive_seed(cfg.seed, "server", "sampling"))
        self.silos: dict[int, SiloInfo] = {}
        self.importance_rounds = fed.importance_rounds_for(cfg)
        kind, values = cfg.ratio_schedule()
        self.schedule = UnfreezeSchedule(kind, cfg.r0, cfg.r_max, values)
        self.mask: torch.Tensor | None = None
        self.mask_version = 0
        self.mask_bits = b""
        self.node_mask_version: dict[int, int] = {}
        self.builder: MaskBuilder | None = None
        self.importance_sum = torch.zeros(self.d, dtype=torch.float64)
        self.importance_weight = 0.0
        # dynamic mask (mask-refresh > 0): importance from the global weights' movement
        self.movement = MovementScores(self.d) if cfg.uses_mask and cfg.mask_refresh > 0 else None
        self.sent: dict[int, Sent] = {}
        self.current_flat: torch.Tensor | None = None
        # dp-noise = "distributed": the server takes the clients' SGD step on the securely
        # aggregated gradient (the run's momentum unless server-optimizer = "fedavgm" sets one)
        fed.check_with(cfg)
        self.distributed = fed.dp_noise == "distributed"
        distributed_momentum = fed.server_momentum if fed.server_optimizer == "fedavgm" else cfg.momentum
        self.server_opt = ServerOptimizer(
            "fedavgm" if self.distributed else fed.server_optimizer,
            self.d,
            momentum=distributed_momentum if self.distributed else fed.server_momentum,
            beta1=fed.server_beta1,
            beta2=fed.server_beta2,
            tau=fed.server_tau,
        )
        # EMA of the global weights (ema-decay per round): evaluated and selected, never trained
        self.ema = ParameterEMA(cfg.ema_decay, updates=fed.num_server_rounds) if cfg.ema_decay > 0 else None
        self.rejections: list[dict] = []
        self.run_key = ""  # the run folder's name (set by the runner): clients keep durable state under it
        self.train_config_json = json.dumps(cfg.to_dict())
        self.schema_digest = schema_of(cfg.dataset, cfg.schema).digest()
        self.model_signature = model_signature(model)
        # distributed noise: secure aggregation, the lattice of the round, and the statistics
        # that local noise keeps in each client (importance, AdaCliP) kept here instead, from
        # the aggregated release (a silo's own share is not noisy enough to adapt on)
        self.secagg = (
            SecureAggregator(
                fed.secagg_survivors, fed.secagg_key_rounds, fed.round_timeout, self.train_config_json
            )
            if self.distributed
            else None
        )
        self.lattice: LatticePlan | None = None
        self.own_ledger = PrivacyLedger(
            delta=cfg.delta, accountant=cfg.accountant, target_epsilon=None, private=cfg.private
        )
        self.server_stats = (
            AdaClipStatistics(
                self.d, beta1=cfg.beta1, beta2=cfg.beta2, h1=cfg.h1, h2=cfg.h2, scale_rule=cfg.scale_rule
            )
            if self.distributed and cfg.uses_adaptive_clip
            else None
        )
        self.server_importance = (
            ImportanceAccumulator(self.d, cfg.importance) if self.distributed and cfg.uses_mask else None
        )
        self.grid: Grid | None = None

    # ----- set-up ------------------------------------------------------------------------
    def register_silos(self, replies: Iterable[Message]) -> None:
        """Record each node's silo (from the query round) and its DP plan. A silo whose data do
        not match the schema, whose schema differs from the run's or whose model differs from
        the server's is refused by name, before anything is spent."""
        refused = []
        for msg in replies:
            if msg.has_error():
                log(
                    WARNING,
                    "node %s did not answer the query: %s",
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            m = msg.content[P.METRICS]
            pid = int(m[P.PARTITION_ID])
            if int(m.get(P.DATA_ERROR, 0)):
                refused.append(
                    f"silo {pid}: its data do not match the schema (the details are on the silo's own log)"
                )
                continue
            ids = msg.content.config_records.get(P.CONFIG)
            digest = str(ids.get(P.SCHEMA_DIGEST, "")) if ids is not None else ""
            if digest != self.schema_digest:
                refused.append(
                    f"silo {pid}: its schema differs from the run's ({digest[:12] or 'none'} vs "
                    f"{self.schema_digest[:12]}): every silo must hold the same public schema"
                )
                continue
            signature = str(ids.get(P.MODEL_SIGNATURE, "")) if ids is not None else ""
            if signature != self.model_signature:
                refused.append(
                    f"silo {pid}: the model it builds differs from the server's (parameter names or shapes; "
                    "the same model setting and code must be installed on both sides)"
                )
                continue
            n_train = int(m[P.NUM_EXAMPLES])
            plan = ClientPlan.for_silo(self.cfg, self.fed, n_train)
            self.silos[msg.metadata.src_node_id] = SiloInfo(
                msg.metadata.src_node_id,
                f"silo-{pid}",
                n_train,
                int(m[P.NUM_VAL_EXAMPLES]),
                plan,
                n_test=int(m.get(P.NUM_TEST_EXAMPLES, 0)),
            )
        if refused:
            raise RoundError("; ".join(refused))
        names = [s.name for s in self.silos.values()]
        if len(set(names)) != len(names):
            raise RoundError(f"two nodes report the same partition: {sorted(names)}")

    def calibrate(self) -> None:
        """Noise per silo so that taking part in every planned round meets the target."""
        if not self.cfg.private:
            return
        small = [s.name for s in self.silos.values() if self.cfg.delta >= 1.0 / s.n_train]
        if small:
            log(
                WARNING,
                "delta = %g >= 1/n for %s: publishing one random example outright would meet "
                "it; use delta well below 1/n",
                self.cfg.delta,
                ", ".join(sorted(small)[:5]),
            )
        self._warn_if_validation_is_noise()
        cache: dict[tuple[float, int], float] = {}
        for silo in self.silos.values():
            key = (silo.plan.sample_rate, silo.plan.local_steps)
            if key not in cache:
                cache[key] = silo_noise(self.cfg, self.fed, silo.plan, name=silo.name)
            silo.noise_multiplier = cache[key]
        if self.distributed:  # one noise for the one sum: the most demanding silo's
            sigma = max(s.noise_multiplier for s in self.silos.values())
            for silo in self.silos.values():
                silo.noise_multiplier = sigma

    def _warn_if_validation_is_noise(self) -> None:
        """Noisy validation: choosing among rounds on a released accuracy whose noise std is more
        than a point is mostly choosing on noise: say so before round 1."""
        if self.validation_phase() is not None:
            self._warn_if_noise(
                "noisy validation", self.fed.validation_noise, sum(s.n_val for s in self.silos.values()),
                "the best round is chosen mostly on noise; use more validation data, a smaller "
                "validation-noise or validation-release = 'none'",
            )  # fmt: skip

    def warn_if_test_is_noise(self, federated: bool) -> None:
        """Noisy federated test: above a point of noise std the numbers would be mostly noise."""
        if federated and self.test_phase() is not None:
            self._warn_if_noise(
                "noisy federated test", self.fed.test_noise, sum(s.n_test for s in self.silos.values()),
                "more test data or a smaller test-noise would help",
            )  # fmt: skip

    def _warn_if_noise(self, what: str, noise: float, examples: int, advice: str) -> None:
        """A release of (sum of noisy counts) / examples has noise std noise * sqrt(silos) /
        examples; above 0.01 a warning before round 1."""
        if not self.silos:
            return
        std = noise * math.sqrt(len(self.silos)) / max(examples, 1)
        if std > 0.01:
            log(
                WARNING,
                "%s: the released accuracy has a noise std of %.3f (noise %g over %d examples in %d silos): %s",
                what,
                std,
                noise,
                examples,
                len(self.silos),
                advice,
            )

    def validation_phase(self, releases: int = 1) -> Phase | None:
        """The DP event of ``releases`` noisy validation releases (None when none are charged)."""
        return validation_phase(self.cfg, self.fed, releases)

    # ----- schedule ----------------------------------------------------------------------
    def phase_of(self, server_round: int) -> str:
        return P.PHASE_IMPORTANCE if server_round <= self.importance_rounds else P.PHASE_TRAIN

    def ratio_of(self, server_round: int) -> float:
        if not self.cfg.uses_mask or self.phase_of(server_round) == P.PHASE_IMPORTANCE:
            return 1.0
        stage = server_round - self.importance_rounds - 1
        return self.schedule.ratio(stage, self.fed.num_server_rounds - self.importance_rounds)

    def client_lr(self, server_round: int) -> float:
        return self.cfg.lr * lr_factor(self.cfg.lr_schedule, server_round - 1, self.fed.num_server_rounds)

    def server_lr(self, server_round: int) -> float:
        factor = lr_factor(self.fed.server_lr_schedule, server_round - 1, self.fed.num_server_rounds)
        return self.fed.server_lr * factor

    def _update_mask(self, server_round: int) -> None:
        assert self.current_flat is not None
        if self.movement is not None and self.movement.start is None:
            self.movement.begin(self.current_flat)  # the first window: the importance rounds
        if not self.cfg.uses_mask or self.phase_of(server_round) == P.PHASE_IMPORTANCE:
            return
        stage = server_round - self.importance_rounds - 1
        m = self.cfg.mask_refresh
        if self.builder is None or (self.movement is not None and stage > 0 and stage % m == 0):
            if self.movement is not None:
                scores = self.movement.refresh(self.current_flat)
            else:
                if self.importance_weight <= 0:
                    raise RoundError("no valid importance scores were received: cannot build the mask")
                scores = self.importance_sum / self.importance_weight
            self.builder = MaskBuilder(scores.float(), self.sizes, self.cfg.mask_scope)
        new = self.builder.mask(self.ratio_of(server_round))
        if self.mask is None or not torch.equal(new, self.mask):
            self.mask = new
            self.mask_version += 1
            self.mask_bits = pack_mask(new)

    # ----- train -------------------------------------------------------------------------
    def sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        connected = set(grid.get_node_ids())
        available = sorted(n for n in self.silos if n in connected)
        k = max(minimum, math.ceil(fraction * len(available)))
        if len(available) < minimum:
            raise RoundError(f"only {len(available)} registered clients are connected; {minimum} are needed")
        return sorted(self.rng.sample(available, min(k, len(available))))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        self.grid = grid
        nodes = self.sample(grid, self.fed.fraction_train, self.fed.min_train_nodes)
        phase = self.phase_of(server_round)
        if self.cfg.private:
            self.ledger.check_round(self.planned_phases(nodes))  # raises BudgetError before anything is sent
        self.current_flat = self._flat_of(arrays)
        self._update_mask(server_round)
        base_bytes = arrays.count_bytes()
        expected_len = self.d if self.mask is None else int(self.mask.sum())
        extra: dict[int, dict] = {n: {} for n in nodes}
        records: dict = {}
        if self.distributed:
            nodes, extra, records = self._distributed_round(grid, nodes, phase, expected_len)
            base_bytes += sum(r.count_bytes() for r in records.values())
        self.sent = {}
        messages = []
        for n in nodes:
            silo = self.silos[n]
            rc = ConfigRecord(
                {
                    P.SERVER_ROUND: server_round,
                    P.PHASE: phase,
                    P.TRAIN_CONFIG: self.train_config_json,
                    P.NOISE_MULTIPLIER: float(silo.noise_multiplier),
                    P.SAMPLE_RATE: float(silo.plan.sample_rate),
                    P.LOCAL_STEPS: int(silo.plan.local_steps),
                    P.RETENTION_RATIO: float(self.ratio_of(server_round)),
                    P.MASK_VERSION: self.mask_version,
                    P.NUM_PARAMETERS: self.d,
                    P.CLIENT_LR: float(self.client_lr(server_round)),
                    P.KEEP_OPTIMIZER_STATE: self.fed.client_optimizer_state == "keep",
                    P.RUN_KEY: self.run_key,
                    **extra[n],
                }
            )
            down = base_bytes
            if self.mask_version and self.node_mask_version.get(n) != self.mask_version:
                rc[P.MASK_BITS] = self.mask_bits
                down += len(self.mask_bits)
            messages.append(
                Message(
                    RecordDict({P.ARRAYS: arrays, P.CONFIG: rc, **records}),
                    dst_node_id=n,
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
            self.sent[n] = Sent(
                silo=silo,
                phase_name=phase,
                phase=self._round_phase(silo) if self.cfg.private else Phase(1.0, 1.0, 0),
                mask_version=self.mask_version,
                expected_len=expected_len,
                down_bytes=down,
            )
        return messages

    def _distributed_round(
        self, grid: Grid, nodes: list[int], phase: str, dim: int
    ) -> tuple[list[int], dict[int, dict], dict]:
        """Distributed noise: the key set-up this round uses, the round's lattice (its noise
        split so that ``secagg-survivors`` shares give the calibrated noise multiplier), each
        node's secure-aggregation fields, and the server's clipping statistics to send."""
        assert self.secagg is not None
        epoch = self.secagg.prepare(grid, nodes)
        nodes = [n for n in nodes if n in epoch.members]
        members = [self.silos[n] for n in nodes]
        sigma = max(s.noise_multiplier for s in members)
        self.lattice = plan_lattice(
            clip_norm=self.cfg.clip_norm,
            dim=dim,
            noise_multiplier=sigma,
            survivors=self.secagg.required(len(nodes)),  # fewer never aggregate
            silos=len(nodes),
            expected_total_batch=sum(s.plan.sample_rate * s.n_train for s in members),
        )
        lat = {
            P.LATTICE_GAMMA: self.lattice.gamma,
            P.LATTICE_SHARE_STD: self.lattice.share_std,
            P.LATTICE_SURVIVORS: self.lattice.survivors,
            P.LATTICE_SILOS: self.lattice.silos,
            P.LATTICE_MAX_BATCH: self.lattice.max_batch,
        }
        extra = {n: {**lat, **self.secagg.collect_fields(n)} for n in nodes}
        records = {}
        if (
            self.server_stats is not None
            and step_mode(self.cfg, pretraining=phase == P.PHASE_IMPORTANCE) == "adaptive"
        ):
            records[P.ADACLIP] = ArrayRecord(
                {
                    P.CENTER: Array(self.server_stats.center().float().numpy()),
                    P.SCALE: Array(self.server_stats.scale(self.mask, 1.0).float().numpy()),
                }
            )
        return nodes, extra, records

    def _round_phase(self, silo: SiloInfo) -> Phase:
        """The DP event a round charges to ``silo`` against the server."""
        if self.distributed:
            assert self.lattice is not None
            return Phase(self.lattice.noise_multiplier, silo.plan.sample_rate, 1)
        return silo.plan.round_phase(silo.noise_multiplier)

    def planned_phases(self, nodes: Iterable[int] | None = None) -> dict[str, Phase]:
        """The DP event a round charges to each silo (of ``nodes``; default: every silo);
        distributed noise: the calibrated multiplier (the lattice's is this up to rounding)."""
        chosen = self.silos.values() if nodes is None else (self.silos[n] for n in nodes)
        return {s.name: s.plan.round_phase(s.noise_multiplier) for s in chosen}

    def record_spend(self, server_round: int) -> None:
        """Charge every client that was sent this round (before its reply: conservative);
        distributed noise: also what the silo's own share alone is worth (``own_ledger``)."""
        if not self.cfg.private:
            return
        for s in self.sent.values():
            self.ledger.record(s.silo.name, server_round, s.phase)
            if self.distributed:
                assert self.lattice is not None
                own = Phase(self.lattice.own_share_noise_multiplier, s.phase.sample_rate, 1)
                self.own_ledger.record(s.silo.name, server_round, own)

    def _flat_of(self, arrays: ArrayRecord) -> torch.Tensor:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return flat_parameters(self.model)

    def validate_reply(self, msg: Message) -> tuple[str | None, dict]:
        """(reason for rejection or None, parsed content)."""
        node = msg.metadata.src_node_id
        sent = self.sent.get(node)
        if sent is None:
            return f"reply from node {node}, which was not sent this round", {}
        if msg.has_error():
            return f"client error: {msg.error.reason}", {}
        content = msg.content
        if P.ARRAYS not in content.array_records or P.METRICS not in content.metric_records:
            return "reply lacks its 'arrays' or 'metrics' record", {}
        arrays, metrics = content[P.ARRAYS], content[P.METRICS]
        for key in (P.NUM_EXAMPLES, P.DP_STEPS, P.DP_NOISE_MULTIPLIER, P.DP_SAMPLE_RATE, P.MASK_VERSION):
            if key not in metrics:
                return f"metrics lack '{key}'", {}
        if P.UPDATE not in arrays:
            return f"arrays lack '{P.UPDATE}'", {}
        n_ex = metrics[P.NUM_EXAMPLES]
        if not isinstance(n_ex, int) or n_ex <= 0:
            return f"num-examples must be a positive integer, got {n_ex!r}", {}
        if int(metrics[P.MASK_VERSION]) != sent.mask_version:
            return (
                f"update was made for mask version {metrics[P.MASK_VERSION]}, not {sent.mask_version} "
                "(values outside the current mask)",
                {},
            )
        if self.cfg.private:
            reported = (
                float(metrics[P.DP_NOISE_MULTIPLIER]),
                float(metrics[P.DP_SAMPLE_RATE]),
                int(metrics[P.DP_STEPS]),
            )
            planned = (sent.phase.noise_multiplier, sent.phase.sample_rate, sent.phase.steps)
            if not np.allclose(reported, planned, rtol=1e-9, atol=0):
                return f"client reports DP events {reported}, planned {planned}", {}
        try:
            update = arrays[P.UPDATE].numpy()
        except Exception as exc:  # undecodable payload
            return f"update cannot be decoded: {exc}", {}
        parsed = {"update": update, "weight": float(n_ex), "up_bytes": arrays.count_bytes(), "node": node}
        if self.distributed:  # a masked vector: only its form can be checked
            reason = (
                None
                if update.dtype == np.uint32 and update.shape == (sent.expected_len,)
                else f"masked vector has dtype {update.dtype} and shape {tuple(update.shape)}, expected "
                f"uint32 ({sent.expected_len},)"
            )
        else:
            reason = self._check_update(update, sent.expected_len)
        if (
            reason is None and n_ex != sent.silo.n_train
        ):  # the size the silo registered (declared, by default)
            reason = f"num-examples {n_ex} differs from the size the silo registered ({sent.silo.n_train})"
        if (
            reason is None
            and not self.distributed
            and sent.phase_name == P.PHASE_IMPORTANCE
            and self.cfg.uses_mask
        ):
            reason, parsed["importance"] = self._released_importance(arrays, metrics)
        return (reason, {}) if reason is not None else (None, parsed)

    def _check_update(self, update: np.ndarray, expected_len: int) -> str | None:
        """Why a (local-noise) sparse update is unusable, or None."""
        if update.ndim != 1 or update.shape[0] != expected_len:
            return (
                f"update has shape {tuple(update.shape)}, expected ({expected_len},) "
                "(the active coordinates of the mask)"
            )
        if not np.issubdtype(update.dtype, np.floating):
            return f"update has dtype {update.dtype}, expected a float type"
        if not np.all(np.isfinite(update)):
            return "update contains NaN or inf"
        norm = float(np.linalg.norm(update.astype(np.float64)))
        if norm == 0.0:
            return "update is exactly zero (impossible after Gaussian noise; a broken or idle client)"
        if norm > self.fed.max_update_norm:
            return f"update norm {norm:.3g} exceeds max-update-norm {self.fed.max_update_norm:g}"
        return None

    def _released_importance(
        self, arrays: ArrayRecord, metrics: MetricRecord
    ) -> tuple[str | None, torch.Tensor | None]:
        """An importance round's released sums, as scores (or why they are unusable)."""
        for key in (P.IMPORTANCE_TOTAL, P.IMPORTANCE_NOISE_VAR):
            if key not in arrays:
                return f"importance round reply lacks '{key}'", None
            arr = arrays[key].numpy()
            if arr.shape != (self.d,) or not np.all(np.isfinite(arr)):
                return f"'{key}' must be {self.d} finite values", None
        steps = int(metrics.get(P.IMPORTANCE_STEPS, 0))
        if steps <= 0:
            return "importance round reply has no importance steps", None
        scores = importance_scores(
            torch.from_numpy(arrays[P.IMPORTANCE_TOTAL].numpy().astype(np.float64)),
            torch.from_numpy(arrays[P.IMPORTANCE_NOISE_VAR].numpy().astype(np.float64)),
            steps,
            self.cfg.importance,
        )
        return None, scores

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, rejected = [], 0
        seen: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in self.sent and msg.has_error():
                # generated by the SuperLink itself (node unavailable, message expired): its
                # source is not the silo; the silo is counted below as not having replied
                log(WARNING, "round %d: SuperLink: %s", server_round, msg.error.reason)
                self.rejections.append(
                    {"round": server_round, "node": None, "reason": f"client error: {msg.error.reason}"}
                )
                continue
            if node in seen:
                log(WARNING, "round %d: duplicate reply from node %s ignored", server_round, node)
                continue
            seen.add(node)
            reason, parsed = self.validate_reply(msg)
            if reason is not None:
                is_failure = msg.has_error()
                rejected += int(not is_failure)
                self.rejections.append({"round": server_round, "node": node, "reason": reason})
                log(
                    WARNING,
                    "round %d: %s update from node %s: %s",
                    server_round,
                    "no" if is_failure else "rejected",
                    node,
                    reason,
                )
                continue
            valid.append(parsed)
        # failed = sent but no usable reply for a reason other than validation (error, timeout, gone)
        failed = len(self.sent) - len(valid) - rejected
        metrics = {
            "clients-sent": len(self.sent),
            "clients-valid": len(valid),
            "rejected": rejected,
            "failed": failed,
            "bytes-down": float(sum(s.down_bytes for s in self.sent.values())),
            "bytes-up": float(sum(v["up_bytes"] for v in valid)),
        }
        if len(valid) < self.fed.min_train_nodes and self.secagg is not None:
            # nothing is unmasked (the instance is spent all the same): the round is refused
            self.secagg.abandon()
            raise SecAggRefused(
                f"{len(valid)} valid masked vectors, fewer than min-train-nodes ({self.fed.min_train_nodes})"
            )
        if len(valid) < self.fed.min_train_nodes:
            log(
                WARNING,
                "round %d: %d valid updates, fewer than min-train-nodes (%d); the global model is unchanged",
                server_round,
                len(valid),
                self.fed.min_train_nodes,
            )
            metrics["insufficient"] = 1
            return None, MetricRecord(metrics)
        self._step(server_round, valid, metrics)
        log(INFO, "round %d: aggregated %d/%d updates", server_round, len(valid), len(self.sent))
        return ArrayRecord(self.model.state_dict()), MetricRecord(metrics)

    def _step(self, server_round: int, valid: list[dict], metrics: dict) -> None:
        """The server's step from the round's valid replies (the averaged local updates, or
        the securely aggregated gradient), then the EMA, movement scores and importance."""
        assert self.current_flat is not None
        if self.distributed:
            delta, metrics["secagg-headroom"] = self._secure_gradient(server_round, valid)
            lr = self.client_lr(server_round)
        else:
            delta = aggregate_sparse(
                [v["update"] for v in valid], [v["weight"] for v in valid], self.mask, self.d
            )
            lr = 1.0
        # post-processing of the released updates; frozen coordinates neither move nor remember
        new_flat = self.server_opt.step(
            self.current_flat, delta, lr=lr * self.server_lr(server_round), mask=self.mask
        )
        load_flat_parameters(self.model, new_flat)
        if self.ema is not None:
            self.ema.update(new_flat)
        if self.movement is not None:
            self.movement.observe(self.mask, self.client_lr(server_round) * self.server_lr(server_round))
        if self.phase_of(server_round) == P.PHASE_IMPORTANCE and self.cfg.uses_mask and not self.distributed:
            for v in valid:
                self.importance_sum += v["weight"] * v["importance"]
                self.importance_weight += v["weight"]

    def _secure_gradient(self, server_round: int, valid: list[dict]) -> tuple[torch.Tensor, float]:
        """Distributed noise: unmask the sum of the survivors' vectors (SecAggRefused when too
        few survived), decode it into the released gradient estimate, update the server's
        importance and clipping statistics from it; (the step's direction, the sum's headroom)."""
        assert self.secagg is not None and self.lattice is not None and self.grid is not None
        total = self.secagg.unmask(self.grid, {v["node"]: v["update"] for v in valid})
        signed = to_signed(total)
        room = headroom(signed)
        if room > 0.5:
            log(
                WARNING,
                "round %d: the secure sum reached %.0f%% of the 32-bit range: it may have wrapped",
                server_round,
                100 * room,
            )
        plan = self.lattice
        adaptive = (
            self.server_stats is not None
            and step_mode(self.cfg, pretraining=self.phase_of(server_round) == P.PHASE_IMPORTANCE)
            == "adaptive"
        )
        released = release_secure_sum(
            torch.from_numpy(signed.astype(np.float64) / plan.gamma),
            noise_std=math.sqrt(len(valid)) * plan.share_std / plan.gamma,
            expected_batch_size=sum(
                self.sent[v["node"]].silo.plan.sample_rate * self.sent[v["node"]].silo.n_train for v in valid
            ),
            sizes=[self.d],
            mask=self.mask,
            center=self.server_stats.center() if adaptive else None,
            scale=self.server_stats.scale(self.mask, 1.0) if adaptive else None,
        )
        if self.server_importance is not None and self.phase_of(server_round) == P.PHASE_IMPORTANCE:
            self.server_importance.update_from_released(released)
            self.importance_sum = self.server_importance.scores().double()
            self.importance_weight = 1.0
        if self.server_stats is not None:
            self.server_stats.update_from_released(released)
        return -released.values.double(), room

    def evaluation_model(self) -> torch.nn.Module:
        """The model to evaluate and select: the EMA of the weights when ``ema-decay`` > 0."""
        return self.model if self.ema is None else self.ema.averaged(self.model)

    # ----- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue after a restart (node ids are not kept: they change)."""
        return {
            "mask": None if self.mask is None else self.mask.clone(),
            "mask_version": self.mask_version,
            "importance_sum": self.importance_sum.clone(),
            "importance_weight": self.importance_weight,
            "builder_built": self.builder is not None,
            "rng": self.rng.getstate(),
            "rejections": list(self.rejections),
            "noise": {s.name: s.noise_multiplier for s in self.silos.values()},
            "server_opt": self.server_opt.state_dict(),
            "ema": None if self.ema is None or self.ema.flat is None else self.ema.flat.clone(),
            "movement": None if self.movement is None else self.movement.state_dict(),
            "own_ledger": self.own_ledger.to_dict(pending=True),
            "server_stats": None if self.server_stats is None else self.server_stats.state(),
            "server_importance": None
            if self.server_importance is None
            else {
                "total": self.server_importance.total.clone(),
                "noise_var": self.server_importance.noise_var.clone(),
                "steps": self.server_importance.steps,
            },
        }

    def load_state(self, state: dict) -> None:
        self.mask = state["mask"]
        self.mask_version = int(state["mask_version"])
        self.mask_bits = pack_mask(self.mask) if self.mask is not None else b""
        self.importance_sum = state["importance_sum"].clone()
        self.importance_weight = float(state["importance_weight"])
        if self.movement is not None and state.get("movement") is not None:
            self.movement.load_state_dict(state["movement"])
        if state["builder_built"]:
            # the ranking the mask was last built from (movement scores are unchanged since)
            scores = (
                self.movement.scores
                if self.movement is not None
                else self.importance_sum / self.importance_weight
            )
            self.builder = MaskBuilder(scores.float(), self.sizes, self.cfg.mask_scope)
        self.rng.setstate(state["rng"])
        self.rejections = list(state["rejections"])
        self.node_mask_version = {}  # new processes hold no mask: resend the bits
        self.server_opt.load_state_dict(state["server_opt"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.flat = state["ema"].clone()
        if state.get("own_ledger") is not None:
            self.own_ledger = PrivacyLedger.from_dict(state["own_ledger"])
        if self.server_stats is not None and state.get("server_stats") is not None:
            self.server_stats.load_state(state["server_stats"])
        if self.server_importance is not None and state.get("server_importance") is not None:
            imp = state["server_importance"]
            self.server_importance.total = imp["total"].clone()
            self.server_importance.noise_var = imp["noise_var"].clone()
            self.server_importance.steps = int(imp["steps"])

    # ----- evaluate ------------------------------------------------------------------------
    def test_phase(self, releases: int = 1) -> Phase | None:
        """The DP event of ``releases`` noisy federated test releases (None when none are charged)."""
        return test_phase(self.cfg, self.fed, releases)

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        purpose: str = "validation",
    ) -> list[Message]:
        """Ask the silos for metrics of ``arrays``: ``validation`` (model selection,
        ``validation-release`` noisy or exact) or ``test`` (their local test splits,
        ``federated-test`` noisy or exact). A noisy release is charged to each asked silo's
        ledger before it is sent; silos it would take past the target are not asked."""
        if purpose == "test":
            release, phase = self.fed.resolved_federated_test(self.cfg), self.test_phase()
        else:
            release, phase = self.fed.validation_release, self.validation_phase()
        if self.fed.fraction_evaluate <= 0 or release == "none":
            return []
        try:
            nodes = self.sample(grid, self.fed.fraction_evaluate, 1)
        except RoundError:
            return []
        if phase is not None:
            allowed = []
            for n in nodes:
                try:
                    self.ledger.check_round({self.silos[n].name: phase})
                    allowed.append(n)
                except BudgetError as exc:
                    log(
                        WARNING,
                        "round %d: %s not asked for %s: %s",
                        server_round,
                        self.silos[n].name,
                        purpose,
                        exc,
                    )
            nodes = allowed
            for n in nodes:
                self.ledger.record(self.silos[n].name, server_round, phase)
        release = "noisy" if phase is not None else "exact"
        rc = ConfigRecord(
            {
                P.SERVER_ROUND: server_round,
                P.TRAIN_CONFIG: self.train_config_json,
                P.EVAL_PURPOSE: purpose,
                P.VALIDATION_RELEASE: release,
                P.VALIDATION_NOISE: float(self.fed.validation_noise),
                P.TEST_RELEASE: release,
                P.TEST_NOISE: float(self.fed.test_noise),
                P.TEST_LOSS_BOUND: float(self.fed.test_loss_bound),
                P.RUN_KEY: self.run_key,
            }
        )
        return [
            Message(
                RecordDict({P.ARRAYS: arrays, P.CONFIG: rc}),
                dst_node_id=n,
                message_type=MessageType.EVALUATE,
                group_id=f"{server_round}-{purpose}",
            )
            for n in nodes
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message], purpose: str = "validation"
    ) -> MetricRecord | None:
        """Validation: the pooled accuracy (noisy: the sum of the noisy counts over the
        examples). Test: accuracy, loss and the std of the released accuracy's noise."""
        if purpose == "test":
            return self._aggregate_test(server_round, replies)
        total, acc, loss, correct_noisy = 0.0, 0.0, 0.0, 0.0
        for m in self._metrics(server_round, replies):
            if P.VAL_CORRECT_NOISY in m and P.NUM_EXAMPLES in m:
                # noisy release: sum the noisy counts (the mean of noisy ratios would weight noise)
                w, c = float(m[P.NUM_EXAMPLES]), float(m[P.VAL_CORRECT_NOISY])
                if w > 0 and math.isfinite(c):
                    total += w
                    correct_noisy += c
                continue
            if P.VAL_ACCURACY not in m or P.NUM_EXAMPLES not in m:
                continue
            w = float(m[P.NUM_EXAMPLES])
            a, lo = float(m[P.VAL_ACCURACY]), float(m.get(P.VAL_LOSS, 0.0))
            if w <= 0 or not (0.0 <= a <= 1.0) or not math.isfinite(lo):
                continue
            total += w
            acc += w * a
            loss += w * lo
        if total == 0:
            return None
        if self.validation_phase() is not None:  # noisy counts: accuracy only, no loss released
            value = min(max(correct_noisy / total, 0.0), 1.0)
            return MetricRecord({P.VAL_ACCURACY: value, P.VAL_LOSS: math.nan, "num-examples": int(total)})
        return MetricRecord(
            {P.VAL_ACCURACY: acc / total, P.VAL_LOSS: loss / total, "num-examples": int(total)}
        )

    def _metrics(self, server_round: int, replies: Iterable[Message]) -> list[MetricRecord]:
        out = []
        for msg in replies:
            if msg.has_error():
                log(
                    WARNING,
                    "round %d: evaluation reply with an error (source %s): %s",
                    server_round,
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            m = msg.content.metric_records.get(P.METRICS)
            if m is not None:
                out.append(m)
        return out

    def _aggregate_test(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Federated test metrics: noisy, the sums of the silos' noisy counts and clipped loss
        sums over their declared test sizes (the accuracy's noise std: test-noise * sqrt(silos)
        / examples); exact, the example-weighted means."""
        total, correct, loss, silos = 0.0, 0.0, 0.0, 0
        noisy = self.test_phase() is not None
        for m in self._metrics(server_round, replies):
            w = float(m.get(P.NUM_EXAMPLES, 0))
            keys = (P.TEST_CORRECT_NOISY, P.TEST_LOSS_NOISY) if noisy else (P.TEST_ACCURACY, P.TEST_LOSS)
            if w <= 0 or not all(k in m and math.isfinite(float(m[k])) for k in keys):
                continue
            a, lo = float(m[keys[0]]), float(m[keys[1]])
            total += w
            silos += 1
            correct += a if noisy else a * w
            loss += lo * self.fed.test_loss_bound if noisy else lo * w
        if total == 0:
            return None
        std = self.fed.test_noise * math.sqrt(silos) / total if noisy else 0.0
        return MetricRecord(
            {
                P.TEST_ACCURACY: min(max(correct / total, 0.0), 1.0),
                P.TEST_LOSS: max(loss / total, 0.0),
                "accuracy-std": std,
                "num-examples": int(total),
            }
        )
