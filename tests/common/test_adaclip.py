"""AdaCliP's update rule (common.adaclip) against a naive per-coordinate loop of its
formulas (Pichapati et al. 2019; DESIGN.md §2 Phase 2 step 6)."""

from __future__ import annotations

import math

import pytest
import torch

from common import privacy
from common.adaclip import AdaClipStatistics


def released(values, noise_std, mask):
    # a test stands in for the mechanism: the one place allowed to mint a release
    return privacy.ReleasedGradient(values, noise_std, mask, _token=privacy._RELEASE_TOKEN)


def naive(history, *, beta1, beta2, h1, h2, rule, final_mask):
    d = len(history[0][0])
    m, s, t = [0.0] * d, [0.0] * d, [0] * d
    for g, std, mask in history:
        for j in range(d):
            if mask is not None and not mask[j]:
                continue
            t[j] += 1
            m[j] = beta1 * m[j] + (1 - beta1) * float(g[j])
            m_hat = m[j] / (1 - beta1 ** t[j])
            v = (float(g[j]) - m_hat) ** 2 - float(std[j]) ** 2
            s[j] = beta2 * s[j] + (1 - beta2) * min(max(v, h1), h2)
    center = [m[j] / (1 - beta1 ** t[j]) if t[j] else 0.0 for j in range(d)]
    s_hat = [s[j] / (1 - beta2 ** t[j]) if t[j] else None for j in range(d)]
    power = 0.25 if rule == "optimal" else 0.5
    w = [max(x, h1) ** power if x is not None else None for x in s_hat]
    active = [True] * d if final_mask is None else [bool(x) for x in final_mask]
    known_active = [w[j] for j in range(d) if w[j] is not None and active[j]]
    fill = sum(known_active) / len(known_active) if known_active else 1.0
    w = [fill if x is None else x for x in w]
    rms = math.sqrt(sum(w[j] ** 2 for j in range(d) if active[j]) / sum(active))
    return center, [x / rms for x in w]


@pytest.mark.parametrize("rule", ["optimal", "sqrt"])
def test_statistics_follow_the_formulas_with_masks(rule):
    gen = torch.Generator().manual_seed(0)
    d, hp = 9, dict(beta1=0.9, beta2=0.8, h1=1e-6, h2=5.0)
    masks = [None, None, torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)] * 3
    masks[-1] = torch.tensor([1, 1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    history = []
    stats = AdaClipStatistics(d, scale_rule=rule, **hp)
    for mask in masks:
        g = torch.randn(d, generator=gen) * 3
        std = torch.rand(d, generator=gen) * 0.5
        if mask is not None:
            g, std = g * mask, std * mask
        history.append((g, std, mask))
        stats.update_from_released(released(g, std, mask))
    final_mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)  # coordinate 7 frozen at the end
    center, scale = naive(history, rule=rule, final_mask=final_mask, **hp)
    torch.testing.assert_close(stats.center(), torch.tensor(center), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.scale(final_mask, 1.0), torch.tensor(scale), rtol=1e-5, atol=1e-6)
