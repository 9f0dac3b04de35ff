"""BatchNorm penalty of TPP for many layers at once, as functional ops over :mod:`tpp_kernels.plan`.

Math (tpp-method.md §2, paper eq. 5): for the BatchNorm after a pruned layer, with pruned channels P,
``L_bn = Σ_{j∈P} γ_j² + β_j²`` and ``∂L_bn/∂γ_j = 2γ_j`` (``∂L_bn/∂β_j = 2β_j``) for ``j ∈ P``, 0 for kept ``j``.

Every γ and β is a squares tensor of one cached :class:`~tpp_kernels.plan.PenaltyPlan` (``½Σx²`` at strength 2,
so ``Σx²``):
one launch forward (a partial per tile, summed afterwards: deterministic), one backward writing both gradients —
or adding the pruned channels into existing ``.grad`` tensors, leaving kept channels untouched. Same op design as
gram.py (see its docstring for why the ops are opaque ``custom_op`` s).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import checks, config, reference
from .plan import PenaltyPlan, Rows, flat_layout, strength_tensor
from .tables import LRU, tensors_key

_plans = LRU(16)


def _interleave(a: Sequence, b: Sequence) -> List:
    return [x for pair in zip(a, b) for x in pair]


def _plan(gammas: Sequence[Tensor], betas: Sequence[Tensor], pruned: Sequence[Tensor]) -> Optional[PenaltyPlan]:
    """The cached plan of ``½Σ x²`` over ``[γ_0, β_0, γ_1, …]`` (None if nothing is pruned)."""
    config.check_device(gammas[0])
    if not any(idx.numel() for idx in pruned):
        checks.index_values(gammas, pruned)
        return None
    xs, idxs = _interleave(gammas, betas), _interleave(pruned, pruned)

    def build() -> PenaltyPlan:
        checks.index_values(gammas, pruned)  # errors name pruned_idxs[i]
        n = range(len(gammas))
        return PenaltyPlan([], [Rows(x, idx) for x, idx in zip(xs, idxs)], gram_weight=0.0, l2_weight=0.0,
                           mean=False, names=_interleave([f"gammas[{i}]" for i in n], [f"betas[{i}]" for i in n]),
                           grad_names=_interleave([f"gamma_grads[{i}]" for i in n], [f"beta_grads[{i}]" for i in n]))
    return _plans.get(tensors_key(xs, idxs), build)


def _layout(gammas: Sequence[Tensor], betas: Sequence[Tensor], pruned: Sequence[Tensor]):
    return flat_layout([], [(x.numel(), x.dtype, idx.shape[0])
                            for x, idx in zip(_interleave(gammas, betas), _interleave(pruned, pruned))])


# ----------------------------------------------------------------------------------------------------------------
# Ops (on CPU without the interpreter, the kernels are tpp_kernels.reference)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tpp::bn_penalty_fwd", mutates_args=())
def _bn_penalty_fwd(gammas: List[Tensor], betas: List[Tensor], pruned: List[Tensor]) -> Tensor:
    plan = _plan(gammas, betas, pruned)
    if plan is None:
        return gammas[0].new_zeros((), dtype=torch.float32)
    return plan.forward(strength_tensor(2.0, gammas[0].device))[0]


@torch.library.custom_op("tpp::bn_penalty_bwd", mutates_args=())
def _bn_penalty_bwd(grad: Tensor, gammas: List[Tensor], betas: List[Tensor], pruned: List[Tensor]) -> List[Tensor]:
    """The plan's flat gradient buffers (:func:`~tpp_kernels.plan.flat_layout`)."""
    plan = _plan(gammas, betas, pruned)
    return plan.gradients(grad, strength_tensor(2.0, grad.device), grad.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("tpp::bn_penalty_add_grad", mutates_args=("gamma_grads", "beta_grads"))
def _bn_penalty_add_grad(gammas: List[Tensor], betas: List[Tensor], gamma_grads: List[Tensor],
                         beta_grads: List[Tensor], pruned: List[Tensor], scale: float,
                         scale_tensor: Optional[Tensor]) -> None:
    plan = _plan(gammas, betas, pruned)
    if plan is not None:
        grads = _interleave(gamma_grads, beta_grads)
        plan.add_grads_(strength_tensor(2 * scale, gammas[0].device, scale_tensor), [grads[i] for i in plan.positions])


@_bn_penalty_fwd.register_fake
def _(gammas, betas, pruned):
    return gammas[0].new_empty((), dtype=torch.float32)


@_bn_penalty_bwd.register_fake
def _(grad, gammas, betas, pruned):
    return [gammas[0].new_empty(size, dtype=dtype) for size, dtype in _layout(gammas, betas, pruned)[0]]


@_bn_penalty_add_grad.register_fake
def _(gammas, betas, gamma_grads, beta_grads, pruned, scale, scale_tensor):
    return None


def _pruned_grad(x: Tensor, idx: Tensor, factor: Union[float, Tensor]) -> Tensor:
    """``factor · ∂(Σ_{j∈P} x_j²)/∂x`` in float32."""
    idx = idx.long()
    return torch.zeros_like(x, dtype=torch.float32).index_copy_(0, idx, 2 * x.index_select(0, idx).float() * factor)


def _fwd_reference(gammas, betas, pruned):
    checks.index_values(gammas, pruned)
    return sum(reference.bn_penalty(g, b, idx) for g, b, idx in zip(gammas, betas, pruned))


def _bwd_reference(grad, gammas, betas, pruned):
    checks.index_values(gammas, pruned)
    sizes, where = _layout(gammas, betas, pruned)
    flats = [gammas[0].new_zeros(size, dtype=dtype) for size, dtype in sizes]
    for x, idx, place in zip(_interleave(gammas, betas), _interleave(pruned, pruned), where):
        if place is not None:
            flats[place[0]][place[1]:place[1] + x.numel()].copy_(_pruned_grad(x, idx, grad))
    return flats


def _add_grad_reference(gammas, betas, gamma_grads, beta_grads, pruned, scale, scale_tensor):
    checks.index_values(gammas, pruned)
    n = range(len(gammas))
    checks.disjoint_outputs(_interleave(gammas, betas), _interleave(gamma_grads, beta_grads),
                            _interleave([f"gammas[{i}]" for i in n], [f"betas[{i}]" for i in n]),
                            _interleave([f"gamma_grads[{i}]" for i in n], [f"beta_grads[{i}]" for i in n]))
    factor = scale if scale_tensor is None else scale * scale_tensor
    for g, x, idx in zip(_interleave(gamma_grads, beta_grads), _interleave(gammas, betas),
                         _interleave(pruned, pruned)):
        g.add_(_pruned_grad(x, idx, factor))


if not config.INTERPRET:
    _bn_penalty_fwd.register_kernel("cpu")(_fwd_reference)
    _bn_penalty_bwd.register_kernel("cpu")(_bwd_reference)
    _bn_penalty_add_grad.register_kernel("cpu")(_add_grad_reference)


def _setup_context(ctx, inputs, output):
    gammas, betas, pruned = inputs
    ctx.save_for_backward(*gammas, *betas, *pruned)
    ctx.n_layers = len(gammas)


def _autograd_backward(ctx, grad_loss):
    n, saved = ctx.n_layers, ctx.saved_tensors
    gammas, betas, pruned = saved[:n], saved[n:2 * n], saved[2 * n:]
    xs = _interleave(gammas, betas)
    if not any(idx.shape[0] for idx in pruned):
        grads = [torch.zeros_like(x) for x in xs]
    else:
        flats = _bn_penalty_bwd(grad_loss, gammas, betas, pruned)
        grads = [torch.zeros_like(x) if place is None else flats[place[0]][place[1]:place[1] + x.numel()]
                 for x, place in zip(xs, _layout(gammas, betas, pruned)[1])]
    return grads[0::2], grads[1::2], [None] * n


_bn_penalty_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)

# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def _check(gammas, betas, pruned_idxs) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    gammas, pruned_idxs = checks.layers(gammas, pruned_idxs, "gammas", "pruned_idxs", min_dim=1, max_dim=1)
    betas = checks.like(betas, gammas, "betas", "gammas")
    return [g.contiguous() for g in gammas], [b.contiguous() for b in betas], pruned_idxs


def bn_penalty(gammas: Sequence[Tensor], betas: Sequence[Tensor], pruned_idxs: Sequence[Tensor]) -> Tensor:
    """``Σ_i Σ_{j∈P_i} γ_ij² + β_ij²``, differentiable, float32 0-d.

    ``gammas[i]``, ``betas[i]``: the 1-D weight and bias of the BatchNorm after pruned layer i (same shape, dtype
    float32/float16/bfloat16, device); ``pruned_idxs[i]``: its pruned channels. One launch forward, one backward
    per dtype, none if nothing is pruned.
    """
    gammas, betas, pruned_idxs = _check(gammas, betas, pruned_idxs)
    if not gammas:
        return torch.zeros(())
    return _bn_penalty_fwd(gammas, betas, pruned_idxs)


def add_bn_penalty_grad_(gammas: Sequence[Tensor], betas: Sequence[Tensor], gamma_grads: Sequence[Tensor],
                         beta_grads: Sequence[Tensor], pruned_idxs: Sequence[Tensor],
                         scale: Union[float, Tensor]) -> None:
    """``grad += scale · ∂L_bn/∂(γ, β)`` in place, without autograd: ``gamma_grads[i][j] += 2·scale·γ_ij`` and
    ``beta_grads[i][j] += 2·scale·β_ij`` for pruned ``j``; kept channels are not touched. The gradient of
    ``scale · bn_penalty(...)``; the reference run's ``grad += r·γ`` is ``scale = r/2``. ``scale``: python float
    or 0-d floating tensor on the device (no host sync). One launch per dtype, none if nothing is pruned; every
    input is validated before it: on error no gradient has changed; a gradient sharing memory with a γ, β or another
    gradient is refused (``ValueError``).
    """
    gammas, betas, pruned_idxs = _check(gammas, betas, pruned_idxs)
    gamma_grads = checks.dense_like(gamma_grads, gammas, "gamma_grads", "gammas")
    beta_grads = checks.dense_like(beta_grads, gammas, "beta_grads", "gammas")
    if not gammas:
        return
    scale, scale_tensor = checks.scale(scale, gammas[0].device)
    _bn_penalty_add_grad(gammas, betas, gamma_grads, beta_grads, pruned_idxs, scale, scale_tensor)
