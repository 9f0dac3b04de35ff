"""tpp — Trainability Preserving Pruning (Wang & Fu, ICLR 2023) for PyTorch.

Public API (see README): ``TPPRegularizer``, ``GrowingSchedule``, ``select_filters``, ``analyze_model``.
Triton kernels live in the separate ``tpp_kernels`` package and are imported only when a backend needs them.
"""
from .graph import ModelGraph, analyze_model
from .regularizer import TPPRegularizer
from .schedule import GrowingSchedule
from .selection import select_filters
from .surgery import load_pruned, prune_model, save_pruned

__all__ = ["TPPRegularizer", "GrowingSchedule", "select_filters", "analyze_model", "ModelGraph", "prune_model",
           "save_pruned", "load_pruned"]
__version__ = "0.1.0"
