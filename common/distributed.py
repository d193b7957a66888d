"""Distributed DP on the integer lattice, for secure aggregation (``dp-noise = "distributed"``).

Flower-free maths of the distributed discrete Gaussian mechanism (Kairouz, Liu & Steinke
2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation"), applied per *example* (sample-level DP across silos):

1. every per-sample row, standardized and clipped to L2 norm ``C`` on the active
   coordinates, is scaled onto the lattice (``c = gamma * C`` units) and rounded with
   **conditional randomized rounding** (:func:`conditional_round`): stochastic rounding,
   repeated until the integer row's squared norm is at most ``bound_sq``. That bound is the
   sensitivity ``Delta_2^2`` of the silo's integer sum, deterministically (checked in
   integers), whatever the floating point did before;
2. each silo adds **discrete Gaussian** noise ``N_Z(0, s^2)`` (:func:`discrete_gaussian`,
   Canonne, Kamath & Steinke 2020, Algorithm 3) to its integer sum, with
   ``s = sigma * Delta_2 / sqrt(t)``: any ``t`` shares together carry the noise of one
   central release with noise multiplier ``sigma``;
3. the sum of all silos' vectors is computed modulo ``2^32`` by secure aggregation
   (:mod:`server.secagg`, :mod:`client.secagg`); :func:`plan_lattice` chooses ``gamma`` so
   that the sum cannot wrap except with negligible probability (Poisson batch above its
   mean by 10 standard deviations, noise beyond 12 standard deviations), and the server
   reports each round's headroom.

Randomness: :class:`SecureRandom` draws from a ChaCha20 keystream (the ``cryptography``
package) keyed by 32 bytes of OS entropy; :func:`mask_stream` expands secure-aggregation
seeds the same way (Flower 1.42's ``pseudo_rand_gen`` folds a seed into 32 bits of
Mersenne Twister state, which a server could search exhaustively; it is not used).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from common.errors import ConfigError

MOD_BITS = 32
MODULUS = 1 << MOD_BITS
HALF = 1 << (MOD_BITS - 1)
# a Poisson batch above its mean by this many standard deviations (+ this many examples), and
# noise beyond this many standard deviations, are treated as impossible by the wrap bound
_BATCH_SDS = 10.0
_NOISE_SDS = 12.0
# the rounding may inflate the sensitivity by at most this fraction, else the plan is refused
MAX_ROUNDING_INFLATION = 0.01


# ----- randomness -----------------------------------------------------------------------


def _keystream(key32: bytes, nonce12: bytes, nbytes: int) -> bytes:
    # cryptography's ChaCha20 takes a 16-byte nonce: a 4-byte block counter, then 12 bytes
    cipher = Cipher(algorithms.ChaCha20(key32, b"\x00\x00\x00\x00" + nonce12), mode=None)
    return cipher.encryptor().update(bytes(nbytes))


class SecureRandom:
    """Uniform randomness from a ChaCha20 keystream keyed by ``os.urandom(32)``.

    ``seed`` (a reproducible run's seed and keys) derives the key instead: then the draws
    are reproducible by anyone who knows the seed, as every seeded generator of this
    project (docs/PRIVACY.md)."""

    def __init__(self, seed: object | None = None) -> None:
        self._key = os.urandom(32) if seed is None else hashlib.sha256(repr(seed).encode()).digest()
        self._calls = 0

    def uint64(self, n: int) -> np.ndarray:
        self._calls += 1
        nonce = self._calls.to_bytes(12, "little")
        return np.frombuffer(_keystream(self._key, nonce, 8 * int(n)), dtype="<u8").copy()

    def bytes(self, n: int) -> bytes:
        self._calls += 1
        return _keystream(self._key, self._calls.to_bytes(12, "little"), int(n))

    def uniform(self, n: int) -> np.ndarray:
        """``n`` floats uniform on [0, 1) (53 random bits each)."""
        return (self.uint64(n) >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def mask_stream(seed: bytes, instance: int, n: int) -> np.ndarray:
    """The secure-aggregation mask of ``n`` coordinates for ``seed`` (a private-mask seed or a
    pairwise shared key) in key instance ``instance``: uniform on Z_{2^32} (uint32)."""
    key = hashlib.sha256(b"adadpigu-secagg-mask" + seed).digest()
    nonce = int(instance).to_bytes(12, "little")
    return np.frombuffer(_keystream(key, nonce, 4 * int(n)), dtype="<u4").astype(np.uint32)


# ----- the discrete Gaussian ----------------------------------------------------------


def discrete_gaussian(n: int, sigma: float, rng: SecureRandom) -> np.ndarray:
    """``n`` independent draws of ``N_Z(0, sigma^2)``: P(x) proportional to exp(-x^2 / (2 sigma^2))
    on the integers (Canonne, Kamath & Steinke 2020, Algorithm 3, vectorized: a discrete
    Laplace proposal of scale ``t = floor(sigma) + 1`` accepted with probability
    ``exp(-(|y| - sigma^2/t)^2 / (2 sigma^2))``; floating-point acceptance, as in Kairouz et
    al.'s implementation)."""
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"discrete Gaussian scale must be positive and finite, got {sigma}")
    t = math.floor(sigma) + 1
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        m = int((n - out.size) * 1.6) + 16
        # the difference of two geometrics on {0, 1, ...} with P(0) = 1 - exp(-1/t) is the
        # discrete Laplace: P(y) proportional to exp(-|y| / t)
        u = rng.uniform(2 * m).reshape(2, m)
        g = np.floor(-t * np.log1p(-u))  # log1p(-u) < 0 for u in [0, 1)
        y = (g[0] - g[1]).astype(np.int64)
        accept = rng.uniform(m) < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2.0 * sigma**2))
        out = np.concatenate([out, y[accept]])
    return out[:n]


def discrete_gaussian_pmf(support: np.ndarray, sigma: float) -> np.ndarray:
    """The exact pmf of ``N_Z(0, sigma^2)`` on ``support`` (normalized over a wide range)."""
    span = int(math.ceil(40 * sigma)) + 1
    z = np.arange(-span, span + 1)
    norm = np.exp(-(z.astype(np.float64) ** 2) / (2 * sigma**2)).sum()
    return np.exp(-(np.asarray(support, dtype=np.float64) ** 2) / (2 * sigma**2)) / norm


# ----- rounding -----------------------------------------------------------------------


def rounding_bound_sq(c: float, dim: int) -> int:
    """Kairouz et al. (2021)'s bound on the squared L2 norm after conditional randomized
    rounding of a vector of norm <= ``c`` in ``dim`` dimensions, with beta = exp(-1/2):
    ``min(c^2 + dim/4 + (c + sqrt(dim)/2), (c + sqrt(dim))^2)``, rounded down to an integer
    (squared norms of integer vectors are integers)."""
    b1 = c * c + dim / 4.0 + (c + math.sqrt(dim) / 2.0)
    b2 = (c + math.sqrt(dim)) ** 2
    return int(math.floor(min(b1, b2)))


# lattice values stay below 2^24 in magnitude, so float32 holds them (and their rounding) exactly
MAX_LATTICE_CLIP = float(2**23)
# relative margin of the float32 norm check (its error is below 1e-6 relative)
CHECK_MARGIN = 1e-5


def round_rows(rows: torch.Tensor, bound_sq: int, rng: SecureRandom, *, max_tries: int = 200) -> torch.Tensor:
    """Conditional randomized rounding of each row of ``rows`` (``[b, k]`` float32, lattice
    units, |values| < 2^23): stochastic rounding, redrawn for the rows whose squared norm
    exceeds ``bound_sq`` until none does. Returns float32 integers (exact); every row's
    squared norm is at most ``bound_sq`` (checked in float32 with a margin of
    :data:`CHECK_MARGIN`; rows are scaled to ``c (1 - 2 CHECK_MARGIN)`` first). The bound alone makes ``bound_sq`` the sensitivity, whatever the
    floating point did before."""
    if rows.ndim != 2:
        raise ValueError(f"rows must be [b, k], got shape {tuple(rows.shape)}")
    rows = rows.float()
    if rows.numel() and float(rows.abs().max()) >= MAX_LATTICE_CLIP + 1:
        raise ValueError("lattice rows exceed 2^23 units (the lattice clip is capped there)")
    b, k = rows.shape
    floor = torch.floor(rows)
    frac = rows - floor

    def draw(n: int) -> torch.Tensor:  # 24-bit uniforms on [0, 1), exact in float32
        bits = np.frombuffer(rng.bytes(4 * n * k), dtype="<u4") >> np.uint32(8)
        return torch.from_numpy(bits.astype(np.float32)).mul_(2.0**-24).view(n, k)

    # the check in float32 against the bound less a margin far above float32's error on a sum of
    # squares (a relative 1e-6 here), so that passing it proves the exact norm is within bound_sq
    limit = bound_sq * (1.0 - CHECK_MARGIN)
    out = floor + (draw(b) < frac)
    todo = torch.nonzero((out * out).sum(1) > limit).flatten()
    for _ in range(max_tries):  # rare: only rows whose rounding came out too long are redrawn
        if todo.numel() == 0:
            return out
        cand = floor[todo] + (draw(todo.numel()) < frac[todo])
        ok = (cand * cand).sum(1) <= limit
        out[todo[ok]] = cand[ok]
        todo = todo[~ok]
    if todo.numel() == 0:
        return out
    raise ValueError(
        f"conditional rounding: {todo.numel()} row(s) still above the norm bound after {max_tries} tries "
        "(a row was not clipped to the lattice clip norm)"
    )


def conditional_round(rows: np.ndarray, bound_sq: int, rng: SecureRandom) -> np.ndarray:
    """:func:`round_rows` on a numpy ``[b, k]`` array; int64."""
    return (
        round_rows(torch.from_numpy(np.asarray(rows, dtype=np.float32)), bound_sq, rng)
        .numpy()
        .astype(np.int64)
    )


# ----- the plan -------------------------------------------------------------------------


def collusion_tau(share_std: float, survivors: int) -> float:
    """Kairouz et al. (2021), Theorem 1: the sum of ``n`` discrete Gaussians of scale ``s``
    is ``rho``-zCDP with ``rho = Delta_2^2 / (2 n s^2) + tau * d / 4``, where
    ``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1))``."""
    s2 = share_std**2
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, survivors))


@dataclass(frozen=True)
class LatticePlan:
    """How a round's sum is put on the lattice, its noise split, and what it is worth.

    ``gamma``: lattice units per unit of the (standardized) clipped gradient, so the clip
    norm ``C`` becomes ``c = gamma * C``; ``bound_sq``: the sensitivity ``Delta_2^2`` of a
    silo's integer sum (one example's rounded row); ``share_std``: each silo's discrete
    Gaussian scale; ``survivors``: ``t``, the silos whose shares the privacy claim assumes.
    """

    clip_norm: float
    gamma: float
    bound_sq: int
    share_std: float
    survivors: int
    silos: int
    dim: int
    max_batch: int

    @property
    def delta2(self) -> float:
        return math.sqrt(self.bound_sq)

    @property
    def tau(self) -> float:
        return collusion_tau(self.share_std, self.survivors)

    @property
    def noise_multiplier(self) -> float:
        """The effective noise multiplier of the sum against the server when at least
        ``survivors`` honest silos contribute: ``1 / sqrt(2 rho)`` of Kairouz et al.'s bound."""
        inv = self.bound_sq / (self.survivors * self.share_std**2) + self.tau * self.dim / 2.0
        return 1.0 / math.sqrt(inv)

    @property
    def own_share_noise_multiplier(self) -> float:
        """A silo's own share alone (every other silo colluding with the server)."""
        return self.share_std / self.delta2

    @property
    def rounding_inflation(self) -> float:
        """``Delta_2 / c - 1``: how much the rounding adds to the sensitivity."""
        return self.delta2 / (self.gamma * self.clip_norm) - 1.0

    def worst_coordinate(self, contributors: int) -> float:
        """The largest |coordinate| of the sum the plan allows for (batch and noise bounds)."""
        return (
            self.max_batch * (self.gamma * self.clip_norm + 1.0)
            + _NOISE_SDS * math.sqrt(contributors) * self.share_std
        )

    def to_dict(self) -> dict:
        return {
            "modulus_bits": MOD_BITS,
            "gamma": self.gamma,
            "lattice_clip": self.gamma * self.clip_norm,
            "sensitivity_l2": self.delta2,
            "rounding_inflation": self.rounding_inflation,
            "share_std": self.share_std,
            "survivors": self.survivors,
            "silos": self.silos,
            "active_coordinates": self.dim,
            "max_batch": self.max_batch,
            "noise_multiplier": self.noise_multiplier,
            "own_share_noise_multiplier": self.own_share_noise_multiplier,
            "tau": self.tau,
            "wrap_headroom": self.worst_coordinate(self.silos) / HALF,
        }


def max_batch(expected_total_batch: float) -> int:
    mu = float(expected_total_batch)
    return int(math.ceil(mu + _BATCH_SDS * math.sqrt(mu) + _BATCH_SDS))


def plan_lattice(
    *,
    clip_norm: float,
    dim: int,
    noise_multiplier: float,
    survivors: int,
    silos: int,
    expected_total_batch: float,
) -> LatticePlan:
    """The finest lattice whose sum cannot wrap modulo ``2^32``, with each silo's noise share
    such that ``survivors`` shares give ``noise_multiplier`` against the server.

    Wrap bound per coordinate: ``B (c + 1) + 12 sqrt(K) s`` with ``B`` the batch bound and
    ``s = sigma * Delta_2 / sqrt(t) <= sigma (c + sqrt(dim)) / sqrt(t)``, solved for ``c``."""
    if not (1 <= survivors <= silos):
        raise ConfigError(
            "secagg-survivors", survivors, f"must be between 1 and the number of silos ({silos})"
        )
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ConfigError(
            "noise-multiplier", noise_multiplier, "distributed noise needs a positive noise multiplier"
        )
    b = max_batch(expected_total_batch)
    k = _NOISE_SDS * math.sqrt(silos / survivors) * noise_multiplier * 1.01
    c = min(math.floor((HALF - 1 - b - k * math.sqrt(dim)) / (b + k)), int(MAX_LATTICE_CLIP))
    if c <= 0 or (math.sqrt(rounding_bound_sq(c, dim)) / c - 1.0) > MAX_ROUNDING_INFLATION:
        raise ConfigError(
            "dp-noise",
            "distributed",
            f"a 32-bit secure sum has no room for this round: {dim} active coordinates, a batch of up to "
            f"{b} examples over {silos} silos and noise multiplier {noise_multiplier:.3g} leave a lattice "
            f"clip of {c} units, too coarse (rounding would add more than "
            f"{MAX_ROUNDING_INFLATION:.0%} to the sensitivity); use a smaller batch or fewer coordinates",
        )
    bound_sq = rounding_bound_sq(c, dim)
    share_std = noise_multiplier * math.sqrt(bound_sq) / math.sqrt(survivors)
    plan = LatticePlan(
        clip_norm=float(clip_norm),
        gamma=c / float(clip_norm),
        bound_sq=bound_sq,
        share_std=share_std,
        survivors=survivors,
        silos=silos,
        dim=dim,
        max_batch=b,
    )
    if plan.worst_coordinate(silos) >= HALF:  # the solution above guarantees this; a last check
        raise ConfigError("dp-noise", "distributed", "the lattice plan would let the secure sum wrap")
    return plan


# ----- a silo's vector and the server's decoding ----------------------------------------


def noisy_share(int_sum: np.ndarray, plan: LatticePlan, rng: SecureRandom) -> np.ndarray:
    """A silo's integer sum plus its discrete Gaussian share, on Z_{2^32} (uint32)."""
    noisy = np.asarray(int_sum, dtype=np.int64) + discrete_gaussian(
        int(np.size(int_sum)), plan.share_std, rng
    )
    return np.mod(noisy, MODULUS).astype(np.uint32)


def add_mod(a: np.ndarray, b: np.ndarray, sign: int = 1) -> np.ndarray:
    """``a + sign * b`` on Z_{2^32} (uint32, wrapping)."""
    a, b = np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)
    with np.errstate(over="ignore"):
        return (a + b) if sign > 0 else (a - b)


def to_signed(total: np.ndarray) -> np.ndarray:
    """Z_{2^32} -> the integers in [-2^31, 2^31) (int64)."""
    v = np.asarray(total, dtype=np.uint32).astype(np.int64)
    return np.where(v >= HALF, v - MODULUS, v)


def headroom(signed: np.ndarray) -> float:
    """The largest |coordinate| of a decoded sum as a fraction of 2^31 (1 = at the wrap)."""
    return float(np.abs(signed).max() / HALF) if np.size(signed) else 0.0
