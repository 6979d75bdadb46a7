"""CIFAR ResNets (He et al. 2016, section 4.2) with option-A shortcuts, as in the AS reference code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asbatch.models.batchnorm import BatchNorm2d


class PadShortcut(nn.Module):
    """Option A: subsample spatially by `stride` and zero-pad the channels; no parameters."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride = stride
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = PadShortcut(stride, planes - in_planes) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(width)
        stages, in_planes = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = out.mean(dim=(2, 3))  # global average pool; its CUDA backward is deterministic (adaptive pool's is not)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, width=width)
