"""The computations of the gram term that are compared, each over a list of layers (weights ``[N, ...]``, pruned
indices), reduction "mean" as the reference run:

* ``paper``          — the paper's code: full N×N gram, MSE against a detached copy whose pruned rows and columns
                       are zeroed one index at a time (``reference.decorrelation_penalty_reference_run``);
* ``masked-full``    — the full gram with a vectorized mask (``reference.decorrelation_penalty_full``);
* ``pruned-row``     — ``R = W_P Wᵀ`` only, eager PyTorch (``tpp.backends.TORCH_BACKEND``, i.e. ``backend="torch"``);
* ``compiled``       — ``torch.compile(dynamic=True)`` of the pruned-row functions (one graph for all layers);
* ``triton-layer``   — ``tpp_kernels.gram_penalty`` once per layer (the per-layer launch baseline);
* ``triton-grouped`` — ``tpp_kernels.gram_penalty_multi``: every layer in one launch per stage;
* ``triton-plan``    — ``tpp_kernels.plan.PenaltyPlan`` over the gram term: the regularizer's fast path (tables
                       built once, 128×128 R tiles, 16-byte loads);
* ``cuda``           — ``tpp_kernels.cuda.gram_penalty_multi``, the CUDA extension.

Each form has ``penalty(weights, pruned) -> loss`` (autograd; timed as "fwd" and "fwd+bwd") and, except the two
full-gram forms, ``add_grad(weights, grads, pruned)``, the in-place gradient path of ``apply_gradients``
(``grads += ∂loss/∂W``, no autograd graph; timed as "in-place"). Triton and CUDA forms run on CUDA tensors only.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from tpp import reference
from tpp.backends import TORCH_BACKEND

Layers = Sequence[Tensor]


@dataclass(frozen=True)
class Form:
    name: str
    penalty: Callable[[Layers, Layers], Tensor]
    add_grad: Optional[Callable[[Layers, Layers, Layers], None]]


def _sum_per_layer(one_layer: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Layers, Layers], Tensor]:
    return lambda weights, pruned: torch.stack([one_layer(w, p) for w, p in zip(weights, pruned)]).sum()


def _pruned_row_penalty(weights: Layers, pruned: Layers) -> Tensor:
    return TORCH_BACKEND.gram_penalty(weights, pruned, "decorrelate", "mean")


def _pruned_row_add_grad(weights: Layers, grads: Layers, pruned: Layers) -> None:
    TORCH_BACKEND.add_gram_grad_(weights, grads, pruned, 1.0, "decorrelate", "mean")


def _triton_layer_add_grad(weights: Layers, grads: Layers, pruned: Layers) -> None:
    import tpp_kernels

    for w, g, p in zip(weights, grads, pruned):
        tpp_kernels.add_gram_penalty_grad_([w], [g], [p], 1.0)


class _PlanForm:
    """The regularizer's fused plan over the gram term only (``tpp_kernels.plan``), one plan per layer list."""

    def __init__(self):
        self._plans = {}

    def _plan(self, weights: Layers, pruned: Layers):
        from tpp_kernels.plan import PenaltyPlan, Rows

        key = tuple((w.data_ptr(), p.data_ptr()) for w, p in zip(weights, pruned))
        if key not in self._plans:
            self._plans[key] = (PenaltyPlan([Rows(w, p) for w, p in zip(weights, pruned)], [], gram_weight=1.0,
                                            l2_weight=0.0, mean=True), weights[0].new_ones((), dtype=torch.float64))
        return self._plans[key]

    def penalty(self, weights: Layers, pruned: Layers) -> Tensor:
        plan, one = self._plan(weights, pruned)
        return plan.penalty(one)

    def add_grad(self, weights: Layers, grads: Layers, pruned: Layers) -> None:
        plan, one = self._plan(weights, pruned)
        plan.add_grads_(one, grads)


def _module_form(name: str, module) -> Form:
    return Form(name, module.gram_penalty_multi, lambda w, g, p: module.add_gram_penalty_grad_(w, g, p, 1.0))


@lru_cache(maxsize=None)
def load(name: str) -> Form | str:
    """The form ``name`` (one of ``NAMES``), or why it cannot run here (loaded once: the CUDA extension may build)."""
    try:
        return _load(name)
    except RuntimeError as e:
        return str(e)


def _load(name: str) -> Form:
    if name == "paper":
        return Form(name, _sum_per_layer(reference.decorrelation_penalty_reference_run), None)
    if name == "masked-full":
        return Form(name, _sum_per_layer(reference.decorrelation_penalty_full), None)
    if name == "pruned-row":
        return Form(name, _pruned_row_penalty, _pruned_row_add_grad)
    if name == "compiled":
        torch._dynamo.config.recompile_limit = 64  # one graph per layer-list structure: the suites need a few dozen
        return Form(name, torch.compile(_pruned_row_penalty, dynamic=True),
                    torch.compile(_pruned_row_add_grad, dynamic=True))
    if name in ("triton-layer", "triton-grouped"):
        try:
            import tpp_kernels
        except ImportError as e:
            raise RuntimeError(f"Triton kernels unavailable: {e}") from e
        if name == "triton-layer":
            return Form(name, _sum_per_layer(tpp_kernels.gram_penalty), _triton_layer_add_grad)
        return _module_form(name, tpp_kernels)
    if name == "triton-plan":
        from tpp_kernels import config

        if not (torch.cuda.is_available() or config.INTERPRET):
            raise RuntimeError("the plan's kernels need CUDA tensors or TRITON_INTERPRET=1 (no CPU kernel)")
        plan = _PlanForm()
        return Form(name, plan.penalty, plan.add_grad)
    if name == "cuda":
        try:
            from tpp_kernels import cuda as cuda_ops
        except (ImportError, OSError) as e:
            raise RuntimeError(f"CUDA extension unavailable: {e}") from e
        if not cuda_ops.has_cuda_kernels():
            raise RuntimeError(f"CUDA extension built without CUDA kernels ({cuda_ops.library_path})")
        return _module_form(name, cuda_ops)
    raise ValueError(f"unknown form {name!r}; known: {NAMES}")


NAMES = ("paper", "masked-full", "pruned-row", "compiled", "triton-layer", "triton-grouped", "triton-plan", "cuda")
GPU_ONLY = ("triton-layer", "triton-grouped", "triton-plan", "cuda")
FULL_GRAM = ("paper", "masked-full")  # autograd only: no in-place gradient path


def available(device: torch.device, single_layer: bool = False) -> tuple[str, ...]:
    """Forms to time on ``device``: on CPU only the PyTorch ones (Triton there needs the far slower interpreter);
    for a single layer ``triton-layer`` is left out (it is ``triton-grouped`` with one layer)."""
    names = NAMES if device.type == "cuda" else tuple(n for n in NAMES if n not in GPU_ONLY)
    return tuple(n for n in names if not (single_layer and n == "triton-layer"))
