"""BatchNorm penalty of TPP for many layers at once: kernels → launchers → ops → public functions.

Math (tpp-method.md §2, paper eq. 5): for the BatchNorm after a pruned layer, with pruned channels P,
``L_bn = Σ_{j∈P} γ_j² + β_j²`` and ``∂L_bn/∂γ_j = 2γ_j`` (``∂L_bn/∂β_j = 2β_j``) for ``j ∈ P``, 0 for kept ``j``.

One program per ``(layer, channel block)`` for every layer of one dtype: the forward writes one partial per
tile (summed afterwards: deterministic), the backward writes both gradients of the tile's channels — or adds the
pruned ones into existing ``.grad`` tensors, leaving kept channels untouched. Same tables and op design as
gram.py (see its docstring for why the ops are opaque ``custom_op`` s).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import checks, config, reference, tables
from .tables import LRU, flat_views

# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
# Per layer l: `p_meta[l]` = (C, o_idx) (int64), m (int8, 0 = pruned) at `p_m[o_idx:o_idx+C]`; γ_l and β_l are
# read at `p_x + p_ox[2l]` and `p_x + p_ox[2l+1]`, their gradients written at `p_out + p_oout[2l]`, `[2l+1]`.


@triton.jit
def _bn_fwd_kernel(p_x, p_ox, p_meta, p_tiles, p_m, p_part, BLOCK_C: tl.constexpr):
    """Tile `p_tiles[t] = (l, c0)`: Σ_{c0 ≤ j < c0+BC, j∈P} γ_j² + β_j² of layer l into p_part[t]."""
    i_t = tl.program_id(0)
    i_l = tl.load(p_tiles + i_t * 2)
    i_c = tl.load(p_tiles + i_t * 2 + 1)
    C = tl.load(p_meta + i_l * 2)
    o_idx = tl.load(p_meta + i_l * 2 + 1)
    o_c = i_c + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    m_p = m_c & (tl.load(p_m + o_idx + o_c, mask=m_c, other=1) == 0)
    b_gamma = tl.load(p_x + tl.load(p_ox + 2 * i_l) + o_c, mask=m_p, other=0.).to(tl.float32)
    b_beta = tl.load(p_x + tl.load(p_ox + 2 * i_l + 1) + o_c, mask=m_p, other=0.).to(tl.float32)
    tl.store(p_part + i_t, tl.sum(b_gamma * b_gamma + b_beta * b_beta, axis=0))


@triton.jit
def _bn_grad(p_x, p_o, o_c, m_c, m_p, b_scale, ACCUMULATE: tl.constexpr):
    """p_o[o_c] = b_scale·x (0 for kept channels), or p_o[o_c] += b_scale·x on pruned channels only."""
    b_x = tl.load(p_x + o_c, mask=m_p, other=0.).to(tl.float32)
    if ACCUMULATE:
        b_o = tl.load(p_o + o_c, mask=m_p, other=0.).to(tl.float32) + b_scale * b_x
        tl.store(p_o + o_c, b_o.to(p_o.dtype.element_ty), mask=m_p)
    else:
        tl.store(p_o + o_c, (b_scale * b_x).to(p_o.dtype.element_ty), mask=m_c)


@triton.jit
def _bn_bwd_kernel(p_x, p_ox, p_out, p_oout, p_meta, p_tiles, p_m, p_scale, scale,
                   ACCUMULATE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile `p_tiles[t] = (l, c0)`: γ and β gradients of channels c0:c0+BC of layer l, times
    `2·scale·p_scale` (p_scale: 0-d tensor or None)."""
    i_t = tl.program_id(0)
    i_l = tl.load(p_tiles + i_t * 2)
    i_c = tl.load(p_tiles + i_t * 2 + 1)
    C = tl.load(p_meta + i_l * 2)
    o_idx = tl.load(p_meta + i_l * 2 + 1)
    o_c = i_c + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    m_p = m_c & (tl.load(p_m + o_idx + o_c, mask=m_c, other=1) == 0)
    b_scale = 2. * scale
    if p_scale is not None:
        b_scale = b_scale * tl.load(p_scale).to(tl.float32)
    _bn_grad(p_x + tl.load(p_ox + 2 * i_l), p_out + tl.load(p_oout + 2 * i_l), o_c, m_c, m_p, b_scale, ACCUMULATE)
    _bn_grad(p_x + tl.load(p_ox + 2 * i_l + 1), p_out + tl.load(p_oout + 2 * i_l + 1), o_c, m_c, m_p, b_scale,
             ACCUMULATE)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

# A BatchNorm has at most a few thousand channels: one fixed block, nothing to tune.
_BLOCK_C = 16 if config.INTERPRET else 1024


class _Layout(tables.Layout):
    """BN launch tables. ``sizes[i] = (C,)``; ``meta[i] = (C, o_idx)`` (int64); ``o_out[2i]``, ``o_out[2i+1]``:
    offsets of the layer's γ and β gradients in its dtype group's flat buffer ``[γ_a | β_a | γ_b | β_b | …]``
    of ``out_numel[group]`` elements."""

    def __init__(self, sizes: Sequence[Tuple[int]], dtypes: Sequence[torch.dtype], pruned: Sequence[Tensor],
                 device: torch.device):
        super().__init__(sizes, dtypes, pruned, device)
        self.c = [c for c, in sizes]
        self.meta = torch.tensor(list(zip(self.c, self.o_idx)), dtype=torch.int64).to(device)
        o_out, self.out_numel = [0] * (2 * len(sizes)), []
        for group in self.groups:
            o = 0
            for i in group:
                o_out[2 * i], o_out[2 * i + 1], o = o, o + self.c[i], o + 2 * self.c[i]
            self.out_numel.append(o)
        self.o_out = torch.tensor(o_out, dtype=torch.int64).to(device)

    def tile_table(self, group: int, unpruned_layers: bool) -> Tensor:
        """(layer, first channel) of every tile of the group; layers with p = 0 only if ``unpruned_layers``."""
        def rows():
            return [(i, c0) for i in self.groups[group] if self.p[i] or unpruned_layers
                    for c0 in range(0, self.c[i], _BLOCK_C)]
        return self.tiles((group, unpruned_layers), rows, 2)


_layouts = LRU(16)


def _layout(gammas: Sequence[Tensor], pruned: Sequence[Tensor]) -> _Layout:
    config.check_device(gammas[0])
    return tables.layout(_layouts, _Layout, [(g.numel(),) for g in gammas], [g.dtype for g in gammas], pruned,
                         gammas[0].device)


def _interleave(a: Sequence, b: Sequence) -> List:
    return [x for pair in zip(a, b) for x in pair]


def _forward(gammas: Sequence[Tensor], betas: Sequence[Tensor], pruned: Sequence[Tensor]) -> Tensor:
    """Σ_i L_bn,i as a float32 0-d tensor: one launch per dtype group with a pruned layer, one sum."""
    layout = _layout(gammas, pruned)
    groups = [g for g, positions in enumerate(layout.groups) if any(layout.p[i] for i in positions)]
    if not groups:
        return torch.zeros((), dtype=torch.float32, device=gammas[0].device)
    o_x = layout.offsets(_interleave(gammas, betas))
    tiles = [layout.tile_table(g, unpruned_layers=False) for g in groups]
    counts = [t.shape[0] for t in tiles]
    partials = torch.empty(sum(counts), dtype=torch.float32, device=gammas[0].device)
    for g, tile, part in zip(groups, tiles, partials.split(counts)):
        _bn_fwd_kernel[(tile.shape[0],)](
            gammas[layout.groups[g][0]], o_x, layout.meta, tile, layout.m, part, BLOCK_C=_BLOCK_C)
    return partials.sum()


def _backward(layout: _Layout, gammas: Sequence[Tensor], betas: Sequence[Tensor], outs: Sequence[Tensor],
              o_out: Tensor, scale: float, scale_tensor: Optional[Tensor], accumulate: bool) -> None:
    """Write (or add, if ``accumulate``) ``scale·scale_tensor·∂L_bn/∂(γ, β)`` at ``outs[group] + o_out``: one
    launch per dtype group (with a pruned layer, if ``accumulate``)."""
    o_x = layout.offsets(_interleave(gammas, betas))
    for g, out in enumerate(outs):
        tiles = layout.tile_table(g, unpruned_layers=not accumulate)
        if tiles.shape[0]:
            _bn_bwd_kernel[(tiles.shape[0],)](
                gammas[layout.groups[g][0]], o_x, out, o_out, layout.meta, tiles, layout.m, scale_tensor, scale,
                ACCUMULATE=accumulate, BLOCK_C=_BLOCK_C)


def _grads(grad: Tensor, gammas: Sequence[Tensor], betas: Sequence[Tensor], pruned: Sequence[Tensor]) -> List[Tensor]:
    """Per dtype group, the flat ``[dγ_a | dβ_a | dγ_b | …]``; no launch (zeros) if nothing is pruned."""
    layout = _layout(gammas, pruned)
    if not any(layout.p):
        return [gammas[group[0]].new_zeros(numel) for group, numel in zip(layout.groups, layout.out_numel)]
    outs = [gammas[group[0]].new_empty(numel) for group, numel in zip(layout.groups, layout.out_numel)]
    _backward(layout, gammas, betas, outs, layout.o_out, 1.0, grad, False)
    return outs


def _add_grads(gammas: Sequence[Tensor], betas: Sequence[Tensor], gamma_grads: Sequence[Tensor],
               beta_grads: Sequence[Tensor], pruned: Sequence[Tensor], scale: float,
               scale_tensor: Optional[Tensor]) -> None:
    layout = _layout(gammas, pruned)
    if any(layout.p):
        grads = _interleave(gamma_grads, beta_grads)
        outs = [grads[2 * group[0]] for group in layout.groups]
        _backward(layout, gammas, betas, outs, layout.offsets(grads), scale, scale_tensor, True)


# ----------------------------------------------------------------------------------------------------------------
# Ops (on CPU without the interpreter, the kernels are tpp_kernels.reference)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tpp::bn_penalty_fwd", mutates_args=())
def _bn_penalty_fwd(gammas: List[Tensor], betas: List[Tensor], pruned: List[Tensor]) -> Tensor:
    with config.on_device(gammas[0]):
        return _forward(gammas, betas, pruned)


@torch.library.custom_op("tpp::bn_penalty_bwd", mutates_args=())
def _bn_penalty_bwd(grad: Tensor, gammas: List[Tensor], betas: List[Tensor], pruned: List[Tensor]) -> List[Tensor]:
    with config.on_device(gammas[0]):
        return _grads(grad, gammas, betas, pruned)


@torch.library.custom_op("tpp::bn_penalty_add_grad", mutates_args=("gamma_grads", "beta_grads"))
def _bn_penalty_add_grad(gammas: List[Tensor], betas: List[Tensor], gamma_grads: List[Tensor],
                         beta_grads: List[Tensor], pruned: List[Tensor], scale: float,
                         scale_tensor: Optional[Tensor]) -> None:
    with config.on_device(gammas[0]):
        _add_grads(gammas, betas, gamma_grads, beta_grads, pruned, scale, scale_tensor)


def _groups(gammas: Sequence[Tensor]) -> List[List[int]]:
    return tables.dtype_groups([g.dtype for g in gammas])


@_bn_penalty_fwd.register_fake
def _(gammas, betas, pruned):
    return gammas[0].new_empty((), dtype=torch.float32)


@_bn_penalty_bwd.register_fake
def _(grad, gammas, betas, pruned):
    return [gammas[g[0]].new_empty(2 * sum(gammas[i].numel() for i in g)) for g in _groups(gammas)]


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
    flats = []
    for group in _groups(gammas):
        flat = gammas[group[0]].new_empty(2 * sum(gammas[i].numel() for i in group))
        xs = _interleave([gammas[i] for i in group], [betas[i] for i in group])
        for view, x, i in zip(flat_views(flat, xs), xs, _interleave(group, group)):
            view.copy_(_pruned_grad(x, pruned[i], grad))
        flats.append(flat)
    return flats


def _add_grad_reference(gammas, betas, gamma_grads, beta_grads, pruned, scale, scale_tensor):
    checks.index_values(gammas, pruned)
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
    gamma_grads, beta_grads = [None] * n, [None] * n
    for group, flat in zip(_groups(gammas), _bn_penalty_bwd(grad_loss, gammas, betas, pruned)):
        views = flat_views(flat, _interleave([gammas[i] for i in group], [betas[i] for i in group]))
        for i, dgamma, dbeta in zip(group, views[0::2], views[1::2]):
            gamma_grads[i], beta_grads[i] = dgamma, dbeta
    return gamma_grads, beta_grads, [None] * n


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
    input is validated before it: on error no gradient has changed.
    """
    gammas, betas, pruned_idxs = _check(gammas, betas, pruned_idxs)
    gamma_grads = checks.dense_like(gamma_grads, gammas, "gamma_grads", "gammas")
    beta_grads = checks.dense_like(beta_grads, gammas, "beta_grads", "gammas")
    if not gammas:
        return
    scale, scale_tensor = checks.scale(scale, gammas[0].device)
    _bn_penalty_add_grad(gammas, betas, gamma_grads, beta_grads, pruned_idxs, scale, scale_tensor)
