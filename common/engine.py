"""The local DP training step shared by all five methods (DESIGN.md §2).

``DPEngine.step`` runs one Poisson-sampled step in one of three modes:

- ``nonprivate``: the ordinary mean gradient (baseline; no privacy).
- ``flat``: DP-SGD (Abadi et al. 2016): flat L2 clip ``clip_norm``, noise
  ``sigma * clip_norm``. Used by ``dpsgd`` throughout and by every other private method
  for its pre-training phase, which also feeds the importance scores and the AdaCliP
  statistics (from released gradients only).
- ``adaptive``: AdaDPIGU Phase 2: standardize with the AdaCliP statistics on the active
  coordinates, clip to ``clip_norm``, noise, restore; frozen coordinates get
  neither noise nor update.

The federated client and the centralized trainer both drive this class.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.adaclip import AdaClipStatistics
from common.augment import augment, augmentation_of, mean_over_copies
from common.config import TrainConfig
from common.data import TensorData
from common.ghost import GhostClipper, make_grad_sampler
from common.masks import ImportanceAccumulator
from common.privacy import LatticeAccumulator, ReleasedGradient, SegmentAccumulator, release_nonprivate
from common.schema import schema_of

MODES = ("nonprivate", "flat", "adaptive")


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for (seed, *keys); fresh OS entropy (``secrets``) when seed < 0."""
    if seed < 0:
        return secrets.randbits(63)
    import hashlib

    blob = repr((seed, *keys)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def make_generator(seed: int, *keys: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator per (seed, client, round, purpose); OS-seeded unless ``seed >= 0``.

    Note: torch generators are Mersenne Twister / Philox, not a CSPRNG.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from common.errors import ConfigError

        raise ConfigError("device", name, "CUDA is not available on this machine")
    return torch.device(name)


def poisson_sample(
    n: int, q: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Indices of a Poisson batch: each of ``n`` examples joins with probability ``q``."""
    return torch.nonzero(torch.rand(n, generator=generator, device=device) < q).flatten()


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, *, batch_size: int = 2048) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    if len(data) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data.x[i : i + batch_size].to(device)
        y = data.y[i : i + batch_size].to(device)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    return loss_sum / len(data), correct / len(data)


def step_mode(cfg: TrainConfig, *, pretraining: bool) -> str:
    """The engine mode of a step: the one place where method x phase becomes a mode."""
    if not cfg.private:
        return "nonprivate"
    if pretraining or cfg.method == "dpsgd":
        return "flat"
    return "adaptive"


# the optimizer's per-parameter state tensors that travel between rounds (SGD, Adam)
_OPTIMIZER_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


@dataclass
class StepResult:
    loss: float
    batch_size: int
    clipped: int


class DPEngine:
    """Holds the model, optimizer, importance and statistics of one data holder."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        n_train: int,
        device: torch.device,
        noise_generator: torch.Generator,
        sampling_generator: torch.Generator,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.d = sum(self.sizes)
        self.n_train = n_train
        self.q = cfg.resolved_sample_rate(n_train)
        self.expected_batch_size = self.q * n_train
        self.noise_generator = noise_generator
        self.sampling_generator = sampling_generator
        self.sampler = make_grad_sampler(self.model, cfg.per_sample_backend) if cfg.private else None
        self.ghost = isinstance(self.sampler, GhostClipper)
        self.importance = (
            ImportanceAccumulator(self.d, cfg.importance, device=device) if cfg.uses_mask else None
        )
        self.stats = (
            AdaClipStatistics(
                self.d,
                beta1=cfg.beta1,
                beta2=cfg.beta2,
                h1=cfg.h1,
                h2=cfg.h2,
                scale_rule=cfg.scale_rule,
                device=device,
            )
            if cfg.uses_adaptive_clip
            else None
        )
        self.mask: torch.Tensor | None = None
        self.optimizer = self._make_optimizer()
        self.augmentation = augmentation_of(schema_of(cfg.dataset, cfg.schema)) if cfg.augmult else None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "adam":
            return torch.optim.Adam(self.params, lr=self.cfg.lr)
        return torch.optim.SGD(self.params, lr=self.cfg.lr, momentum=self.cfg.momentum)

    def reset_optimizer(self) -> None:
        self.optimizer = self._make_optimizer()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The optimizer's state as flat ``[d]`` tensors (and Adam's step count): post-processing
        of released gradients only, so a client may keep it between rounds."""
        out: dict[str, torch.Tensor] = {}
        states = [self.optimizer.state.get(p, {}) for p in self.params]
        for key in _OPTIMIZER_STATE_KEYS:
            if any(torch.is_tensor(st.get(key)) for st in states):
                out[key] = torch.cat(
                    [
                        st[key].detach().reshape(-1).float().cpu()
                        if torch.is_tensor(st.get(key))
                        else torch.zeros(p.numel())
                        for p, st in zip(self.params, states)
                    ]
                )
        steps = [float(st["step"]) for st in states if "step" in st]
        if steps:
            out["step"] = torch.tensor([max(steps)])
        return out

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`optimizer_state` (onto a fresh optimizer)."""
        for key, flat in state.items():
            if key == "step":
                continue
            if key not in _OPTIMIZER_STATE_KEYS or flat.numel() != self.d:
                raise ValueError(f"optimizer state '{key}' with {flat.numel()} values does not fit {self.d}")
            for p, chunk in zip(self.params, torch.split(flat, self.sizes)):
                self.optimizer.state[p][key] = chunk.view_as(p).to(device=p.device, dtype=p.dtype).clone()
        if "step" in state:
            for p in self.params:
                self.optimizer.state[p]["step"] = torch.tensor(float(state["step"][0]))

    def begin_round(
        self,
        *,
        n_train: int,
        q: float,
        noise_generator: torch.Generator,
        sampling_generator: torch.Generator,
        mask: torch.Tensor | None = None,
        stats_state: dict[str, torch.Tensor] | None = None,
        optimizer_state: dict[str, torch.Tensor] | None = None,
        lr: float | None = None,
    ) -> None:
        """Set the engine up for one data holder's round (the federated client's entry point).

        Everything of a previous holder is replaced: sampling rate, generators, optimizer
        (fresh, or ``optimizer_state``), mask (frozen coordinates' optimizer state cleared),
        AdaCliP statistics (``stats_state`` or fresh) and the importance sums (zeroed).
        """
        if not (0.0 < q <= 1.0):
            raise ValueError(f"sample rate {q} is outside (0, 1]")
        self.n_train = n_train
        self.q, self.expected_batch_size = q, q * n_train
        self.noise_generator, self.sampling_generator = noise_generator, sampling_generator
        self.reset_optimizer()
        if optimizer_state:
            self.load_optimizer_state(optimizer_state)
        if lr is not None:
            self.set_lr(lr)
        self.mask = None
        self.set_mask(mask)
        if self.stats is not None:
            if stats_state is None:
                self.stats.reset()
            else:
                self.stats.load_state(stats_state)
        if self.importance is not None:
            self.importance.reset()

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Activate ``mask`` and clear optimizer state of frozen coordinates, so that a
        frozen coordinate (zero released gradient) does not move through momentum."""
        self.mask = None if mask is None else mask.to(self.device)
        if self.mask is None:
            return
        for p, m in zip(self.params, torch.split(self.mask, self.sizes)):
            for value in self.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.mul_(m.view_as(p))

    @property
    def active_ratio(self) -> float:
        return 1.0 if self.mask is None else float(self.mask.float().mean())

    # ----- one step -------------------------------------------------------------
    def sample_batch(self, data: TensorData) -> torch.Tensor:
        return poisson_sample(len(data), self.q, self.sampling_generator, device=data.x.device)

    def step(
        self, data: TensorData, *, mode: str, noise_multiplier: float = 0.0, update_importance: bool = False
    ) -> StepResult:
        """Sample a Poisson batch from ``data`` and take one step in ``mode``."""
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' ({', '.join(MODES)})")
        idx = self.sample_batch(data)
        if mode == "nonprivate":
            released, loss = self._nonprivate_gradient(data, idx)
            clipped = 0
        else:
            released, loss, clipped = self._private_release(data, idx, mode, noise_multiplier)
            if update_importance and self.importance is not None:
                self.importance.update_from_released(released)
            if self.stats is not None:
                self.stats.update_from_released(released)
        self._apply(released)
        return StepResult(loss=loss, batch_size=int(idx.numel()), clipped=clipped)

    def _nonprivate_gradient(self, data: TensorData, idx: torch.Tensor) -> tuple[ReleasedGradient, float]:
        grads = [torch.zeros(n, device=self.device) for n in self.sizes]
        loss_sum = 0.0
        b = int(idx.numel())
        k = self.cfg.augmult
        per_chunk = max(1, self.cfg.max_physical_batch // max(k, 1))
        for start in range(0, b, per_chunk):
            chunk = idx[start : start + per_chunk]
            x, y = data.x[chunk].to(self.device), data.y[chunk].to(self.device)
            if k:  # the same augmented objective as the private modes
                x, y = augment(x, k, self.augmentation, self.sampling_generator), y.repeat_interleave(k)
            self.optimizer.zero_grad(set_to_none=True)
            loss = per_example_loss(self.model(x), y).sum() / (b * max(k, 1))
            loss.backward()
            loss_sum += float(loss.detach()) * b
            for j, p in enumerate(self.params):
                if p.grad is not None:
                    grads[j] += p.grad.reshape(-1)
        self.optimizer.zero_grad(set_to_none=True)
        return release_nonprivate(torch.cat(grads)), loss_sum / max(b, 1)

    def _private_release(
        self, data: TensorData, idx: torch.Tensor, mode: str, noise_multiplier: float
    ) -> tuple[ReleasedGradient, float, int]:
        cfg = self.cfg
        if mode == "adaptive":
            if self.stats is None:
                raise RuntimeError(f"method {cfg.method} has no adaptive clipping statistics")
            acc = SegmentAccumulator(
                self.sizes,
                clip_norm=cfg.clip_norm,
                mask=self.mask,
                center=self.stats.center(),
                scale=self.stats.scale(self.mask, 1.0),
                device=self.device,
            )
        else:
            acc = SegmentAccumulator(self.sizes, clip_norm=cfg.clip_norm, mask=self.mask, device=self.device)
        loss_sum = self._accumulate(acc, data, idx)
        released = acc.release(
            noise_multiplier=noise_multiplier,
            expected_batch_size=self.expected_batch_size,
            generator=self.noise_generator,
        )
        return released, loss_sum / max(int(idx.numel()), 1), acc.clipped

    def _accumulate(self, acc: SegmentAccumulator, data: TensorData, idx: torch.Tensor) -> float:
        """Per-sample gradients of the batch ``idx`` into ``acc``, in physical chunks; the loss sum."""
        cfg = self.cfg
        loss_sum = 0.0
        assert self.sampler is not None
        k = cfg.augmult
        per_chunk = max(1, cfg.max_physical_batch // max(k, 1))
        for start in range(0, int(idx.numel()), per_chunk):
            chunk = idx[start : start + per_chunk]
            x, y = data.x[chunk].to(self.device), data.y[chunk].to(self.device)
            if k:
                # K augmented copies per example; their mean gradient is the example's row
                x, y = augment(x, k, self.augmentation, self.sampling_generator), y.repeat_interleave(k)
                grads, mean_loss = self.sampler(per_example_loss, x, y)
                acc.add(mean_over_copies(grads, k), consume=True)
            elif self.ghost and type(acc) is SegmentAccumulator:
                # norms and the clipped sum without per-sample gradients where cheaper (common.ghost)
                mean_loss = self.sampler.accumulate(acc, per_example_loss, x, y)
            else:
                grads, mean_loss = self.sampler(per_example_loss, x, y)
                acc.add(grads, consume=True)  # the sampler's scratch rows: standardized in place
            loss_sum += mean_loss * int(chunk.numel())
        return loss_sum

    def lattice_sum(
        self,
        data: TensorData,
        *,
        gamma: float,
        bound_sq: int,
        rng,
        center: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, StepResult]:
        """One Poisson batch's clipped per-sample rows on the integer lattice, summed on the
        active coordinates (``dp-noise = "distributed"``; common.distributed). Standardized
        by the *server's* ``center``/``scale`` (post-processing of aggregated releases), never
        by statistics of this silo's own share. No noise, no step: the caller adds its share
        and the server steps after secure aggregation."""
        if self.sampler is None:
            raise RuntimeError("distributed noise needs a private method")
        idx = self.sample_batch(data)
        acc = LatticeAccumulator(
            self.sizes,
            clip_norm=self.cfg.clip_norm,
            gamma=gamma,
            bound_sq=bound_sq,
            rng=rng,
            mask=self.mask,
            center=center,
            scale=scale,
            device=self.device,
        )
        loss_sum = self._accumulate(acc, data, idx)
        n = int(idx.numel())
        return acc.int_totals, StepResult(loss=loss_sum / max(n, 1), batch_size=n, clipped=acc.clipped)

    @torch.no_grad()
    def _apply(self, released: ReleasedGradient) -> None:
        for p, g in zip(self.params, torch.split(released.values, self.sizes)):
            p.grad = g.view_as(p).to(p.dtype)
        self.optimizer.step()
        for p in self.params:
            p.grad = None
