"""VGG with BatchNorm for CIFAR-sized inputs (conv stacks, then one linear classifier)."""

from __future__ import annotations

import torch
from torch import nn

from asbatch.models.batchnorm import BatchNorm2d

# Channel counts as multiples of the first block's width; "M" is a 2x2 max pool.
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
    "vgg13": [1, 1, "M", 2, 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
    "vgg16": [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"],
    "vgg19": [1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"],
}


class VGG(nn.Module):
    def __init__(self, name: str, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG_CONFIGS[name]:
            if item == "M":
                # ceil_mode keeps a 1x1 map at 1x1, so small inputs (8x8 digits) survive five pools
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = int(item) * width
                layers += [nn.Conv2d(channels, out, 3, padding=1), BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        out = out.mean(dim=(2, 3))  # global average pool; its CUDA backward is deterministic (adaptive pool's is not)
        return self.classifier(out)


def vgg(name: str, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> VGG:
    if name not in VGG_CONFIGS:
        raise ValueError(f"unknown VGG {name!r}; choose one of {sorted(VGG_CONFIGS)}")
    return VGG(name, num_classes=num_classes, in_channels=in_channels, width=width)
