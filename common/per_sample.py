"""Per-sample gradients: a torch.func reference and a fast hook-based sampler.

- :func:`per_sample_grads` is the public function: the native sampler below where the
  model allows (the engine's speed), else ``torch.func`` (``functional_call`` +
  ``vmap(grad(...))``), which works for any differentiable model.
- :class:`NativeGradSampler` (backend ``native``, the default through ``auto`` for
  models made of ``Linear``, ``Conv2d`` and ``GroupNorm``): forward hooks keep each
  layer's input and output; one ``torch.autograd.grad`` call asks for the gradients of
  the layer *outputs* only, so autograd never computes the ordinary batch weight
  gradients (``p.grad``) that a hook-based sampler would throw away; per-example weight
  gradients are then formed per layer (outer products into reused buffers for
  ``Linear``, a batch-grouped weight-gradient convolution for ``Conv2d``).
- :class:`HookGradSampler` (backend ``hooks``) wraps the model once in Opacus'
  ``GradSampleModule`` (per-layer hooks, Yousefpour et al. 2021): any layer Opacus
  supports; the fallback of ``auto``.

All return per-example gradients of the per-example loss (not of the batch mean).
Timings: ``benchmarks/bench_step.py`` and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_example_loss(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss = loss_fn(outputs, targets)
    if loss.ndim == 0:  # a batch of one (vmap): mean == sum
        return loss
    return loss.sum()


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Gradients of each example's loss: ``{name: [B, *param.shape]}``.

    ``loss_fn(outputs, targets)`` returns per-example losses ``[B]`` (e.g.
    ``F.cross_entropy(..., reduction="none")``) or their mean.

    ``backend``: ``auto`` (default) takes the engine's fast path, :class:`NativeGradSampler`,
    when every trainable layer is a ``Linear``, ``Conv2d`` or ``GroupNorm`` (it keeps passive
    forward hooks on those layers, which record nothing outside this call), else
    ``torch.func``; ``native`` or ``functorch`` force one. The returned tensors are the
    caller's own (copied out of the sampler's scratch space).
    """
    sampler = _public_sampler(model, backend)
    if sampler is None:
        return _functorch_grads(model, loss_fn, inputs, targets)
    grads, _ = sampler(loss_fn, inputs, targets)
    b = inputs.shape[0]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {n: g.reshape(b, *p.shape).clone() for (n, p), g in zip(named, grads)}


def per_sample_grad_matrix(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """The per-example gradients as one new ``[B, d]`` matrix (trainable parameters in
    ``model.parameters()`` order): what :func:`~common.privacy.privatize_step` takes, made
    with one copy out of the sampler (pass ``consume=True`` there to skip another)."""
    sampler = _public_sampler(model, backend)
    if sampler is None:
        grads = _functorch_grads(model, loss_fn, inputs, targets)
        return torch.cat([g.reshape(inputs.shape[0], -1) for g in grads.values()], dim=1)
    rows, _ = sampler(loss_fn, inputs, targets)
    return torch.cat(rows, dim=1)


_NATIVE_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _public_sampler(model: nn.Module, backend: str) -> NativeGradSampler | None:
    """The public functions' sampler: native where allowed, None for torch.func."""
    if backend not in ("auto", "native", "functorch"):
        raise ValueError(f"unknown backend '{backend}' (auto, native, functorch)")
    return None if backend == "functorch" else _native_sampler(model, required=backend == "native")


def _native_sampler(model: nn.Module, *, required: bool) -> NativeGradSampler | None:
    """The model's native sampler, built once per model (None: not supported, and not required)."""
    if model not in _NATIVE_SAMPLERS:
        try:
            _NATIVE_SAMPLERS[model] = NativeGradSampler(model)
        except UnsupportedLayer:
            if required:
                raise
            _NATIVE_SAMPLERS[model] = None
    return _NATIVE_SAMPLERS[model]


def _functorch_grads(
    model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return _per_example_loss(loss_fn, out, y.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")(params, inputs, targets)


class HookGradSampler:
    """Per-sample gradients through Opacus' ``GradSampleModule`` hooks.

    Wraps ``model`` once (hooks stay registered); :meth:`__call__` returns per-example
    gradients as ``[b, n_k]`` views, one per trainable parameter in
    ``model.parameters()`` order, plus the mean loss of the chunk.
    """

    def __init__(self, model: nn.Module) -> None:
        from opacus import GradSampleModule

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(
        self, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[list[torch.Tensor], float]:
        for p in self.params:
            p.grad_sample = None
            p.grad = None
        outputs = self.module(inputs)
        loss = loss_fn(outputs, targets)
        total = loss.sum() if loss.ndim else loss * inputs.shape[0]
        total.backward()
        b = inputs.shape[0]
        grads = []
        for p in self.params:
            gs = p.grad_sample
            if gs is None:  # parameter not used in the forward pass
                gs = torch.zeros((b, *p.shape), device=p.device, dtype=p.dtype)
            grads.append(gs.reshape(b, -1))
            p.grad_sample = None
            p.grad = None
        return grads, float(total.detach()) / max(b, 1)


class FuncGradSampler:
    """The same interface as :class:`HookGradSampler`, computed with ``torch.func``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]

    def __call__(
        self, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[list[torch.Tensor], float]:
        b = inputs.shape[0]
        grads = per_sample_grads(self.model, loss_fn, inputs, targets, backend="functorch")
        with torch.no_grad():
            loss = loss_fn(self.model(inputs), targets)
        mean_loss = float(loss.mean()) if loss.ndim else float(loss)
        return [grads[n].reshape(b, -1) for n in self.names], mean_loss


class UnsupportedLayer(ValueError):
    """The native sampler cannot handle this model (``auto`` then uses Opacus' hooks)."""


_NATIVE_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm)
NATIVE_LAYERS = _NATIVE_LAYERS  # the layers the native sampler computes per-sample gradients for
# per-example conv weights per grouped weight-gradient call (common.per_sample._layer_grads)
_GROUPED_WEIGHTS = 1 << 25


class NativeGradSampler:
    """Per-sample gradients of ``Linear``, ``Conv2d`` and ``GroupNorm`` layers, fast path.

    The returned ``[b, n_k]`` tensors are scratch space owned by the sampler: they are
    overwritten by the next call, and the caller may modify them in place
    (``SegmentAccumulator.add(..., consume=True)`` standardizes them in place).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        owner: dict[int, tuple[nn.Module, str]] = {}
        self.layers: list[nn.Module] = []
        for name, module in model.named_modules():
            direct = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not direct:
                continue
            if not isinstance(module, _NATIVE_LAYERS):
                raise UnsupportedLayer(
                    f"layer '{name}' ({type(module).__name__}) has no native per-sample rule"
                )
            if isinstance(module, nn.Conv2d) and (
                module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
            ):
                raise UnsupportedLayer(f"layer '{name}': only zero-padded, ungrouped Conv2d is native")
            for n, p in direct:
                if id(p) in owner:
                    raise UnsupportedLayer(f"parameter '{name}.{n}' is shared between layers")
                owner[id(p)] = (module, n)
            self.layers.append(module)
        if len(owner) != len(self.params):
            raise UnsupportedLayer("some trainable parameters belong to no supported layer")
        self.owner = [owner[id(p)] for p in self.params]
        self._inputs: dict[nn.Module, torch.Tensor] = {}
        self._outputs: dict[nn.Module, torch.Tensor] = {}
        self._versions: dict[nn.Module, int] = {}
        self._recording = False
        self._buffers: dict[nn.Module, torch.Tensor] = {}
        for module in self.layers:
            module.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self._recording:
            return
        if module in self._outputs:
            raise UnsupportedLayer(
                f"{type(module).__name__} is called twice in one forward pass; "
                "use per-sample-backend = 'hooks'"
            )
        self._inputs[module] = inputs[0].detach()
        self._outputs[module] = output
        self._versions[module] = output._version

    def _buffer(self, module: nn.Module, b: int, n: int, like: torch.Tensor) -> torch.Tensor:
        """A reused ``[>= b, n]`` scratch buffer for ``module``'s per-example weight gradients."""
        buf = self._buffers.get(module)
        if buf is None or buf.shape[0] < b or buf.device != like.device or buf.dtype != like.dtype:
            buf = torch.empty((b, n), device=like.device, dtype=like.dtype)
            self._buffers[module] = buf
        return buf[:b]

    def __call__(
        self, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[list[torch.Tensor], float]:
        b = inputs.shape[0]
        order, backprops, mean_loss = self._forward_backward(loss_fn, inputs, targets)
        per_layer: dict[nn.Module, dict[str, torch.Tensor]] = {}
        for module in order:
            per_layer[module] = self._layer_grads(module, self._inputs[module], backprops[module])
        grads = [per_layer[module][name].reshape(b, -1) for module, name in self.owner]
        self._inputs.clear()
        self._outputs.clear()
        return grads, mean_loss

    def _forward_backward(
        self, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[list[nn.Module], dict[nn.Module, torch.Tensor], float]:
        """One forward pass recording each layer's input and output, one ``autograd.grad`` to
        the layer outputs: (layers in call order, their output gradients, the mean loss). The
        recorded inputs stay in ``self._inputs`` until the caller clears them."""
        b = inputs.shape[0]
        self._inputs.clear()
        self._outputs.clear()
        self._versions.clear()
        self._recording = True
        try:
            with torch.enable_grad():
                loss = loss_fn(self.model(inputs), targets)
        finally:
            self._recording = False
        total = loss.sum() if loss.ndim else loss * b
        missing = [m for m in self.layers if m not in self._outputs]
        if missing:
            raise UnsupportedLayer(f"{type(missing[0]).__name__} was not used in the forward pass")
        order = list(self._outputs)
        for m in order:
            if self._outputs[m]._version != self._versions[m]:
                raise UnsupportedLayer(
                    f"the output of {type(m).__name__} is modified in place (e.g. ReLU(inplace=True)); "
                    "use per-sample-backend = 'hooks' or an out-of-place activation"
                )
        backprops = dict(zip(order, torch.autograd.grad(total, [self._outputs[m] for m in order])))
        return order, backprops, float(total.detach()) / max(b, 1)

    def _layer_grads(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        b = a.shape[0]
        out: dict[str, torch.Tensor] = {}
        if isinstance(module, nn.Linear):
            if a.ndim == 2:
                w = self._buffer(module, b, module.weight.numel(), a).view(b, *module.weight.shape)
                torch.mul(g.unsqueeze(2), a.unsqueeze(1), out=w)
                out["weight"] = w
                if module.bias is not None:
                    out["bias"] = g
            else:  # [b, ..., features]: sum over the middle dimensions
                a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
                w = self._buffer(module, b, module.weight.numel(), a).view(b, *module.weight.shape)
                torch.bmm(g3.transpose(1, 2), a3, out=w)
                out["weight"] = w
                if module.bias is not None:
                    out["bias"] = g3.sum(1)
        elif isinstance(module, nn.Conv2d):
            c_out, c_in = module.out_channels, module.in_channels
            positions = g.shape[2] * g.shape[3]
            patch = c_in * module.kernel_size[0] * module.kernel_size[1]
            if positions >= 64 or patch < 512:
                # weight gradient of a convolution with the batch as groups: one kernel per
                # example (fast for large feature maps or few channels), in slices of at most
                # _GROUPED_WEIGHTS weights: past ~2^26 the CPU kernel of this call turns 40x
                # slower per example (seen: 243 -> 64 channels 3x3 on 8x8 maps, 1 ms per example
                # at 450 examples, 46 ms at 480)
                w = self._buffer(module, b, module.weight.numel(), a)
                step = max(1, _GROUPED_WEIGHTS // module.weight.numel())
                for s in range(0, b, step):
                    n = min(step, b - s)
                    w[s : s + n] = torch.nn.grad.conv2d_weight(
                        a[s : s + n].reshape(1, n * c_in, *a.shape[2:]),
                        (n * c_out, c_in, *module.kernel_size),
                        g[s : s + n].reshape(1, n * c_out, *g.shape[2:]),
                        stride=module.stride,
                        padding=module.padding,
                        dilation=module.dilation,
                        groups=n,
                    ).reshape(n, -1)
                out["weight"] = w
            else:
                # small maps with many channels (deep ResNet stages): im2col + one batched
                # matmul into the reused buffer is 5-10x faster than the grouped convolution
                cols = torch.nn.functional.unfold(
                    a,
                    module.kernel_size,
                    dilation=module.dilation,
                    padding=module.padding,
                    stride=module.stride,
                )
                w = self._buffer(module, b, module.weight.numel(), a).view(b, c_out, patch)
                torch.bmm(g.reshape(b, c_out, positions), cols.transpose(1, 2), out=w)
                out["weight"] = w.view(b, -1)
            if module.bias is not None:
                out["bias"] = g.sum((2, 3))
        else:  # GroupNorm
            xhat = torch.nn.functional.group_norm(a, module.num_groups, eps=module.eps)
            dims = tuple(range(2, a.ndim))
            if module.weight is not None:
                out["weight"] = (g * xhat).sum(dims) if dims else g * xhat
            if module.bias is not None:
                out["bias"] = g.sum(dims) if dims else g
        return out


GradSampler = HookGradSampler | FuncGradSampler | NativeGradSampler
BACKENDS = ("auto", "ghost", "native", "hooks", "functorch")
