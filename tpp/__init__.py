"""tpp — Trainability Preserving Pruning (Wang & Fu, ICLR 2023) for PyTorch.

Public API (see README): the regularizer and its schedule, filter selection, the model graph, physical removal
and pruned checkpoints, the metrics, and the whole prune pipeline. Names are imported on first use (PEP 562), so
``import tpp.cli`` and ``tpp --help`` load neither torch's model code nor the pipeline; the penalty ops
(reference, Triton kernels, CUDA extension) live in the separate ``tpp_kernels`` package, imported only when a
regularizer needs them.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "TPPRegularizer": "regularizer", "GrowingSchedule": "schedule", "select_filters": "selection",
    "analyze_model": "graph", "ModelGraph": "graph", "prune_model": "surgery", "save_pruned": "pruned_files",
    "load_pruned": "pruned_files", "count_flops": "metrics", "count_params": "metrics",
    "jacobian_singular_values": "metrics", "jsv_summary": "metrics", "measure_latency": "metrics",
    "run_pruning": "pipeline", "RunConfig": "pipeline", "Recipe": "recipes", "RunIdentity": "identity",
    "inspect_model": "inspect", "search_speedup": "selection",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tpp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value          # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
