"""tpp — Trainability Preserving Pruning (Wang & Fu, ICLR 2023) for PyTorch.

Public API (see README): the regularizer and its schedule, filter selection, the model graph, physical removal
and pruned checkpoints, the metrics, and the whole prune pipeline. The penalty ops (reference, Triton kernels, CUDA
extension) live in the separate ``tpp_kernels`` package; its backends are imported only when a regularizer needs them.
"""
from .graph import ModelGraph, analyze_model
from .metrics import count_flops, count_params, jacobian_singular_values, jsv_summary
from .pipeline import run_pruning
from .regularizer import TPPRegularizer
from .schedule import GrowingSchedule
from .selection import select_filters
from .surgery import load_pruned, prune_model, save_pruned

__all__ = ["TPPRegularizer", "GrowingSchedule", "select_filters", "analyze_model", "ModelGraph", "prune_model",
           "save_pruned", "load_pruned", "count_flops", "count_params", "jacobian_singular_values", "jsv_summary",
           "run_pruning"]
__version__ = "0.1.0"
