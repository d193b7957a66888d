"""ScatterNet features (Tramèr & Boneh 2021, "Differentially Private Learning Needs Better
Features"): a fixed wavelet scattering transform of the images (Oyallon & Mallat 2015) as the
front end of a small private model.

The transform is the 2-D scattering of order 2 with ``J = 2`` scales and ``L = 8`` angles
(``kymatio``): each channel of an ``H x W`` image becomes 81 channels of ``H/4 x W/4``
(MNIST: 1x28x28 -> 81x7x7; CIFAR-10: 3x32x32 -> 243x8x8). It has no trainable parameters and
does not look at any other example, so computing it costs no privacy: a silo or a centralized
trainer applies it to its own examples, and per-sample clipping and noise act on the model
behind it exactly as before. The features of a whole split are computed once and kept in a
disk cache (``$ADADPIGU_CACHE_DIR``, default ``~/.cache/adadpigu-fl``) keyed by a hash of the
input tensor, so every run, silo and worker after the first reads them back.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import torch

SCATTER_J = 2
SCATTER_L = 8
# order 0 + order 1 (J L) + order 2 (L^2 J (J - 1) / 2) channels per input channel
SCATTER_CHANNELS = 1 + SCATTER_J * SCATTER_L + SCATTER_L * SCATTER_L * SCATTER_J * (SCATTER_J - 1) // 2
CACHE_ENV = "ADADPIGU_CACHE_DIR"
# what a model sees: the normalized images, or their scattering features
FEATURES = ("pixels", "scatter")
_CHUNK = 2048


def feature_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(channels, height, width) of the features of a ``(C, H, W)`` image."""
    c, h, w = input_shape
    scale = 2**SCATTER_J
    return (c * SCATTER_CHANNELS, -(-h // scale), -(-w // scale))


def _transform(shape: tuple[int, int]):
    # kymatio 0.3's top-level ``kymatio.torch`` also imports its 3-D frontend, which needs
    # ``scipy.special.sph_harm`` (removed in SciPy 1.17): import the 2-D frontend directly
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=SCATTER_J, shape=shape, L=SCATTER_L)


def scatter_features(x: torch.Tensor) -> torch.Tensor:
    """The scattering features of images ``x`` (``[N, C, H, W]`` float), ``[N, 81 C, H/4, W/4]``
    float32, computed in chunks."""
    if x.ndim != 4:
        raise ValueError(f"scatter_features needs [N, C, H, W] images, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    out = torch.empty((n, *feature_shape((c, h, w))), dtype=torch.float32)
    transform = _transform((h, w))
    with torch.no_grad():
        for i in range(0, n, _CHUNK):
            chunk = x[i : i + _CHUNK].float().contiguous()
            out[i : i + len(chunk)] = transform(chunk).reshape(len(chunk), -1, *out.shape[2:])
    return out


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "adadpigu-fl")


def _key(x: torch.Tensor) -> str:
    import kymatio

    h = hashlib.sha256()
    h.update(f"scatter J={SCATTER_J} L={SCATTER_L} kymatio={kymatio.__version__} {tuple(x.shape)}".encode())
    h.update(np.ascontiguousarray(x.numpy(), dtype=np.float32).tobytes())
    return h.hexdigest()[:24]


def cached_scatter_features(x: torch.Tensor, *, label: str = "data") -> torch.Tensor:
    """:func:`scatter_features` of ``x``, read from the disk cache when it holds them (a file
    that does not have the expected shape is recomputed and replaced); written atomically, so
    concurrent processes never read a partial file. A cache that cannot be written is skipped."""
    folder = cache_dir()
    n, c, h, w = x.shape
    expected = (n, *feature_shape((c, h, w)))
    path = os.path.join(folder, f"scatter-{label}-{_key(x)}.npy")
    try:
        cached = np.load(path)
        if cached.shape == expected and cached.dtype == np.float32:
            return torch.from_numpy(cached)
    except (OSError, ValueError):
        pass
    feats = scatter_features(x)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, feats.numpy())
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return feats
