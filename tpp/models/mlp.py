"""Linear MLPs: MLP-7-Linear of the paper (tpp-method.md §8) and smaller variants for the demo.

``depth`` Linear layers with biases, no activation and no normalization: ``in_features → width``,
``depth − 2`` × ``width → width``, ``width → num_classes``. The input is flattened first, so images can be fed
directly. Being linear, the input–output Jacobian is exactly ``W_depth … W_1``.
Qualified names: ``layers.0`` … ``layers.{depth-1}`` (the last one is the classifier).
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

__all__ = ["MLP", "mlp7"]


class MLP(nn.Module):
    """``depth`` Linear layers with no nonlinearity; defaults give MLP-7-Linear for 32×32 MNIST."""

    def __init__(self, in_features: int = 1024, width: int = 100, depth: int = 7, num_classes: int = 10):
        super().__init__()
        if depth < 2:
            raise ValueError(f"MLP: depth must be >= 2 (input and output layers), got {depth}")
        sizes = [in_features] + [width] * (depth - 1) + [num_classes]
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.flatten(x))


def mlp7(num_classes: int = 10, in_features: int = 1024, width: int = 100, depth: int = 7) -> MLP:
    """MLP-7-Linear: 1024→100, five 100→100, 100→10 (MNIST resized to 32×32)."""
    return MLP(in_features, width, depth, num_classes)
