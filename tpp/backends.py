"""Compute backends of the regularizer: the same four multi-layer ops, from PyTorch, Triton or the CUDA extension.

Every backend provides, over lists of layers (weights ``[N, ...]``, sorted int64 pruned indices):

* ``gram_penalty(weights, pruned, variant, reduction) -> Tensor``: Σ_layers gram term, differentiable;
* ``add_gram_grad_(weights, grads, pruned, scale, variant, reduction)``: ``grads[i] += scale·∂gram_i/∂W_i``;
* ``bn_penalty(gammas, betas, pruned) -> Tensor``: Σ_layers Σ_{j∈P} γ_j² + β_j², differentiable;
* ``add_bn_grad_(gammas, betas, gamma_grads, beta_grads, pruned, scale)``: ``grad[P] += 2·scale·v[P]``.

``resolve_backend("auto", device)`` picks Triton for CUDA tensors when it is importable, else PyTorch;
the environment variable ``TPP_BACKEND`` overrides the requested name.

``Backend.plan(grams, squares, ...)`` builds what the regularizer calls every step: the Triton backend's fused
:class:`tpp_kernels.plan.PenaltyPlan` (decorrelate variant), otherwise a :class:`LoopPlan` over the four ops above.
A term is ``(tensor, pruned, segments, segment_length)``: ``tensor`` read as ``[segments, units, length]`` in memory
order (``segment_length=0``: one segment, whole rows; a class token ``[1, 1, C]`` is one segment of length 1).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor

from tpp_kernels import reference

BACKENDS = ("auto", "torch", "triton", "cuda")

__all__ = ["BACKENDS", "Backend", "LoopPlan", "resolve_backend", "TORCH_BACKEND"]


Term = Tuple[Tensor, Tensor, int, int]


def _unit_rows(term: Term, t: Tensor) -> Tensor:
    """``t`` (the term's tensor or its gradient) as ``[units, segments·length]`` (a copy if segments > 1)."""
    tensor, _, segments, length = term
    if not length:
        return t
    return t.view(segments, -1, length).transpose(0, 1).reshape(t.numel() // (segments * length), -1)


def _indexed(term: Term, t: Tensor) -> Tuple[Tensor, int]:
    """``t`` and the dim indexing units: ``(t, 0)``, or ``t`` viewed ``[segments, units, length]`` and 1."""
    _, _, segments, length = term
    return (t, 0) if not length else (t.view(segments, -1, length), 1)


def _grad_of(t: Tensor) -> Tensor:
    if t.grad is None:
        t.grad = torch.zeros_like(t)
    return t.grad


class LoopPlan:
    """The penalty of :class:`tpp_kernels.plan.PenaltyPlan` (same arguments, same value and gradients) through a
    backend's multi-layer gram ops and PyTorch index ops: the torch and cuda backends, and the diagonal variant."""

    def __init__(self, backend: "Backend", grams: Sequence[Term], squares: Sequence[Term], *, gram_weight: float,
                 l2_weight: float, mean: bool, variant: str = "decorrelate"):
        self.backend, self.grams, self.squares = backend, list(grams), list(squares)
        self.gram_weight, self.l2_weight = gram_weight, l2_weight
        self.reduction, self.variant = "mean" if mean else "sum", variant
        self.device = (self.grams or self.squares)[0][0].device

    def _square_terms(self) -> List[Term]:
        return self.grams * bool(self.l2_weight) + self.squares

    @staticmethod
    def _pruned_entries(term: Term, t: Tensor) -> Tensor:
        view, dim = _indexed(term, t)
        rows = view.index_select(dim, term[1])
        return rows.to(reference.accumulation_dtype(rows.dtype))

    def penalty(self, strength: Tensor) -> Tensor:
        dtype = reference.accumulation_dtype((self.grams or self.squares)[0][0].dtype)
        total = torch.zeros((), dtype=dtype, device=self.device)
        if self.gram_weight and self.grams:
            gram = self.backend.gram_penalty([_unit_rows(t, t[0]) for t in self.grams], [t[1] for t in self.grams],
                                             self.variant, self.reduction)
            total = total + self.gram_weight * gram
        squares = [self._pruned_entries(t, t[0]).square().sum() for t in self._square_terms()]
        if squares:
            total = total + 0.5 * torch.stack(squares).sum()
        return (strength * total).to(dtype)

    @torch.no_grad()
    def add_grads_(self, strength: Tensor) -> None:
        if self.gram_weight and self.grams:
            scale = strength * self.gram_weight
            dense = [t for t in self.grams if t[2] == 1]
            if dense:
                self.backend.add_gram_grad_([t[0] for t in dense], [_grad_of(t[0]) for t in dense],
                                            [t[1] for t in dense], scale, self.variant, self.reduction)
            for term in self.grams:  # units spread over segments: through a [units, segments·length] copy
                if term[2] > 1:
                    rows = _unit_rows(term, term[0])
                    grad = torch.zeros_like(rows)
                    self.backend.add_gram_grad_([rows], [grad], [term[1]], scale, self.variant, self.reduction)
                    tensor, _, segments, length = term
                    _grad_of(tensor).view(segments, -1, length).add_(
                        grad.view(-1, segments, length).transpose(0, 1))
        for term in self._square_terms():
            view, dim = _indexed(term, _grad_of(term[0]))
            view.index_add_(dim, term[1], (self._pruned_entries(term, term[0]) * strength).to(view.dtype))


@dataclass(frozen=True)
class Backend:
    name: str
    gram_penalty: Callable[..., Tensor]
    add_gram_grad_: Callable[..., None]
    bn_penalty: Callable[..., Tensor]
    add_bn_grad_: Callable[..., None]

    def plan(self, grams: Sequence[Term], squares: Sequence[Term], *, gram_weight: float, l2_weight: float,
             mean: bool, variant: str = "decorrelate"):
        """The penalty of ``grams`` (gram term + ``l2_weight``·½‖W_P‖²) and ``squares`` (½‖x_P‖²), times a
        strength tensor: an object with ``penalty(strength) -> Tensor`` and ``add_grads_(strength)``."""
        if self.name == "triton" and variant == "decorrelate":
            from tpp_kernels.plan import PenaltyPlan, Rows

            return PenaltyPlan([Rows(*t) for t in grams], [Rows(*t) for t in squares], gram_weight=gram_weight,
                               l2_weight=l2_weight, mean=mean)
        return LoopPlan(self, grams, squares, gram_weight=gram_weight, l2_weight=l2_weight, mean=mean,
                        variant=variant)


def _torch_gram_penalty(weights: Sequence[Tensor], pruned: Sequence[Tensor], variant: str, reduction: str) -> Tensor:
    terms = [reference.gram_penalty(w, p, variant, reduction) for w, p in zip(weights, pruned)]
    return torch.stack(terms).sum()


@torch.no_grad()
def _torch_add_gram_grad_(weights, grads, pruned, scale, variant: str, reduction: str) -> None:
    for w, g, p in zip(weights, grads, pruned):
        g.add_((reference.gram_penalty_grad_fp32(w, p, variant, reduction) * scale).to(g.dtype).view_as(g))


def _torch_bn_penalty(gammas, betas, pruned) -> Tensor:
    return torch.stack([reference.bn_penalty(g, b, p) for g, b, p in zip(gammas, betas, pruned)]).sum()


@torch.no_grad()
def _torch_add_bn_grad_(gammas, betas, gamma_grads, beta_grads, pruned, scale) -> None:
    for values, grads in ((gammas, gamma_grads), (betas, beta_grads)):
        for v, g, p in zip(values, grads, pruned):
            if v is not None:
                v_p = v.index_select(0, p)
                g.index_add_(0, p, (v_p.to(reference.accumulation_dtype(v_p.dtype)) * (2 * scale)).to(g.dtype))


TORCH_BACKEND = Backend("torch", _torch_gram_penalty, _torch_add_gram_grad_, _torch_bn_penalty, _torch_add_bn_grad_)


def _module_backend(name: str, module: str) -> Backend:
    ops = importlib.import_module(module)
    return Backend(name, ops.gram_penalty_multi, ops.add_gram_penalty_grad_, ops.bn_penalty, ops.add_bn_penalty_grad_)


def _triton_available() -> bool:
    try:
        importlib.import_module("tpp_kernels.gram")
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend for ``name`` (overridden by ``$TPP_BACKEND``) and parameters on ``device``."""
    name = os.environ.get("TPP_BACKEND", name) or "auto"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (argument or $TPP_BACKEND), got {name!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "torch":
        return TORCH_BACKEND
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), "
                             f"the model's parameters are on {device}")
        try:
            return _module_backend("triton", "tpp_kernels")
        except ImportError as e:
            raise ValueError(f"backend 'triton' is unavailable: {e}. Install triton>=3.2 or use backend='torch'") \
                from e
    try:
        return _module_backend("cuda", "tpp_kernels.cuda")
    except ImportError as e:
        raise ValueError(f"backend 'cuda' is unavailable: {e}. Build the extension with TPP_BUILD_CUDA=1 "
                         f"or use backend='torch'") from e
