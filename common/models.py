"""Models: the paper's CNNs and a GroupNorm ResNet-18, all free of BatchNorm.

- ``mnist-cnn``: the 26,010-parameter CNN of Papernot et al. (2021) / Tramèr & Boneh
  (2021), tanh activations, used by AdaDPIGU for MNIST and FashionMNIST.
- ``cifar-cnn``: the 550,570-parameter 3x3 CNN (Tramèr & Boneh 2021, Table 9).
- ``resnet18-gn``: torchvision's ResNet-18 with GroupNorm in place of BatchNorm, for the
  paper's open question on larger models.

BatchNorm mixes the examples of a batch, so one example influences every other
example's gradient and per-sample clipping no longer bounds sensitivity
(DESIGN.md §2): :func:`check_dp_compatible` refuses such models.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ModelError
from common.feature_norm import SCATTER_NORMS, ChannelStandardize
from common.schema import Schema, builtin_schema, schema_of

INPUT_SHAPES = {"mnist": (1, 28, 28), "fashionmnist": (1, 28, 28), "cifar10": (3, 32, 32)}
NUM_CLASSES = 10  # of the built-in datasets


class MaxPool2dStride1(nn.Module):
    """``nn.MaxPool2d(kernel_size, stride=1)``, pooled in channels-last memory layout.

    Same function, same gradient (PyTorch's own max-pool kernel): only the memory layout of
    the pooled tensor differs. PyTorch's NCHW max-pool CPU kernel is ~20x slower than its
    channels-last one for the paper's MNIST CNN (20 ms vs 1 ms for a batch of 256 on this
    project's CPU, docs/BENCHMARKS.md); the result is returned in the usual layout.
    """

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = int(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.device.type == "cpu":
            try:
                pooled = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), self.kernel_size, 1)
                return pooled.contiguous()
            except RuntimeError:  # e.g. under torch.func.vmap: plain layout
                pass
        return F.max_pool2d(x, self.kernel_size, 1)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride=1"


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _conv_block(conv: nn.Conv2d, act: type[nn.Module], group_norm: bool) -> list[nn.Module]:
    """conv [-> GroupNorm] -> activation. GroupNorm (per example, never BatchNorm) with groups
    of 4 channels at most 8 groups: Klause et al. 2022 / De et al. 2022 style normalisation."""
    c = conv.out_channels
    return [conv, *([nn.GroupNorm(min(8, c // 4 or 1), c)] if group_norm else []), act()]


def mnist_cnn(
    activation: str = "tanh", group_norm: bool = False, num_classes: int = NUM_CLASSES
) -> nn.Module:
    """The 26,010-parameter MNIST CNN (Papernot et al. 2021, Tramèr & Boneh 2021); tanh by
    default (tempered sigmoids train better under DP, Papernot et al. 2021)."""
    act = ACTIVATIONS[activation]
    return nn.Sequential(
        *_conv_block(nn.Conv2d(1, 16, 8, stride=2, padding=3), act, group_norm),
        MaxPool2dStride1(2),
        *_conv_block(nn.Conv2d(16, 32, 4, stride=2), act, group_norm),
        MaxPool2dStride1(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        act(),
        nn.Linear(32, num_classes),
    )


def cifar_cnn(
    activation: str = "tanh", group_norm: bool = False, num_classes: int = NUM_CLASSES
) -> nn.Module:
    """The 550,570-parameter CIFAR-10 CNN (Tramèr & Boneh 2021, Table 9), tanh by default."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in (32, 64, 128):
        layers += [
            *_conv_block(nn.Conv2d(c_in, c_out, 3, padding=1), act, group_norm),
            *_conv_block(nn.Conv2d(c_out, c_out, 3, padding=1), act, group_norm),
            nn.MaxPool2d(2, 2),
        ]
        c_in = c_out
    layers += [nn.Flatten(), nn.Linear(128 * 4 * 4, 128), act(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)


class _WideBlock(nn.Module):
    """Pre-activation wide residual block with GroupNorm (De et al. 2022, after Zagoruyko &
    Komodakis 2016): GN -> ReLU -> conv3x3 -> GN -> ReLU -> conv3x3, plus a 1x1 shortcut
    where the shape changes; out-of-place throughout (per-sample hooks)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.norm2(self.conv1(out))))
        return out + skip


def wrn_gn(
    depth: int = 16, width: int = 4, in_channels: int = 3, num_classes: int = NUM_CLASSES
) -> nn.Module:
    """WRN-depth-width with GroupNorm (16 groups), De et al. (2022)'s DP CIFAR-10 model
    (WRN-16-4: 2.7 M parameters); GPU-scale (``benchmarks/gpu_check.sh``)."""
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
    c = widths[0]
    for stage, stride in zip(widths[1:], (1, 2, 2)):
        for i in range(n):
            layers.append(_WideBlock(c, stage, stride if i == 0 else 1, 16))
            c = stage
    layers += [
        nn.GroupNorm(16, c),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, num_classes),
    ]
    return nn.Sequential(*layers)


def resnet18_gn(in_channels: int = 3, num_classes: int = NUM_CLASSES) -> nn.Module:
    """torchvision ResNet-18 with GroupNorm (32 groups, or fewer for narrow layers).

    The residual addition is out-of-place (torchvision's ``out += identity`` and in-place
    ReLU clash with per-sample gradient hooks); the architecture is unchanged.
    """
    from torchvision.models.resnet import BasicBlock, ResNet

    class Block(BasicBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    def group_norm(channels: int) -> nn.Module:
        return nn.GroupNorm(min(32, channels), channels)

    model = ResNet(Block, [2, 2, 2, 2], num_classes=num_classes, norm_layer=group_norm)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


def _scatter_front(channels: int, groups: int, norm: str) -> nn.Module:
    """How a ScatterNet model normalizes its features: a GroupNorm without parameters (per
    example, no privacy cost) or, for ``norm = "data"``, a per-channel standardization by
    statistics released under DP before training (``common.feature_norm``)."""
    if norm == "data":
        return ChannelStandardize(channels)
    return nn.GroupNorm(groups, channels, affine=False)


def scatter_cnn(
    in_shape: tuple[int, int, int],
    groups: int,
    activation: str = "tanh",
    norm: str = "group",
    num_classes: int = NUM_CLASSES,
) -> nn.Module:
    """The CNNs on ScatterNet features of Tramèr & Boneh (2021): a GroupNorm without parameters
    (per example: DP-safe; or the private data normalization, :func:`_scatter_front`), then for
    grayscale (81x7x7) two 3x3 convolutions (16 with stride 2, 32) and a 32-unit hidden layer;
    for colour (243x8x8) 64 3x3, max-pool, 64 3x3 and a linear classifier."""
    act = ACTIVATIONS[activation]
    c, h, w = in_shape
    if h <= 7:
        body = [
            nn.Conv2d(c, 16, 3, stride=2, padding=1),
            act(),
            nn.Conv2d(16, 32, 3, stride=1, padding=1),
            act(),
            nn.Flatten(),
            nn.Linear(32 * ((h + 1) // 2) * ((w + 1) // 2), 32),
            act(),
            nn.Linear(32, num_classes),
        ]
    else:
        body = [
            nn.Conv2d(c, 64, 3, padding=1),
            act(),
            MaxPool2dStride2(),
            nn.Conv2d(64, 64, 3, padding=1),
            act(),
            nn.Flatten(),
            nn.Linear(64 * (h // 2) * (w // 2), num_classes),
        ]
    return nn.Sequential(_scatter_front(c, groups, norm), *body)


def scatter_linear(
    in_shape: tuple[int, int, int], groups: int, norm: str = "group", num_classes: int = NUM_CLASSES
) -> nn.Module:
    """A linear classifier on the normalized ScatterNet features (Tramèr & Boneh 2021)."""
    c, h, w = in_shape
    return nn.Sequential(_scatter_front(c, groups, norm), nn.Flatten(), nn.Linear(c * h * w, num_classes))


class MaxPool2dStride2(nn.Module):
    """``nn.MaxPool2d(2)`` (stride 2), a module the per-sample machinery passes through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2)


def build_model(
    name: str,
    data: str | Schema,
    *,
    activation: str = "tanh",
    scatter_groups: int = 27,
    scatter_norm: str = "group",
    hidden: tuple[int, ...] = (64,),
    backend: str = "auto",
) -> nn.Module:
    """Build model ``name`` for ``data`` (a built-in dataset's name or a :class:`Schema`: its
    input shape and classes) and check that it is DP-compatible.

    ``-gn`` variants of the paper's CNNs add GroupNorm after every convolution;
    ``activation`` (tanh or relu) applies to the paper's CNNs, the ScatterNet CNNs and the MLP;
    ``scatter-*`` models take the ScatterNet features of the images, normalized by a GroupNorm
    of ``scatter_groups`` groups or (``scatter_norm = "data"``) by released statistics;
    ``logreg`` and ``mlp`` (``hidden`` widths) take any input, flattened; a
    ``package.module:factory`` is the user's own (:func:`user_model`, checked with
    ``backend``'s per-sample gradients).
    """
    schema = builtin_schema(data) if isinstance(data, str) else data
    if activation not in ACTIVATIONS:
        raise ModelError(f"unknown activation '{activation}' (known: {', '.join(ACTIVATIONS)})")
    shape, classes = schema.input_shape, schema.num_classes
    if ":" in name:
        return user_model(name, shape, classes, backend=backend)
    if name in ("logreg", "mlp"):
        model = mlp(shape, classes, hidden if name == "mlp" else (), activation)
    elif name in ("scatter-cnn", "scatter-linear"):
        from common.scatter import feature_shape

        if schema.kind != "image":
            raise ModelError(
                f"model '{name}' takes ScatterNet features of images; '{schema.name}' is a {schema.kind}"
            )
        fshape = feature_shape(shape)
        if scatter_norm not in SCATTER_NORMS:
            raise ModelError(f"unknown scatter-norm '{scatter_norm}' (known: {', '.join(SCATTER_NORMS)})")
        if fshape[0] % scatter_groups:
            raise ModelError(
                f"scatter-groups {scatter_groups} does not divide the {fshape[0]} feature channels"
            )
        model = (
            scatter_cnn(fshape, scatter_groups, activation, scatter_norm, classes)
            if name == "scatter-cnn"
            else scatter_linear(fshape, scatter_groups, scatter_norm, classes)
        )
    else:
        base, gn = (name[: -len("-gn")], True) if name in ("mnist-cnn-gn", "cifar-cnn-gn") else (name, False)
        if base in ("mnist-cnn", "cifar-cnn"):
            need = (1, 28, 28) if base == "mnist-cnn" else (3, 32, 32)
            if shape != need:
                raise ModelError(
                    f"model '{name}' needs {'x'.join(map(str, need))} inputs; '{schema.name}' has "
                    f"{'x'.join(map(str, shape))}"
                )
            model = (mnist_cnn if base == "mnist-cnn" else cifar_cnn)(activation, gn, classes)
        elif name == "wrn16-4":
            if schema.kind != "image":
                raise ModelError(f"model '{name}' takes images; '{schema.name}' is a {schema.kind}")
            model = wrn_gn(16, 4, shape[0], classes)
        elif name == "resnet18-gn":
            if schema.kind != "image":
                raise ModelError(f"model '{name}' takes images; '{schema.name}' is a {schema.kind}")
            model = resnet18_gn(shape[0], classes)
        else:
            raise ModelError(
                f"unknown model '{name}' (known: mnist-cnn, mnist-cnn-gn, cifar-cnn, cifar-cnn-gn, resnet18-gn, wrn16-4, "
                "scatter-cnn, scatter-linear, logreg, mlp, or package.module:factory)"
            )
    check_dp_compatible(model)
    return model


def mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (64,), activation: str = "tanh"
) -> nn.Module:
    """A multilayer perceptron on the flattened input (``hidden = ()``: logistic regression,
    one linear layer and the softmax of the cross-entropy)."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), act()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def user_model(
    spec: str, input_shape: tuple[int, ...], num_classes: int, *, backend: str = "auto"
) -> nn.Module:
    """The user's model ``package.module:factory``, called as ``factory(input_shape,
    num_classes)``, checked before it trains (:func:`check_user_model`)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to see
        raise ModelError(
            f"model '{spec}': module '{module_name}' does not import ({type(exc).__name__}: {exc})"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"model '{spec}': '{module_name}' has no callable '{attr}'")
    try:
        model = factory(tuple(input_shape), int(num_classes))
    except Exception as exc:  # noqa: BLE001
        raise ModelError(
            f"model '{spec}': {attr}({tuple(input_shape)}, {num_classes}) raised {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model '{spec}': {attr}(...) returned {type(model).__name__}, not a torch.nn.Module"
        )
    check_user_model(model, spec, input_shape, num_classes, backend=backend)
    return model


def check_user_model(
    model: nn.Module, spec: str, input_shape: tuple[int, ...], num_classes: int, *, backend: str = "auto"
) -> None:
    """What a model must satisfy before round 1, each failure a :class:`ModelError` naming the
    cause: trainable parameters; an output of ``[batch, num_classes]``; no layer that mixes
    the examples of a batch (BatchNorm); per-sample gradients from ``backend`` for every layer,
    equal to each example's own gradient (which a layer mixing examples would break)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError(f"model '{spec}' has no trainable parameters")
    check_dp_compatible(model)
    x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(3) % num_classes
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(
            f"model '{spec}' fails on inputs of shape {list(x.shape)}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3, num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model '{spec}' returns {got} for a batch of 3; the schema has {num_classes} classes: [3, {num_classes}] is due"
        )
    _check_per_sample(model, spec, x, y, backend)


def _check_per_sample(model: nn.Module, spec: str, x: torch.Tensor, y: torch.Tensor, backend: str) -> None:
    import copy

    from common.ghost import make_grad_sampler

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, t, reduction="none")

    probe = copy.deepcopy(model)  # the sampler's hooks stay on the probe, not on the model that trains
    try:
        rows = torch.cat(make_grad_sampler(probe, backend)(loss_fn, x, y)[0], dim=1).detach()
    except Exception as exc:  # noqa: BLE001
        raise ModelError(
            f"model '{spec}': no per-sample gradients with backend '{backend}': {_layer_hint(model)}"
            f"{type(exc).__name__}: {exc}"
        ) from None
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(x.shape[0]):
        ref = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum(), params, allow_unused=True)
        ref = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(ref, params)]
        )
        if not torch.allclose(rows[i], ref, rtol=1e-3, atol=1e-5):
            raise ModelError(
                f"model '{spec}': example {i}'s per-sample gradient differs from its own gradient: a layer "
                "mixes the examples of a batch (batch statistics?), which per-sample clipping cannot bound"
            )


def _layer_hint(model: nn.Module) -> str:
    """The first layer with parameters that neither the native sampler nor Opacus knows."""
    from opacus import GradSampleModule

    from common.per_sample import NATIVE_LAYERS

    for name, m in model.named_modules():
        if (
            any(True for _ in m.parameters(recurse=False))
            and not isinstance(m, NATIVE_LAYERS)
            and type(m) not in GradSampleModule.GRAD_SAMPLERS
        ):
            return f"layer '{name}' ({type(m).__name__}) has no per-sample rule; "
    return ""


_BATCH_MIXING = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def check_dp_compatible(model: nn.Module) -> None:
    """Raise :class:`ModelError` if a layer mixes examples of a batch (BatchNorm)."""
    for name, module in model.named_modules():
        if isinstance(module, _BATCH_MIXING) or isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ModelError(
                f"layer '{name or type(module).__name__}' is {type(module).__name__}: BatchNorm "
                "mixes examples, so per-sample clipping does not bound sensitivity; use "
                "GroupNorm or LayerNorm instead"
            )


def build_model_for(cfg, schema: Schema | None = None) -> nn.Module:
    """The model of a run's settings (``TrainConfig``), for its data's schema."""
    schema = schema or schema_of(cfg.dataset, cfg.schema)
    return build_model(
        cfg.resolved_model(schema.kind, schema.input_shape),
        schema,
        activation=cfg.activation,
        scatter_groups=cfg.scatter_groups,
        scatter_norm=cfg.scatter_norm,
        hidden=cfg.hidden_sizes(),
        backend=cfg.per_sample_backend,
    )


def model_signature(model: nn.Module) -> str:
    """A hash of the trainable parameters' names and shapes: server and silos compare it."""
    import hashlib

    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters() if p.requires_grad)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All trainable parameters as one new flat float tensor (named_parameters order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector (named_parameters order) into the model's parameters."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                continue
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, model has {offset}")


class ParameterEMA:
    """Exponential moving average of a model's trainable parameters (De et al. 2022).

    Post-processing of the trained (already private) weights: ``ema = decay * ema +
    (1 - decay) * params`` after every update, starting from the first updated weights.
    Kept in float64 so that long averages do not drift.
    """

    def __init__(self, decay: float, *, updates: int | None = None) -> None:
        if not (0.0 < decay < 1.0):
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        horizon = 1.0 / (1.0 - decay)
        if updates is not None and horizon > updates:
            warnings.warn(
                f"ema-decay {decay:g} averages over ~{horizon:.0f} updates but the plan has {updates}: "
                "the averaged (evaluated and saved) model stays close to the first updated weights",
                stacklevel=2,
            )
        self.decay = decay
        self.flat: torch.Tensor | None = None

    def update(self, flat: torch.Tensor) -> None:
        flat = flat.detach().double().cpu()
        if self.flat is None:
            self.flat = flat.clone()
        else:
            self.flat.mul_(self.decay).add_(flat, alpha=1.0 - self.decay)

    def averaged(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` carrying the averaged parameters (``model`` itself before any update)."""
        if self.flat is None:
            return model
        import copy

        out = copy.deepcopy(model)
        load_flat_parameters(out, self.flat.to(next(model.parameters()).dtype))
        return out
