"""Two small models for the embedded 1×8×8 digits whose units are not private layers (tpp-method.md §12).

* ``digits_resnet``: a residual CNN — stem conv (16), two basic blocks with identity shortcuts (16), a strided
  block with a 1×1 projection shortcut (32), global average pooling, Linear. The stem and the blocks' second convs
  form a coupled group per stage (pruned with one shared index set); the blocks' first convs are private.
* ``digits_vit``: a tiny pre-norm ViT — 2×2 patches (16 tokens) embedded to 32, a class token, learned position
  embeddings, two blocks of ``nn.MultiheadAttention`` (8 heads of 4) and an MLP (64), LayerNorm, Linear head. Its
  attention heads and MLP hidden neurons are the prunable units; the 32-wide residual stream is LayerNorm-coupled
  and refused.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DigitsResNet", "DigitsViT", "digits_resnet", "digits_vit"]


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Residual CNN for 1×8×8 inputs (module docstring)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(_Block(width, width), _Block(width, width))
        self.layer2 = _Block(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _Encoder(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsViT(nn.Module):
    """Tiny ViT for 1×8×8 inputs (module docstring)."""

    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 8, hidden: int = 64, depth: int = 2,
                 patch: int = 2, image: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(_Encoder(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def digits_resnet(num_classes: int = 10) -> DigitsResNet:
    """Residual CNN for the 8×8 digits: its residual channels are pruned as coupled groups."""
    return DigitsResNet(num_classes)


def digits_vit(num_classes: int = 10) -> DigitsViT:
    """Tiny ViT (patch 2) for the 8×8 digits: its attention heads and MLP neurons are pruned."""
    return DigitsViT(num_classes)
