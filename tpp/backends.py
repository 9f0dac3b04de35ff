"""Compute backends of the regularizer: the same four multi-layer ops, from PyTorch, Triton or the CUDA extension.

Every backend provides, over lists of layers (weights ``[N, ...]``, sorted int64 pruned indices):

* ``gram_penalty(weights, pruned, variant, reduction) -> Tensor``: Σ_layers gram term, differentiable;
* ``add_gram_grad_(weights, grads, pruned, scale, variant, reduction)``: ``grads[i] += scale·∂gram_i/∂W_i``;
* ``bn_penalty(gammas, betas, pruned) -> Tensor``: Σ_layers Σ_{j∈P} γ_j² + β_j², differentiable;
* ``add_bn_grad_(gammas, betas, gamma_grads, beta_grads, pruned, scale)``: ``grad[P] += 2·scale·v[P]``.

``resolve_backend("auto", device)`` picks Triton for CUDA tensors when it is importable, else PyTorch;
the environment variable ``TPP_BACKEND`` overrides the requested name.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from tpp_kernels import reference

BACKENDS = ("auto", "torch", "triton", "cuda")

__all__ = ["BACKENDS", "Backend", "resolve_backend", "TORCH_BACKEND"]


@dataclass(frozen=True)
class Backend:
    name: str
    gram_penalty: Callable[..., Tensor]
    add_gram_grad_: Callable[..., None]
    bn_penalty: Callable[..., Tensor]
    add_bn_grad_: Callable[..., None]


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
