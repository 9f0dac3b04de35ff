"""Pure-PyTorch TPP penalties: the ground truth every backend is checked against.

Notation (tpp-method.md §1-2): a layer weight reshaped to ``W ∈ R^{N×D}``, pruned rows ``P`` (|P| = p),
kept rows ``K``, ``m_j = 0`` for ``j ∈ P`` else 1, ``G = W Wᵀ`` and ``M = 1 − m mᵀ``.

* decorrelate (paper eq. 3):  ``L = ‖G ⊙ M‖_F²``. Computed from ``R = W_P Wᵀ ∈ R^{p×N}`` only:
  ``L = 2‖R‖² − ‖R[:, P]‖²`` and ``∂L/∂W = 4 (G⊙M) W`` (rows P: ``4 R W``; rows K: ``4 R[:, K]ᵀ W_P``).
* diagonal (paper Fig. 2b):   ``L = ‖G − T‖_F²``, ``T = I`` with ``T_ii = 0`` for ``i ∈ P``; ``∂L/∂W = 4 (G − T) W``.
* BN (paper eq. 5):           ``L = Σ_{j∈P} γ_j² + β_j²``.

``reduction="mean"`` divides the gram terms by N² (the reference run's ``mse_loss(..., 'mean')``),
``"sum"`` does not (paper eq. 3). Half-precision weights are computed with float32 accumulation; the
returned loss is float32 (float64 for float64 weights) and gradients come back in the weight's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

VARIANTS = ("decorrelate", "diagonal")
REDUCTIONS = ("mean", "sum")

__all__ = [
    "VARIANTS",
    "REDUCTIONS",
    "check_pruned_indices",
    "gram_penalty",
    "gram_penalty_grad",
    "gram_penalty_grad_fp32",
    "accumulation_dtype",
    "decorrelation_penalty",
    "decorrelation_penalty_full",
    "decorrelation_penalty_reference_run",
    "diagonal_penalty",
    "bn_penalty",
]


def check_pruned_indices(pruned: Tensor, n: int, what: str = "pruned") -> None:
    """Raise ``TypeError``/``ValueError`` unless ``pruned`` is a 1-D integer tensor of distinct indices in [0, n)."""
    if not isinstance(pruned, Tensor):
        raise TypeError(f"{what}: expected a 1-D integer tensor of filter indices, got {type(pruned).__name__}")
    if pruned.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{what}: expected an integer tensor of filter indices, got dtype {pruned.dtype}")
    if pruned.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D tensor of filter indices, got shape {tuple(pruned.shape)}")
    if pruned.numel() == 0:
        return
    lo, hi = int(pruned.min()), int(pruned.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"{what}: filter indices must lie in [0, {n}), got min {lo} and max {hi}")
    values, counts = torch.unique(pruned, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{what}: filter indices must be distinct, got duplicates {values[counts > 1].tolist()[:10]}")


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_rows(weight: Tensor) -> Tensor:
    """``weight`` as ``[N, D]`` in its accumulation dtype."""
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims [N, ...], got shape {tuple(weight.shape)}")
    w = weight.reshape(weight.shape[0], -1)
    return w.to(accumulation_dtype(w.dtype))


def _scale(n: int, reduction: str) -> float:
    return 1.0 / (n * n) if reduction == "mean" else 1.0


def decorrelation_penalty(weight: Tensor, pruned: Tensor, reduction: str = "mean") -> Tensor:
    """``‖G⊙M‖²`` (÷N² for "mean") from the pruned rows only: ``2‖R‖² − ‖R[:,P]‖²``, ``R = W_P Wᵀ``."""
    w = _as_rows(weight)
    pruned = pruned.to(w.device)
    r = w.index_select(0, pruned) @ w.t()
    loss = 2 * r.square().sum() - r.index_select(1, pruned).square().sum()
    return loss * _scale(w.shape[0], reduction)


def decorrelation_penalty_full(weight: Tensor, pruned: Tensor, reduction: str = "mean") -> Tensor:
    """The literal form ``‖(W Wᵀ) ⊙ (1 − m mᵀ)‖²`` with the full N×N gram (for checks, not for training)."""
    w = _as_rows(weight)
    m = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    m[pruned.to(w.device)] = 0
    masked = (w @ w.t()) * (1 - torch.outer(m, m))
    return masked.square().sum() * _scale(w.shape[0], reduction)


def decorrelation_penalty_reference_run(weight: Tensor, pruned: Tensor) -> Tensor:
    """What the paper's code runs (``orth_regularization_v5``): MSE between the gram and a detached copy of it
    whose pruned rows and columns are zeroed one index at a time. Equals ``decorrelation_penalty(.., "mean")``."""
    w = _as_rows(weight)
    target = (w @ w.t()).detach()
    for x in pruned.tolist():
        target[x, :] = 0
        target[:, x] = 0
    return F.mse_loss(w @ w.t(), target, reduction="mean")


def diagonal_penalty(weight: Tensor, pruned: Tensor, reduction: str = "mean") -> Tensor:
    """``‖W Wᵀ − T‖²`` (÷N² for "mean"), ``T = I`` with ``T_ii = 0`` for pruned i (needs the full gram)."""
    w = _as_rows(weight)
    target = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    target[pruned.to(w.device), pruned.to(w.device)] = 0
    return (w @ w.t() - target).square().sum() * _scale(w.shape[0], reduction)


def gram_penalty(weight: Tensor, pruned: Tensor, variant: str = "decorrelate", reduction: str = "mean") -> Tensor:
    """The gram term of one layer, differentiable; ``variant`` in ``VARIANTS``, ``reduction`` in ``REDUCTIONS``."""
    _check_choice(variant, VARIANTS, "variant")
    _check_choice(reduction, REDUCTIONS, "reduction")
    if variant == "decorrelate":
        return decorrelation_penalty(weight, pruned, reduction)
    return diagonal_penalty(weight, pruned, reduction)


def gram_penalty_grad(weight: Tensor, pruned: Tensor, variant: str = "decorrelate",
                      reduction: str = "mean") -> Tensor:
    """Closed-form ``∂ gram_penalty / ∂ weight`` without autograd, shaped and typed like ``weight``."""
    return gram_penalty_grad_fp32(weight, pruned, variant, reduction).to(weight.dtype).reshape(weight.shape)


@torch.no_grad()
def gram_penalty_grad_fp32(weight: Tensor, pruned: Tensor, variant: str = "decorrelate",
                           reduction: str = "mean") -> Tensor:
    """``∂ gram_penalty / ∂ weight`` as ``[N, D]`` rows in the accumulation dtype (before the final cast)."""
    _check_choice(variant, VARIANTS, "variant")
    _check_choice(reduction, REDUCTIONS, "reduction")
    w = _as_rows(weight)
    pruned = pruned.to(w.device)
    scale = 4 * _scale(w.shape[0], reduction)
    if variant == "decorrelate":
        w_p = w.index_select(0, pruned)
        r = w_p @ w.t()                                   # [p, N]
        grad = (r.t() @ w_p).mul_(scale)                  # rows K: 4 R[:,K]ᵀ W_P (rows P overwritten below)
        grad.index_copy_(0, pruned, (r @ w).mul_(scale))  # rows P: 4 R W
    else:
        g = w @ w.t()
        g.diagonal().sub_(1)
        g[pruned, pruned] += 1
        grad = (g @ w).mul_(scale)
    return grad


def bn_penalty(gamma: Tensor | None, beta: Tensor | None, pruned: Tensor) -> Tensor:
    """``Σ_{j∈P} γ_j² + β_j²`` of one BatchNorm (a missing γ or β contributes 0), float32 or wider."""
    present = [t for t in (gamma, beta) if t is not None]
    if not present:
        return torch.zeros((), device=pruned.device)
    total = None
    for t in present:
        v = t.index_select(0, pruned.to(t.device))
        v = v.to(accumulation_dtype(v.dtype))
        term = v.square().sum()
        total = term if total is None else total + term
    return total
