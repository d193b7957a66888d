"""Augmentation multiplicity (De et al. 2022, §3.1): each example's gradient is the mean
over K augmented copies, taken *before* clipping, so one example still contributes one
clipped row and the sensitivity is unchanged.

Augmentations act on normalized NCHW tensors: a random translation by up to ``pad`` pixels
(zero-padding in normalized units is the dataset mean, i.e. 0) and, for natural images
(CIFAR-10), a random horizontal flip. Randomness comes from the generator passed in; it
touches no private quantity beyond the example itself (it is part of the per-example
gradient computation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = {"mnist": 2, "fashionmnist": 2, "cifar10": 4}
FLIP = {"mnist": False, "fashionmnist": True, "cifar10": True}


def augmentation_of(schema) -> tuple[int, bool]:
    """(shift in pixels, horizontal flips) for a dataset's schema: the built-in datasets' own;
    for user images a shift of an eighth of the smaller side and flips as the schema declares
    (``[image] flip``: whether a mirrored image keeps its class is public knowledge of the data)."""
    from common.errors import ConfigError

    if schema.name in PAD and schema.source == "":
        return PAD[schema.name], FLIP[schema.name]
    if schema.kind != "image":
        raise ConfigError("augmult", "> 0", f"augments images; '{schema.name}' is a {schema.kind} (set 0)")
    return max(1, min(schema.size) // 8), schema.flip


def augment(
    x: torch.Tensor, k: int, dataset: str | tuple[int, bool], generator: torch.Generator
) -> torch.Tensor:
    """``[b, C, H, W]`` -> ``[b * k, C, H, W]``; rows ``i*k .. i*k+k-1`` are copies of example i.
    ``dataset``: a built-in dataset's name or (shift, flip) (:func:`augmentation_of`)."""
    b, c, h, w = x.shape
    pad, flip = (PAD[dataset], FLIP[dataset]) if isinstance(dataset, str) else dataset
    reps = x.repeat_interleave(k, dim=0)
    padded = F.pad(reps, (pad, pad, pad, pad))
    n = b * k
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[idx_n, idx_c, rows, cols]
    if flip:
        mirrored = torch.rand(n, generator=generator, device=x.device) < 0.5
        out = torch.where(mirrored[:, None, None, None], out.flip(-1), out)
    return out


def mean_over_copies(grads: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per-segment ``[b * k, n]`` -> ``[b, n]``: each example's mean gradient over its copies."""
    return [g.reshape(g.shape[0] // k, k, *g.shape[1:]).mean(1) for g in grads]
