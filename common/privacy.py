"""The Gaussian mechanism of DP-SGD / AdaDPIGU as named stages.

Implements DESIGN.md §2, Phase 2 steps 1-4 (which reduce to plain DP-SGD, Abadi et al.
2016, when there is no mask, ``center = 0`` and ``scale = 1``):

1. :func:`standardize`   Z = (G - a) / b on the active coordinates, 0 elsewhere
2. :func:`clip_factors`  per-row factor min(1, C / ||Z_i||)  (sensitivity C)
3. :func:`clipped_sum`   sum_i factor_i Z_i  (fused: clipped rows are never stored)
4. :func:`add_noise`     + N(0, (sigma C)^2) on active coordinates only
5. :func:`restore`       g_hat = b * (noisy sum / (q n)) + a, exactly 0 when frozen

The stages work on *segments*: a list of 2-D views ``[B, n_k]`` (one per parameter
tensor) with matching 1-D ``mask``/``center``/``scale`` segments, so the trainer never
concatenates the ``[B, d]`` matrix. :func:`privatize_step` is the documented
single-matrix entry point.

Everything that leaves this module as a gradient estimate is a
:class:`ReleasedGradient`, created only here, after noise. Importance scores and
clipping statistics (``common.masks``, ``common.adaclip``) accept nothing else, so
they cannot be computed from un-noised per-sample gradients (the leak of the published
AdaDPIGU code, DESIGN.md §1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

Segments = Sequence[torch.Tensor]
OptSegments = Sequence[torch.Tensor] | None

_RELEASE_TOKEN = object()


@dataclass(frozen=True, eq=False)
class ReleasedGradient:
    """Output of the Gaussian mechanism: safe to publish, store or aggregate.

    ``values`` is the released estimate ``g_hat`` (flat, ``[d]``, 0 on frozen
    coordinates); ``noise_std`` is the public per-coordinate standard deviation of the
    noise in ``values`` (``[d]``, 0 on frozen coordinates); ``mask`` the active
    coordinates (None = all).
    """

    values: torch.Tensor
    noise_std: torch.Tensor
    mask: torch.Tensor | None
    _token: object = None

    def __post_init__(self) -> None:
        if self._token is not _RELEASE_TOKEN:
            raise TypeError(
                "ReleasedGradient is created only by common.privacy after noise is added; "
                "raw gradients cannot be turned into released ones"
            )


def _segments_of(flat: torch.Tensor | None, sizes: Sequence[int]) -> list[torch.Tensor] | None:
    if flat is None:
        return None
    return list(torch.split(flat, list(sizes)))


def _stage1_weights(
    sizes: Sequence[int],
    mask: OptSegments,
    center: OptSegments,
    scale: OptSegments,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
    """Per segment ``(w, -a * w)`` with ``w = mask / b`` (None: stage 1 is the identity)."""
    if mask is None and center is None and scale is None:
        return None
    out = []
    for k, n in enumerate(sizes):
        w = torch.ones(n, device=device, dtype=dtype) if scale is None else scale[k].reciprocal()
        if mask is not None:
            w = torch.where(mask[k], w, torch.zeros_like(w))
        out.append((w, None if center is None else -(center[k] * w)))
    return out


def _apply_stage1(
    grads: Segments, weights: list[tuple[torch.Tensor, torch.Tensor | None]], *, in_place: bool
) -> list[torch.Tensor]:
    """``Z = G * w - a * w``, one fused pass per segment; ``in_place`` overwrites ``grads``."""
    out = []
    for g, (w, c) in zip(grads, weights):
        if c is None:
            out.append(g.mul_(w) if in_place else g * w)
        else:
            out.append(torch.addcmul(c, g, w, out=g) if in_place else torch.addcmul(c, g, w))
    return out


def standardize(
    grads: Segments, *, mask: OptSegments = None, center: OptSegments = None, scale: OptSegments = None
) -> list[torch.Tensor]:
    """Stage 1: ``Z = (G - a) / b`` on active coordinates, exactly 0 on frozen ones.

    With no mask, center or scale the inputs are returned as they are (no copy).
    One fused pass per segment: ``Z = G * w - a * w`` with ``w = mask / b``.
    """
    if not grads:
        return []
    sizes = [g.shape[-1] for g in grads]
    weights = _stage1_weights(sizes, mask, center, scale, device=grads[0].device, dtype=grads[0].dtype)
    return list(grads) if weights is None else _apply_stage1(grads, weights, in_place=False)


def row_norms(parts: Segments) -> torch.Tensor:
    """L2 norm of each row across all segments: ``[B]``."""
    sq = None
    for p in parts:
        s = torch.linalg.vector_norm(p, dim=1).square() if p.ndim == 2 else p.square()
        sq = s if sq is None else sq + s
    if sq is None:
        raise ValueError("no gradient segments")
    return sq.sqrt()


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Stage 2: per-row factors ``min(1, C / ||row||)`` so every scaled row has norm <= C."""
    return (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)


def clipped_sum(parts: Segments, factors: torch.Tensor) -> list[torch.Tensor]:
    """Stage 3: ``sum_i factor_i * row_i`` per segment (one matrix-vector product each)."""
    return [factors @ p for p in parts]


def add_noise(
    totals: Segments,
    *,
    std: float,
    mask: OptSegments = None,
    generator: torch.Generator | None,
) -> list[torch.Tensor]:
    """Stage 4: add N(0, std^2) to active coordinates; frozen coordinates get none.

    ``generator`` is the only source of randomness (Opacus' convention): the same
    seed gives the same noise.
    """
    out = []
    for k, t in enumerate(totals):
        if std == 0.0:
            noisy = t.clone()
        else:
            noise = torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
            noisy = t + std * noise
        if mask is not None:
            noisy = torch.where(mask[k], noisy, torch.zeros_like(noisy))
        out.append(noisy)
    return out


def restore(
    noisy: Segments,
    *,
    expected_batch_size: float,
    mask: OptSegments = None,
    center: OptSegments = None,
    scale: OptSegments = None,
) -> list[torch.Tensor]:
    """Stage 5: ``g_hat = b * (noisy / (q n)) + a``; exactly 0 on frozen coordinates."""
    out = []
    for k, t in enumerate(noisy):
        w = t / expected_batch_size
        if scale is not None:
            w = w * scale[k]
        if center is not None:
            w = w + center[k]
        if mask is not None:
            w = torch.where(mask[k], w, torch.zeros_like(w))
        out.append(w)
    return out


def noise_std_of_release(
    *,
    sizes: Sequence[int],
    noise_multiplier: float,
    clip_norm: float,
    expected_batch_size: float,
    mask: torch.Tensor | None,
    scale: torch.Tensor | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Public std of the noise in each coordinate of ``g_hat``: ``b_j sigma C / (q n)``."""
    d = int(sum(sizes))
    std = torch.full((d,), noise_multiplier * clip_norm / expected_batch_size, device=device)
    if scale is not None:
        std = std * scale
    if mask is not None:
        std = torch.where(mask, std, torch.zeros_like(std))
    return std


class SegmentAccumulator:
    """Accumulates standardized, clipped per-sample rows over physical chunks.

    Memory-bounded ("virtual steps"): a Poisson batch is processed in chunks, each
    contributing ``sum_i clip(Z_i)``; noise is added once per logical step by
    :meth:`release`.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        clip_norm: float,
        mask: torch.Tensor | None = None,
        center: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.sizes = list(sizes)
        self.clip_norm = float(clip_norm)
        self.mask_flat, self.center_flat, self.scale_flat = mask, center, scale
        self.mask = _segments_of(mask, self.sizes)
        self.center = _segments_of(center, self.sizes)
        self.scale = _segments_of(scale, self.sizes)
        self.totals = [torch.zeros(n, device=device) for n in self.sizes]
        self.count = 0
        self.clipped = 0
        # stage 1's per-coordinate weights, computed once per logical step
        self._weights = _stage1_weights(self.sizes, self.mask, self.center, self.scale, device=device)

    def stage1_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
        """Per segment ``(w, k)`` of stage 1, ``Z = G ⊙ w + k`` (``w = mask / scale``, ``k = -center
        ⊙ w``; None: the identity): what a clipper that never forms ``G`` needs (common.ghost)."""
        return self._weights

    def _standardize(self, grads: Segments, consume: bool) -> list[torch.Tensor]:
        if self._weights is None:
            return list(grads)
        return _apply_stage1(grads, self._weights, in_place=consume)

    def add(self, grads: Segments, *, consume: bool = False) -> None:
        """Add a chunk of per-sample gradients, one ``[b, n_k]`` view per segment.

        ``consume=True`` lets stage 1 overwrite ``grads`` in place (no ``[b, d]`` copy);
        the engine passes it for the scratch buffers of its per-sample sampler.
        """
        if not grads or grads[0].shape[0] == 0:
            return
        z = self._standardize(grads, consume)
        norms = row_norms(z)
        factors = clip_factors(norms, self.clip_norm)
        for k, part in enumerate(clipped_sum(z, factors)):
            self.totals[k] += part
        self.count += int(norms.shape[0])
        self.clipped += int((norms > self.clip_norm).sum())

    def release(
        self, *, noise_multiplier: float, expected_batch_size: float, generator: torch.Generator | None
    ) -> ReleasedGradient:
        """Add noise once for the whole logical batch and restore: the released ``g_hat``."""
        if expected_batch_size <= 0:
            raise ValueError("expected_batch_size must be > 0")
        noisy = add_noise(
            self.totals, std=noise_multiplier * self.clip_norm, mask=self.mask, generator=generator
        )
        restored = restore(
            noisy,
            expected_batch_size=expected_batch_size,
            mask=self.mask,
            center=self.center,
            scale=self.scale,
        )
        values = torch.cat(restored) if len(restored) > 1 else restored[0]
        std = noise_std_of_release(
            sizes=self.sizes,
            noise_multiplier=noise_multiplier,
            clip_norm=self.clip_norm,
            expected_batch_size=expected_batch_size,
            mask=self.mask_flat,
            scale=self.scale_flat,
            device=values.device,
        )
        return ReleasedGradient(values, std, self.mask_flat, _RELEASE_TOKEN)


def privatize_step(
    grads: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    center: torch.Tensor | None,
    scale: torch.Tensor | None,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator | None,
    consume: bool = False,
) -> torch.Tensor:
    """One DP release of a batch of per-sample gradients ``grads`` (``[B, d]``).

    Rows are standardized on the active coordinates (``(g - center) / scale``), each
    clipped to L2 norm <= ``clip_norm``, summed; Gaussian noise of std
    ``noise_multiplier * clip_norm`` is added on active coordinates only; the sum is
    divided by ``expected_batch_size`` (q n, not the realised batch size: Poisson
    sampling) and restored (``scale * w + center``). Inactive coordinates are exactly 0.

    ``mask``: bool ``[d]`` or None (all active); ``center``/``scale``: ``[d]`` or None
    (0 and 1). ``consume=True`` lets the standardization overwrite ``grads`` in place (no
    ``[B, d]`` copy; the engine's path). Returns the released gradient estimate ``[d]``.

    >>> g = torch.ones(4, 3)
    >>> out = privatize_step(g, mask=None, center=None, scale=None, clip_norm=10.0,
    ...                      noise_multiplier=0.0, expected_batch_size=4, generator=None)
    >>> out.tolist()
    [1.0, 1.0, 1.0]
    """
    if grads.ndim != 2:
        raise ValueError(f"grads must be [B, d], got shape {tuple(grads.shape)}")
    d = grads.shape[1]
    acc = SegmentAccumulator(
        [d], clip_norm=clip_norm, mask=mask, center=center, scale=scale, device=grads.device
    )
    acc.add([grads], consume=consume)
    released = acc.release(
        noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, generator=generator
    )
    return released.values


def release_nonprivate(values: torch.Tensor) -> ReleasedGradient:
    """Wrap a non-private gradient (method ``nonprivate``) so the same code path runs.

    Only for the ``nonprivate`` baseline, which promises no privacy at all.
    """
    return ReleasedGradient(values, torch.zeros_like(values), None, _RELEASE_TOKEN)


class LatticeAccumulator(SegmentAccumulator):
    """Stages 1-3 for distributed noise (``dp-noise = "distributed"``, common.distributed):
    each standardized row, clipped to ``clip_norm``, is scaled by ``gamma`` onto the integer
    lattice *on the active coordinates* and rounded with conditional randomized rounding
    (squared norm <= ``bound_sq``, the sum's sensitivity), then summed in integers. No noise
    is added here: each silo adds its discrete Gaussian share to :attr:`int_totals`."""

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        clip_norm: float,
        gamma: float,
        bound_sq: int,
        rng,
        mask: torch.Tensor | None = None,
        center: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(sizes, clip_norm=clip_norm, mask=mask, center=center, scale=scale, device=device)
        self.gamma, self.bound_sq, self.rng = float(gamma), int(bound_sq), rng
        k = int(sum(sizes)) if mask is None else int(mask.sum())
        self.int_totals = np.zeros(k, dtype=np.int64)

    def add(self, grads: Segments, *, consume: bool = False) -> None:
        from common.distributed import CHECK_MARGIN, round_rows

        if not grads or grads[0].shape[0] == 0:
            return
        z = self._standardize(grads, consume)
        norms = row_norms(z)
        # rows at c (1 - 2 margin): within the float32 norm check's margin after rounding
        shrink = 1.0 - 2 * CHECK_MARGIN
        factors = (self.clip_norm / norms.double().clamp_min(1e-300)).clamp(max=1.0) * (self.gamma * shrink)
        parts = z if self.mask is None else [p[:, m] for p, m in zip(z, self.mask)]
        rows = torch.cat([p.float() for p in parts], dim=1).cpu()
        rows.mul_(factors.float().cpu()[:, None])
        ints = round_rows(rows, self.bound_sq, self.rng)
        self.int_totals += ints.sum(0, dtype=torch.float64).numpy().astype(np.int64)  # exact below 2^53
        self.count += int(norms.shape[0])
        self.clipped += int((norms > self.clip_norm).sum())

    def release(self, **_: object) -> ReleasedGradient:
        raise TypeError("a lattice sum is released only through secure aggregation (common.distributed)")


def release_secure_sum(
    noisy_sum: torch.Tensor,
    *,
    noise_std: float,
    expected_batch_size: float,
    sizes: Sequence[int],
    mask: torch.Tensor | None,
    center: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> ReleasedGradient:
    """The gradient estimate from a securely aggregated, distributed-noise sum (server side).

    ``noisy_sum``: the decoded sum on the active coordinates (standardized, clip units),
    which carries every surviving silo's discrete Gaussian share (std ``noise_std`` per
    coordinate, public); restored like a local release (stage 5)."""
    d = int(sum(sizes))
    dense = torch.zeros(d, dtype=torch.float32)
    if mask is None:
        dense.copy_(noisy_sum.float())
    else:
        dense[mask.cpu()] = noisy_sum.float()
    restored = restore(
        [dense],
        expected_batch_size=expected_batch_size,
        mask=None if mask is None else [mask.cpu()],
        center=None if center is None else [center.cpu()],
        scale=None if scale is None else [scale.cpu()],
    )[0]
    std = noise_std_of_release(
        sizes=sizes,
        noise_multiplier=float(noise_std),
        clip_norm=1.0,
        expected_batch_size=expected_batch_size,
        mask=None if mask is None else mask.cpu(),
        scale=None if scale is None else scale.cpu(),
    )
    return ReleasedGradient(restored, std, None if mask is None else mask.cpu(), _RELEASE_TOKEN)
