"""A small MLP (pool to 8x8, two hidden layers) for CPU demos and tests; Bayesian like the others."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 128):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)  # any input size -> 8x8 (the digits' native size)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * 64, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pool(x))


def mlp(num_classes: int = 10, in_channels: int = 3, width: int = 128) -> MLP:
    return MLP(num_classes=num_classes, in_channels=in_channels, width=width)
