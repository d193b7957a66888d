"""Example user models for ``model = "package.module:factory"`` (docs/DATA.md, "Your model").

A factory is called as ``factory(input_shape, num_classes)`` with the schema's input shape
(``(C, H, W)`` for images, ``(columns,)`` for tables) and its number of classes, and returns
a ``torch.nn.Module`` mapping a batch to ``[batch, num_classes]`` logits. It is checked on the
server and on every silo before round 1: output shape, no layer that mixes the examples of a
batch (BatchNorm), per-sample gradients for every layer. A module inside the Flower app (as
this one) ships to every silo with ``flwr run``; otherwise install it in the image.

    model = "simulations.example_models:residual_mlp"
"""

from __future__ import annotations

import math

from torch import nn


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)  # per example: DP-safe (never BatchNorm)
        self.fc = nn.Linear(width, width)
        self.act = nn.Tanh()

    def forward(self, x):
        return x + self.fc(self.act(self.norm(x)))


def residual_mlp(
    input_shape: tuple[int, ...], num_classes: int, width: int = 32, blocks: int = 2
) -> nn.Module:
    """A small residual MLP with LayerNorm, for tables (or flattened images)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width),
        *[_Block(width) for _ in range(blocks)],
        nn.Linear(width, num_classes),
    )


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A two-convolution CNN with GroupNorm for images of any size (adaptive pooling)."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.GroupNorm(8, 32),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, num_classes),
    )
