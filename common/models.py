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

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ModelError
from common.feature_norm import SCATTER_NORMS, ChannelStandardize

INPUT_SHAPES = {"mnist": (1, 28, 28), "fashionmnist": (1, 28, 28), "cifar10": (3, 32, 32)}
NUM_CLASSES = 10


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


def mnist_cnn(activation: str = "tanh", group_norm: bool = False) -> nn.Module:
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
        nn.Linear(32, NUM_CLASSES),
    )


def cifar_cnn(activation: str = "tanh", group_norm: bool = False) -> nn.Module:
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
    layers += [nn.Flatten(), nn.Linear(128 * 4 * 4, 128), act(), nn.Linear(128, NUM_CLASSES)]
    return nn.Sequential(*layers)


def resnet18_gn(in_channels: int = 3) -> nn.Module:
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

    model = ResNet(Block, [2, 2, 2, 2], num_classes=NUM_CLASSES, norm_layer=group_norm)
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
    in_shape: tuple[int, int, int], groups: int, activation: str = "tanh", norm: str = "group"
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
            nn.Linear(32, NUM_CLASSES),
        ]
    else:
        body = [
            nn.Conv2d(c, 64, 3, padding=1),
            act(),
            MaxPool2dStride2(),
            nn.Conv2d(64, 64, 3, padding=1),
            act(),
            nn.Flatten(),
            nn.Linear(64 * (h // 2) * (w // 2), NUM_CLASSES),
        ]
    return nn.Sequential(_scatter_front(c, groups, norm), *body)


def scatter_linear(in_shape: tuple[int, int, int], groups: int, norm: str = "group") -> nn.Module:
    """A linear classifier on the normalized ScatterNet features (Tramèr & Boneh 2021)."""
    c, h, w = in_shape
    return nn.Sequential(_scatter_front(c, groups, norm), nn.Flatten(), nn.Linear(c * h * w, NUM_CLASSES))


class MaxPool2dStride2(nn.Module):
    """``nn.MaxPool2d(2)`` (stride 2), a module the per-sample machinery passes through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2)


def build_model(
    name: str,
    dataset: str,
    *,
    activation: str = "tanh",
    scatter_groups: int = 27,
    scatter_norm: str = "group",
) -> nn.Module:
    """Build model ``name`` for ``dataset`` and check that it is DP-compatible.

    ``-gn`` variants of the paper's CNNs add GroupNorm after every convolution;
    ``activation`` (tanh or relu) applies to the paper's CNNs and the ScatterNet CNNs;
    ``scatter-*`` models take the ScatterNet features of the dataset's images, normalized by
    a GroupNorm of ``scatter_groups`` groups or (``scatter_norm = "data"``) by released statistics.
    """
    if activation not in ACTIVATIONS:
        raise ModelError(f"unknown activation '{activation}' (known: {', '.join(ACTIVATIONS)})")
    if dataset not in INPUT_SHAPES:
        raise ModelError(f"unknown dataset '{dataset}' (known: {', '.join(INPUT_SHAPES)})")
    in_channels = INPUT_SHAPES[dataset][0]
    if name in ("scatter-cnn", "scatter-linear"):
        from common.scatter import feature_shape

        shape = feature_shape(INPUT_SHAPES[dataset])
        if scatter_norm not in SCATTER_NORMS:
            raise ModelError(f"unknown scatter-norm '{scatter_norm}' (known: {', '.join(SCATTER_NORMS)})")
        if shape[0] % scatter_groups:
            raise ModelError(
                f"scatter-groups {scatter_groups} does not divide the {shape[0]} feature channels"
            )
        model = (
            scatter_cnn(shape, scatter_groups, activation, scatter_norm)
            if name == "scatter-cnn"
            else scatter_linear(shape, scatter_groups, scatter_norm)
        )
        check_dp_compatible(model)
        return model
    base, gn = (name[: -len("-gn")], True) if name in ("mnist-cnn-gn", "cifar-cnn-gn") else (name, False)
    if base in ("mnist-cnn", "cifar-cnn"):
        shape = (1, 28, 28) if base == "mnist-cnn" else (3, 32, 32)
        if INPUT_SHAPES[dataset] != shape:
            raise ModelError(
                f"model '{name}' needs {'x'.join(map(str, shape))} inputs; dataset '{dataset}' has "
                f"{'x'.join(map(str, INPUT_SHAPES[dataset]))}"
            )
        model = (mnist_cnn if base == "mnist-cnn" else cifar_cnn)(activation, gn)
    elif name == "resnet18-gn":
        model = resnet18_gn(in_channels)
    else:
        raise ModelError(
            f"unknown model '{name}' (known: mnist-cnn, mnist-cnn-gn, cifar-cnn, cifar-cnn-gn, resnet18-gn, "
            "scatter-cnn, scatter-linear)"
        )
    check_dp_compatible(model)
    return model


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


def build_model_for(cfg) -> nn.Module:
    """The model of a run's settings (``TrainConfig``)."""
    return build_model(
        cfg.resolved_model(),
        cfg.dataset,
        activation=cfg.activation,
        scatter_groups=cfg.scatter_groups,
        scatter_norm=cfg.scatter_norm,
    )


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
