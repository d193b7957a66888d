"""User-model factories that must be refused before round 1 (tests/simulations/test_own_data.py)."""

from __future__ import annotations

import math

import torch
from torch import nn


def wrong_width(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))


def batchnorm(input_shape, num_classes):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes)
    )


class _Center(nn.Module):
    """Subtracts the batch mean: every example's output depends on the others."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.w


def mixing(input_shape, num_classes):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), 8), _Center(8), nn.Linear(8, num_classes)
    )
