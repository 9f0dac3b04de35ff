"""Gram (decorrelation) penalty of TPP for many layers at once, as functional ops over :mod:`tpp_kernels.plan`.

Math (tpp-method.md §2). One layer: ``W ∈ R^{N×D}``, pruned rows ``P`` (|P| = p), kept rows ``K``,
``m_j = 0`` for ``j ∈ P`` else 1, ``R = W_P Wᵀ ∈ R^{p×N}``, ``s = 1/N²`` ("mean") or 1 ("sum"):

* ``L = s · Σ_{a<p, j<N} (1 + m_j) R_aj²``                       (= s‖(W Wᵀ) ⊙ (1 − m mᵀ)‖²)
* ``∂L/∂W = 4s (G ⊙ M) W``: row ``P_a`` is ``4s Σ_j R_aj W_j``; kept row ``i`` is ``4s Σ_a R_ai W_{P_a}``.

The kernels are the plan's (one forward and one backward launch per weight dtype; see plan.py): each op builds a
:class:`~tpp_kernels.plan.PenaltyPlan` over its layers — gram terms only — once per set of tensors and pruned sets
(an LRU cache keyed on their addresses, layouts and the indices: their content on the CPU, their identity and
version on a device — :func:`~tpp_kernels.tables.pruned_key`) and runs it.

Ops and torch.compile. The ops are ``torch.library.custom_op`` s — opaque to the compiler — because a plan reads
every layer through address offsets and cannot run on FakeTensors (``triton_op`` would re-run the implementation
on them; under ``TRITON_INTERPRET=1``, ``wrap_triton`` rejects interpreted kernels, pytorch#152868).
``torch.compile(fullgraph=True)`` still captures them without a graph break (``register_fake`` gives the output
shapes from :func:`~tpp_kernels.plan.flat_layout`, ``register_autograd`` the backward). On CPU without the
interpreter the kernels are :mod:`tpp_kernels.reference`, so the ops work on CPU tensors either way.

``variant="diagonal"`` needs the whole gram ``W Wᵀ`` (kept filters are pushed to orthonormality), which has no
pruned-rows shortcut: the public functions compute it with the reference (autograd, every device).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import checks, config, reference
from .plan import PenaltyPlan, Rows, flat_layout, strength_tensor
from .tables import LRU, tensors_key

_plans = LRU(16)


def _plan(weights: Sequence[Tensor], pruned: Sequence[Tensor], mean: bool, precision: str) -> Optional[PenaltyPlan]:
    """The cached plan of the gram terms of ``weights`` (None if nothing is pruned)."""
    config.check_device(weights[0])
    if not any(idx.numel() for idx in pruned):
        checks.index_values(weights, pruned)
        return None
    def build() -> PenaltyPlan:
        checks.index_values(weights, pruned)  # errors name pruned_idxs[i]
        return PenaltyPlan([Rows(w, idx) for w, idx in zip(weights, pruned)], [], gram_weight=1.0, l2_weight=0.0,
                           mean=mean, input_precision=precision, names=[f"weights[{i}]" for i in range(len(weights))],
                           grad_names=[f"grads[{i}]" for i in range(len(weights))])
    return _plans.get((tensors_key(weights, pruned), mean, precision), build)


def _layout(weights: Sequence[Tensor], pruned: Sequence[Tensor]):
    return flat_layout([(w.numel(), w.dtype, idx.shape[0]) for w, idx in zip(weights, pruned)], [])


# ----------------------------------------------------------------------------------------------------------------
# Ops (on CPU without the interpreter, the kernels are tpp_kernels.reference)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tpp::gram_penalty_fwd", mutates_args=())
def _gram_penalty_fwd(weights: List[Tensor], pruned: List[Tensor], mean: bool,
                      input_precision: str) -> Tuple[Tensor, Tensor]:
    plan = _plan(weights, pruned, mean, input_precision)
    if plan is None:
        return weights[0].new_zeros((), dtype=torch.float32), weights[0].new_empty(0, dtype=torch.float32)
    return plan.forward(strength_tensor(1.0, weights[0].device))


@torch.library.custom_op("tpp::gram_penalty_bwd", mutates_args=())
def _gram_penalty_bwd(grad: Tensor, weights: List[Tensor], pruned: List[Tensor], r: Tensor, mean: bool,
                      input_precision: str) -> List[Tensor]:
    """The plan's flat gradient buffers (:func:`~tpp_kernels.plan.flat_layout`)."""
    return _plan(weights, pruned, mean, input_precision).gradients(grad, strength_tensor(1.0, grad.device), r)


@torch.library.custom_op("tpp::gram_penalty_add_grad", mutates_args=("grads",))
def _gram_penalty_add_grad(weights: List[Tensor], grads: List[Tensor], pruned: List[Tensor], scale: float,
                           scale_tensor: Optional[Tensor], mean: bool, input_precision: str) -> None:
    plan = _plan(weights, pruned, mean, input_precision)
    if plan is not None:
        plan.add_grads_(strength_tensor(scale, weights[0].device, scale_tensor), [grads[i] for i in plan.positions])


@_gram_penalty_fwd.register_fake
def _(weights, pruned, mean, input_precision):
    r_numel = sum(idx.shape[0] * w.shape[0] for w, idx in zip(weights, pruned))
    return weights[0].new_empty((), dtype=torch.float32), weights[0].new_empty(r_numel, dtype=torch.float32)


@_gram_penalty_bwd.register_fake
def _(grad, weights, pruned, r, mean, input_precision):
    return [weights[0].new_empty(size, dtype=dtype) for size, dtype in _layout(weights, pruned)[0]]


@_gram_penalty_add_grad.register_fake
def _(weights, grads, pruned, scale, scale_tensor, mean, input_precision):
    return None


def _reduction(mean: bool) -> str:
    return "mean" if mean else "sum"


def _fwd_reference(weights, pruned, mean, input_precision):
    checks.index_values(weights, pruned)
    loss = sum(reference.decorrelation_penalty(w, idx, _reduction(mean)) for w, idx in zip(weights, pruned))
    rows = [w.reshape(w.shape[0], -1).float() for w in weights]
    r = torch.cat([(x.index_select(0, idx) @ x.t()).reshape(-1) for x, idx in zip(rows, pruned)])
    return loss, r


def _bwd_reference(grad, weights, pruned, r, mean, input_precision):
    checks.index_values(weights, pruned)
    sizes, where = _layout(weights, pruned)
    flats = [weights[0].new_zeros(size, dtype=dtype) for size, dtype in sizes]
    for w, idx, place in zip(weights, pruned, where):
        if place is not None:
            g = reference.gram_penalty_grad_fp32(w, idx, "decorrelate", _reduction(mean)) * grad
            flats[place[0]].as_strided(w.shape, w.stride(), place[1]).copy_(g.reshape(w.shape))
    return flats


def _add_grad_reference(weights, grads, pruned, scale, scale_tensor, mean, input_precision):
    checks.index_values(weights, pruned)
    n = range(len(weights))
    checks.disjoint_outputs(weights, grads, [f"weights[{i}]" for i in n], [f"grads[{i}]" for i in n])
    factor = scale if scale_tensor is None else scale * scale_tensor
    for w, g, idx in zip(weights, grads, pruned):
        g.add_((reference.gram_penalty_grad_fp32(w, idx, "decorrelate", _reduction(mean)) * factor).reshape(g.shape))


if not config.INTERPRET:
    _gram_penalty_fwd.register_kernel("cpu")(_fwd_reference)
    _gram_penalty_bwd.register_kernel("cpu")(_bwd_reference)
    _gram_penalty_add_grad.register_kernel("cpu")(_add_grad_reference)


def _setup_context(ctx, inputs, output):
    weights, pruned, mean, input_precision = inputs
    ctx.save_for_backward(output[1], *weights, *pruned)
    ctx.n_layers, ctx.mean, ctx.input_precision = len(weights), mean, input_precision


def _autograd_backward(ctx, grad_loss, grad_r):
    r, *saved = ctx.saved_tensors
    weights, pruned = saved[:ctx.n_layers], saved[ctx.n_layers:]
    if not any(idx.shape[0] for idx in pruned):
        return [torch.zeros_like(w) for w in weights], [None] * len(pruned), None, None
    flats = _gram_penalty_bwd(grad_loss, weights, pruned, r, ctx.mean, ctx.input_precision)
    grads = [torch.zeros_like(w) if place is None else flats[place[0]].as_strided(w.shape, w.stride(), place[1])
             for w, place in zip(weights, _layout(weights, pruned)[1])]
    return grads, [None] * len(pruned), None, None


_gram_penalty_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)

# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def gram_penalty_multi(weights: Sequence[Tensor], pruned_idxs: Sequence[Tensor], variant: str = "decorrelate",
                       reduction: str = "mean", input_precision: Optional[str] = None) -> Tensor:
    """``Σ_i L_i``: the gram penalty of every layer, each reduced by its own N (``reduction="mean"``: ÷N²).

    ``weights[i]`` is ``[N, ...]`` (conv or linear weight, read as ``[N, D]``), float32/float16/bfloat16;
    ``pruned_idxs[i]`` its distinct pruned filter indices (any integer dtype, same device; p = 0 allowed).
    Differentiable; returns a float32 0-d tensor. One forward and one backward launch per weight dtype, none if no
    layer has a pruned filter. ``input_precision`` ("ieee" | "tf32") applies to fp32 dot operands; default: torch's
    fp32 matmul precision ("tf32" unless ``torch.get_float32_matmul_precision()`` is "highest"), "ieee" under the
    Triton interpreter. ``variant="diagonal"`` runs the reference (it needs the whole gram)."""
    checks.options(variant, reduction, input_precision)
    weights, pruned_idxs = checks.layers(weights, pruned_idxs, "weights", "pruned_idxs", min_dim=2)
    if not weights:
        return torch.zeros(())
    if variant == "diagonal":
        checks.index_values(weights, pruned_idxs)
        return sum(reference.diagonal_penalty(w, idx, reduction) for w, idx in zip(weights, pruned_idxs))
    weights = [w if checks.rows_dense(w) else w.contiguous() for w in weights]
    loss, _ = _gram_penalty_fwd(weights, pruned_idxs, reduction == "mean", config.input_precision(input_precision))
    return loss


def gram_penalty(weight: Tensor, pruned_idx: Tensor, variant: str = "decorrelate", reduction: str = "mean",
                 input_precision: Optional[str] = None) -> Tensor:
    """The gram penalty of one layer: ``gram_penalty_multi([weight], [pruned_idx], ...)`` (errors name the layer
    as position 0). Called once per layer, this is the per-layer launch baseline."""
    return gram_penalty_multi([weight], [pruned_idx], variant, reduction, input_precision)


def add_gram_penalty_grad_(weights: Sequence[Tensor], grads: Sequence[Tensor], pruned_idxs: Sequence[Tensor],
                           scale: Union[float, Tensor], variant: str = "decorrelate", reduction: str = "mean",
                           input_precision: Optional[str] = None) -> None:
    """``grads[i] += scale · ∂L_i/∂W_i`` in place for every layer, without autograd — the gradient of
    ``scale · gram_penalty_multi(weights, pruned_idxs, ...)``, added in fp32 and rounded once into the grad dtype.

    ``grads[i]``: same shape, dtype and device as ``weights[i]``, dense (contiguous or channels-last; e.g. the
    ``.grad`` of the weight). ``scale``: python float or 0-d floating tensor on the weights' device (read on the
    device: no host sync). Two launches per weight dtype (R, then gradients), none if no layer is pruned. Every
    input is validated before the first launch: on error no gradient has changed. A gradient sharing memory with a
    weight or another gradient is refused (``ValueError``).
    """
    checks.options(variant, reduction, input_precision)
    weights, pruned_idxs = checks.layers(weights, pruned_idxs, "weights", "pruned_idxs", min_dim=2)
    grads = checks.dense_like(grads, weights, "grads", "weights")
    if not weights:
        return
    scale, scale_tensor = checks.scale(scale, weights[0].device)
    if variant == "diagonal":
        checks.index_values(weights, pruned_idxs)  # every layer, before the first update
        checks.disjoint_outputs(weights, grads, [f"weights[{i}]" for i in range(len(weights))],
                                [f"grads[{i}]" for i in range(len(grads))])  # (the plan checks the other variant)
        factor = scale if scale_tensor is None else scale * scale_tensor
        for w, g, idx in zip(weights, grads, pruned_idxs):
            g.add_((reference.gram_penalty_grad_fp32(w, idx, "diagonal", reduction) * factor).reshape(g.shape))
        return
    # the kernels write gradient rows in the weight's memory order: give each weight its gradient's layout
    weights = [w if w.stride() == g.stride() else torch.empty_like(g).copy_(w) for w, g in zip(weights, grads)]
    _gram_penalty_add_grad(weights, grads, pruned_idxs, scale, scale_tensor, reduction == "mean",
                           config.input_precision(input_precision))
