"""ResNet for CIFAR (He et al. 2016, §4.2) with option-A shortcuts, as used by the paper (tpp-method.md §8).

``depth = 6n + 2``: a 3×3 stem conv (16 channels), three stages of ``n`` BasicBlocks with widths 16/32/64
(the first block of stages 2 and 3 has stride 2), global average pooling and one Linear. Option-A shortcut:
when a block changes shape, its input is subsampled by the stride and zero-padded in channels (no parameters).

Qualified names follow torchvision: ``conv1``/``bn1`` (stem), ``layer{1,2,3}.{i}.conv{1,2}``/``bn{1,2}``,
``layer{s}.{i}.shortcut`` and ``fc`` — so ``*layer*.conv1`` selects the first conv of every block.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PadShortcut", "BasicBlock", "ResNetCifar", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::s, ::s]`` zero-padded from ``in_channels`` to ``out_channels`` channels.

    ``pad = (before, after)`` zero channels around the input's; built split evenly (as in the original CIFAR ResNet
    code). :mod:`tpp.graph` keeps it opaque and follows the channels through it (they land at offset ``before``), so
    the residual streams it links are pruned as one unit; :func:`tpp.prune_model` then sets ``in_channels``,
    ``out_channels`` and ``pad`` to the kept channels (the split need no longer be even).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut: out_channels ({out_channels}) must be >= in_channels ({in_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad[0], self.pad[1]))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3×3 convs."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != channels:
            self.shortcut = PadShortcut(in_channels, channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet of the given ``depth`` (``6n + 2``: 20, 32, 44, 56, 110, ...) for 3×32×32 inputs."""

    widths = (16, 32, 64)

    def __init__(self, depth: int = 56, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNetCifar: depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, self.widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels = self.widths[0]
        for stage, width in enumerate(self.widths):
            layers = []
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride))
                in_channels = width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet20(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(20, num_classes)


def resnet32(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(32, num_classes)


def resnet44(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(44, num_classes)


def resnet56(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(56, num_classes)


def resnet110(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(110, num_classes)
