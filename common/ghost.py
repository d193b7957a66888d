"""Per-sample clipping without per-sample gradients ("ghost clipping": Goodfellow 2015;
Li et al. 2022, §4; Bu et al. 2023, book-keeping), for the masked, standardized rows of
AdaDPIGU and AdaCliP as well as for flat DP-SGD.

For a ``Linear`` layer the per-example weight gradient is an outer product ``G_i = g_i a_iᵀ``
(``g_i``: the gradient of example i's loss at the layer's output, ``a_i``: its input), so
nothing of size ``B x d`` is needed:

- flat clipping: ``||G_i||² = ||g_i||² ||a_i||²`` (non-negative factors: no cancellation);
- the stage-1 transform of common.privacy, ``Z_i = G_i ⊙ W + K`` (``W = mask / scale``,
  ``K = -center ⊙ W``), is diagonal in the parameters, so the norm factors through two
  products: ``||Z_i||² = (g_i²)ᵀ W² (a_i²) + 2 g_iᵀ (W ⊙ K) a_i + ||K||²`` (one ``B x out x in``
  matrix product each, where materialising would write ``B x out x in`` numbers);
- the clipped sum is one matrix product: ``Σ_i f_i Z_i = (Σ_i f_i g_i a_iᵀ) ⊙ W + (Σ_i f_i) K``.

For a ``Conv2d`` the per-example gradient is ``G_i = g_i U_iᵀ`` with ``U_i`` the unfolded
input (``C_in k² x P`` positions), so the flat norm is ``||G_i||² = <g_iᵀ g_i, U_iᵀ U_i>``,
``O(P²(C_out + C_in k²))`` instead of ``O(P C_out C_in k²)``: cheaper when ``2 P² < C_out C_in
k²`` (Li et al.'s rule), which this module checks per layer; a ``Linear`` on ``[B, T, in]``
inputs likewise with ``T`` positions. The clipped sum is the layer's ordinary weight
gradient with each example's output gradient scaled by its clip factor.

Sums whose terms may cancel (the center's cross term, a Gram matrix's off-diagonal) are taken
in float64, so that the norm that decides each row's clipping is not smaller than the row's by
rounding. Where the algebra does not hold, the rows are materialised (the native sampler's per-layer
rules, common.per_sample) and clipped as before: a non-uniform ``W`` or a center ``K`` on a
``Conv2d`` or a multi-position ``Linear`` (a sum over positions inside ``G_i`` does not
commute with a per-coordinate weight), ``GroupNorm`` parameters (small), and every bias
(``B x out``). Everything is tested against the materialised per-sample gradients
(tests/common/test_ghost.py).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from common.per_sample import (
    BACKENDS,
    FuncGradSampler,
    GradSampler,
    HookGradSampler,
    LossFn,
    NativeGradSampler,
    UnsupportedLayer,
)

# the sampler (its hooks) of each model the functional API has seen, built once per model
_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class GhostClipper(NativeGradSampler):
    """Adds a chunk's clipped, standardized per-sample rows to a
    :class:`~common.privacy.SegmentAccumulator` without forming them where it is cheaper not
    to. Same forward hooks and one backward pass (to the layer outputs) as the native sampler."""

    def accumulate(self, acc, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Clip and sum the chunk ``inputs`` into ``acc`` (its stage-1 weights, clip norm,
        totals and counts); the chunk's mean loss."""
        b = inputs.shape[0]
        order, backprops, mean_loss = self._forward_backward(loss_fn, inputs, targets)
        weights = acc.stage1_weights()
        seg = {id(p): k for k, p in enumerate(self.params)}
        sq = torch.zeros(b, device=inputs.device, dtype=inputs.dtype)
        plans = []
        for module in order:
            a, g = self._inputs[module], backprops[module]
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                k = seg[id(p)]
                w, c = (None, None) if weights is None else weights[k]
                plan = self._plan(module, name, a, g, w, c)
                sq += plan.norm_sq()
                plans.append((k, plan))
        norms = sq.clamp_min(0).sqrt()
        factors = (acc.clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        for k, plan in plans:
            acc.totals[k] += plan.clipped_sum(factors)
        acc.count += b
        acc.clipped += int((norms > acc.clip_norm).sum())
        self._inputs.clear()
        self._outputs.clear()
        return mean_loss

    def _plan(self, module: nn.Module, name: str, a, g, w, c) -> _Plan:
        if name == "bias" and isinstance(module, nn.Linear | nn.Conv2d):
            rows = (
                g.sum((2, 3))
                if isinstance(module, nn.Conv2d)
                else g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
            )
            return _Rows(rows, w, c, own=False)
        if name == "weight" and isinstance(module, nn.Linear):
            if a.ndim == 2:
                return _LinearGhost(a, g, w, c, module.weight.shape)
            t = a.numel() // (a.shape[0] * a.shape[-1])
            if w is None and 2 * t * t < module.in_features * module.out_features:
                b = a.shape[0]
                return _PositionsGhost(
                    a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1]), _linear_sum(a, g)
                )
        if name == "weight" and isinstance(module, nn.Conv2d) and w is None:
            positions = g.shape[2] * g.shape[3]
            patch = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            if 2 * positions * positions < module.out_channels * patch:
                return _ConvGhost(module, a, g)
        # materialised: the native sampler's rule for this layer (its scratch rows, ours to overwrite)
        rows = self._layer_grads(module, a, g)[name].reshape(a.shape[0], -1)
        return _Rows(rows, w, c, own=not isinstance(module, nn.GroupNorm) or name != "bias")


class _Plan:
    def norm_sq(self) -> torch.Tensor:  # [B]: the squared norm of each example's row here
        raise NotImplementedError

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:  # [n]: sum_i f_i z_i
        raise NotImplementedError


class _Rows(_Plan):
    """Materialised rows, standardized (in place where they are scratch space of ours: ``own``)."""

    def __init__(self, rows: torch.Tensor, w, c, *, own: bool) -> None:
        if w is not None:
            if own:
                rows = torch.addcmul(c, rows, w, out=rows) if c is not None else rows.mul_(w)
            else:
                rows = torch.addcmul(c, rows, w) if c is not None else rows * w
        self.rows = rows

    def norm_sq(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.rows, dim=1).square()

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        return factors @ self.rows


class _LinearGhost(_Plan):
    """``Linear`` on ``[B, in]``: the outer-product rows, never formed."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor, w, c, shape) -> None:
        self.a, self.g, self.shape = a, g, shape
        self.w = None if w is None else w.view(shape)
        self.c = None if c is None else c.view(shape)

    def norm_sq(self) -> torch.Tensor:
        a, g = self.a, self.g
        if self.w is None:  # flat: ||g||^2 ||a||^2 (a norm reduction: no [B, in] temporary)
            return torch.linalg.vector_norm(g, dim=1).square() * torch.linalg.vector_norm(a, dim=1).square()
        # (g^2)^T W^2 (a^2), plus the center's cross term and constant; each product is taken
        # through the wider side so that its output is [B, narrower side] (one pass over the wide)
        if self.c is not None:
            # the center's terms may cancel (a row close to the center): float64, so that the
            # norm that decides the clipping is not smaller than the row's by rounding
            a, g = a.double(), g.double()
        w2 = self.w.square().to(a.dtype)
        w, c = self.w.to(a.dtype), None if self.c is None else self.c.to(a.dtype)
        if a.shape[1] >= g.shape[1]:
            sq = ((a.square() @ w2.t()) * g.square()).sum(1)
            if c is not None:
                sq = sq + 2.0 * ((a @ (w * c).t()) * g).sum(1)
        else:
            sq = ((g.square() @ w2) * a.square()).sum(1)
            if c is not None:
                sq = sq + 2.0 * ((g @ (w * c)) * a).sum(1)
        if c is not None:
            sq = sq + c.square().sum()
        return sq.to(self.a.dtype)

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        s = (self.g * factors[:, None]).t() @ self.a  # sum_i f_i g_i a_i^T
        if self.w is not None:
            s = s * self.w
            if self.c is not None:
                s = s + factors.sum() * self.c
        return s.reshape(-1)


def _linear_sum(a: torch.Tensor, g: torch.Tensor):
    def weighted(factors: torch.Tensor) -> torch.Tensor:
        a3, g3 = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
        return torch.einsum("b,bto,bti->oi", factors, g3, a3).reshape(-1)

    return weighted


class _PositionsGhost(_Plan):
    """A weight gradient summed over positions, ``G_i = Σ_p g_ip u_ipᵀ`` (``g``: ``[B, P,
    out]``, ``u``: ``[B, P, in]``): flat norm ``<g gᵀ, u uᵀ>`` from two ``P x P`` Gram matrices."""

    def __init__(self, u: torch.Tensor, g: torch.Tensor, weighted_sum) -> None:
        self.u, self.g, self.weighted_sum = u, g, weighted_sum

    def norm_sq(self) -> torch.Tensor:
        # the cross-position terms may cancel: float64 (P x P matrices, cheap where this route is taken)
        g, u = self.g.double(), self.u.double()
        return (
            (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(u, u.transpose(1, 2))).sum((1, 2)).to(self.g.dtype)
        )

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        return self.weighted_sum(factors)


class _ConvGhost(_PositionsGhost):
    """``Conv2d`` weights: the unfolded input as positions; the clipped sum is one product of
    the factor-scaled output gradients and the unfolded input (the layer's weight gradient)."""

    def __init__(self, module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> None:
        b = a.shape[0]
        cols = F.unfold(
            a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )
        super().__init__(cols.transpose(1, 2), g.reshape(b, g.shape[1], -1).transpose(1, 2), None)

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        # sum_i f_i g_i U_i^T: one product over (example, position) of the unfolded input
        b, positions, c_out = self.g.shape
        gf = (self.g * factors[:, None, None]).reshape(b * positions, c_out)
        return (gf.t() @ self.u.reshape(b * positions, -1)).reshape(-1)


def private_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator | None,
    mask: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    max_physical_batch: int = 1024,
    backend: str = "auto",
) -> torch.Tensor:
    """One DP release of the batch ``(inputs, targets)`` from the model itself: the engine's
    path (ghost clipping where the model allows, :func:`make_grad_sampler`),
    without the ``[B, d]`` matrix of :func:`~common.privacy.privatize_step`. Rows standardized
    on the active coordinates, clipped to ``clip_norm``, summed in chunks of
    ``max_physical_batch``, Gaussian noise of std ``noise_multiplier * clip_norm`` added once,
    divided by ``expected_batch_size`` and restored. Returns the released gradient ``[d]``
    (``model.parameters()`` order); the same as ``privatize_step`` on ``per_sample_grad_matrix``.

    >>> _ = torch.manual_seed(0); m = nn.Linear(3, 2); x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    >>> g = private_gradient(m, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y, clip_norm=1.0,
    ...                      noise_multiplier=0.0, expected_batch_size=4, generator=None)
    >>> g.shape
    torch.Size([8])
    """
    from common.privacy import SegmentAccumulator

    sampler = _SAMPLERS.get(model) if backend == "auto" else None
    if sampler is None:
        sampler = make_grad_sampler(model, backend)
        if backend == "auto":
            _SAMPLERS[model] = sampler
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    acc = SegmentAccumulator(
        sizes, clip_norm=clip_norm, mask=mask, center=center, scale=scale, device=inputs.device
    )
    for start in range(0, inputs.shape[0], max_physical_batch):
        x, y = inputs[start : start + max_physical_batch], targets[start : start + max_physical_batch]
        if isinstance(sampler, GhostClipper):
            sampler.accumulate(acc, loss_fn, x, y)
        else:
            acc.add(sampler(loss_fn, x, y)[0], consume=True)
    return acc.release(
        noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, generator=generator
    ).values


def make_grad_sampler(model: nn.Module, backend: str) -> GradSampler:
    """``auto``: ghost clipping (common.ghost: per-sample norms and the clipped sum without
    per-sample gradients where that is cheaper, the native rows elsewhere) when every trainable
    layer has a native rule, else Opacus' hooks. ``ghost`` requires it; ``native`` always
    materialises the rows. A :class:`~common.ghost.GhostClipper` is also a native sampler:
    called, it returns the rows (augmentation multiplicity, distributed noise use them)."""
    if backend in ("auto", "ghost"):
        try:
            return GhostClipper(model)
        except UnsupportedLayer:
            if backend == "ghost":
                raise
            return HookGradSampler(model)
    if backend == "native":
        return NativeGradSampler(model)
    if backend == "hooks":
        return HookGradSampler(model)
    if backend == "functorch":
        return FuncGradSampler(model)
    raise ValueError(f"unknown per-sample backend '{backend}' ({', '.join(BACKENDS)})")
