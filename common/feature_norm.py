"""Data normalization of ScatterNet features with differentially private statistics
(Tramèr & Boneh 2021, "Differentially Private Learning Needs Better Features", §3: normalize
the features with a mean and variance released under DP instead of a per-example GroupNorm).

``scatter-norm = "data"`` standardizes every feature channel ``c`` by a per-channel mean and
scale of the *training set*: ``(x_c - mean_c) / scale_c``. Those statistics depend on every
training example, so they are released with the Gaussian mechanism and charged to the run's
budget before training (``common.trainer``), in two sum queries over the whole training set
(sampling rate 1):

1. **means**: each example's per-channel spatial means ``m_i`` (a ``C``-vector), clipped to
   L2 norm <= ``clip``, summed, plus ``N(0, (sigma clip)^2 I)``, divided by ``n``;
2. **scales**: each example's per-channel RMS deviation from the *released* means,
   ``r_i,c = sqrt(mean_hw (x_i,c - mean_c)^2)``, clipped, summed and noised the same way, divided
   by ``n``; a scale below :data:`SCALE_FLOOR` (a data-independent constant) is raised to it.

Under add/remove-one each query's sum changes by at most ``clip`` in L2, so each is one
Gaussian mechanism with noise multiplier ``sigma``; the second is chosen after the first is
released (adaptive composition), so together they are :data:`NORM_RELEASES` self-composed
Gaussian releases, ``Phase(sigma, 1.0, 2)`` in the accounting. ``n`` is the training-set size
the plan already treats as public (its sampling rate is ``batch-size / n``). The scales are
RMS deviations (not variances) so that channels whose scales differ by 100x (ScatterNet order 0
against order 2) are all estimated well at one noise level: a variance estimate would be
swamped by noise on the small channels.
"""

from __future__ import annotations

import torch
from torch import nn

# how ScatterNet features are normalized (setting scatter-norm): per example by a GroupNorm
# (free), or by the training set's statistics released here ("data": charged; centralized only)
SCATTER_NORMS = ("group", "data")
# Gaussian sum queries per release (means, then scales): Phase(sigma, 1.0, NORM_RELEASES)
NORM_RELEASES = 2
# a released scale below this is raised to it (noise must not blow a channel up)
SCALE_FLOOR = 1e-3
_CHUNK = 4096


def _clipped_sum(rows: torch.Tensor, clip: float | None) -> torch.Tensor:
    if clip is not None:
        rows = rows * (clip / rows.norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)[:, None]
    return rows.sum(0)


def _noisy_mean(total: torch.Tensor, clip: float, noise_multiplier: float, n: int, generator) -> torch.Tensor:
    if noise_multiplier > 0:
        noise = torch.randn(total.shape, dtype=torch.float64, generator=generator)
        total = total + noise_multiplier * clip * noise
    return total / n


def release_channel_stats(
    features: torch.Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    n_public: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale), each ``[C]`` float32, of ``features`` ``[N, C, H, W]`` as the module
    docstring says. ``noise_multiplier`` 0 releases the exact statistics without clipping
    (the ``nonprivate`` method only: no privacy)."""
    if features.ndim != 4:
        raise ValueError(f"channel statistics need [N, C, H, W] features, got shape {tuple(features.shape)}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    private = noise_multiplier > 0
    bound = clip if private else None
    c = features.shape[1]
    sums = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(features), _CHUNK):
        sums += _clipped_sum(features[i : i + _CHUNK].double().mean((2, 3)), bound)
    mean = _noisy_mean(sums, clip, noise_multiplier, n_public, generator)
    sums = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(features), _CHUNK):
        dev = (features[i : i + _CHUNK].double() - mean[None, :, None, None]).square().mean((2, 3)).sqrt()
        sums += _clipped_sum(dev, bound)
    scale = _noisy_mean(sums, clip, noise_multiplier, n_public, generator).clamp(min=SCALE_FLOOR)
    return mean.float(), scale.float()


class ChannelStandardize(nn.Module):
    """``(x - mean_c) / scale_c`` per channel of ``[N, C, H, W]`` inputs, with statistics from
    :func:`release_channel_stats`. They are buffers, not parameters (never trained, saved with
    the model); the layer refuses to run before they are set."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self._checked = False  # ``ready`` seen true once: no device sync on every forward

    def set_stats(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        if mean.shape != self.mean.shape or scale.shape != self.scale.shape:
            raise ValueError(f"statistics of shape {tuple(mean.shape)} for {self.mean.numel()} channels")
        if not bool((scale > 0).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("scales must be > 0 and means finite")
        self.mean.copy_(mean)
        self.scale.copy_(scale)
        self.ready.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._checked:
            if not bool(self.ready):
                raise RuntimeError(
                    "ChannelStandardize has no statistics: scatter-norm = 'data' releases them before "
                    "training (common.trainer), or load a saved model's state"
                )
            self._checked = True
        return (x - self.mean[:, None, None]) / self.scale[:, None, None]


def standardize_layer(model: nn.Module) -> ChannelStandardize | None:
    """The model's :class:`ChannelStandardize` layer, if it has one."""
    return next((m for m in model.modules() if isinstance(m, ChannelStandardize)), None)
