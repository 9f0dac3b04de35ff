"""VGG-style nets for small images: VGG19_C for CIFAR (tpp-method.md §8) and a tiny one for 8×8 digits.

VGG19_C: 16 conv3×3+BN+ReLU, four max-pools, global average pooling, one Linear. ``digits_cnn``: the same
structure with three convs (32, 32, pool, 64) on 1×8×8 inputs, for the offline demo.

Qualified names: ``features.N`` is a Sequential of (Conv2d, BatchNorm2d, ReLU) triples and MaxPool2d layers,
``classifier`` is the Linear. Conv indices for VGG19_CFG: 0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36,
40, 43, 46, 49.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch.nn as nn
from torch import Tensor

__all__ = ["VGG19_CFG", "DIGITS_CFG", "VGGCifar", "vgg19", "digits_cnn"]

# Output channels of each conv; "M" is a 2×2 max-pool.
VGG19_CFG: tuple[Union[int, str], ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512,
)
DIGITS_CFG: tuple[Union[int, str], ...] = (32, 32, "M", 64)


class VGGCifar(nn.Module):
    """VGG with BatchNorm: ``cfg`` lists conv widths and ``"M"`` pools; global average pooling, one Linear."""

    def __init__(self, cfg: Sequence[Union[int, str]] = VGG19_CFG, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            elif isinstance(item, int) and item > 0:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(True)]
                channels = item
            else:
                raise ValueError(f"VGGCifar: cfg entries must be positive ints or 'M', got {item!r}")
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def vgg19(num_classes: int = 100) -> VGGCifar:
    """VGG19_C: the paper's CIFAR-100 VGG19."""
    return VGGCifar(VGG19_CFG, num_classes)


def digits_cnn(num_classes: int = 10) -> VGGCifar:
    """Small CNN for 1×8×8 digit images: conv-BN-ReLU ×2 (32), max-pool, conv-BN-ReLU (64), avg-pool, Linear."""
    return VGGCifar(DIGITS_CFG, num_classes, in_channels=1)
