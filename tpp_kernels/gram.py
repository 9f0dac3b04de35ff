"""Gram (decorrelation) penalty of TPP for many layers at once: kernels → launchers → ops → public functions.

Math (tpp-method.md §2). One layer: ``W ∈ R^{N×D}``, pruned rows ``P`` (|P| = p), kept rows ``K``,
``m_j = 0`` for ``j ∈ P`` else 1, ``R = W_P Wᵀ ∈ R^{p×N}``, ``s = 1/N²`` ("mean") or 1 ("sum"):

* ``L = s · Σ_{a<p, j<N} (1 + m_j) R_aj²``                       (= s‖(W Wᵀ) ⊙ (1 − m mᵀ)‖²)
* ``∂L/∂W = 4s (G ⊙ M) W``: row ``P_a`` is ``4s Σ_j R_aj W_j``; kept row ``i`` is ``4s Σ_a R_ai W_{P_a}``.

Forward: one program per ``(layer, P-row block, column block)`` tile of R gathers its pruned rows of W by index,
accumulates the tile over D in fp32, stores it (fp32, kept for the backward) and writes the tile's share of the
loss — one partial per tile, summed afterwards: deterministic, no atomics. Backward: one program per
``(layer, row block, D block)`` tile of the gradient, pruned-row tiles contracting R with W over N, kept-row tiles
contracting Rᵀ with W_P over p. The gradient is scaled by the incoming gradient read from device memory (no host
sync) and either written to a fresh buffer (autograd) or added into existing ``.grad`` tensors (``add_…_grad_``).
All layers of one dtype share a launch per stage, driven by host-built tables (``tables.py``).

Ops and torch.compile. The ops are ``torch.library.custom_op`` s — opaque to the compiler — rather than
``triton_op`` s with ``wrap_triton``. ``triton_op`` registers its implementation as the op's fake kernel and
re-traces it under ``FunctionalTensorMode``, so the implementation must run on FakeTensors; ours cannot: it reads
every layer through address offsets computed from ``data_ptr()`` and a table cache keyed on them, and FakeTensors
have no storage. Under ``TRITON_INTERPRET=1`` it could not work either: ``@triton.jit`` then returns an
``InterpretedFunction``, which ``wrap_triton`` rejects (pytorch#152868) or, since pytorch#185597, hands back
unwrapped, so a traced launch would run the interpreter on FakeTensors. An opaque op loses nothing here — there is
no neighbouring work for Inductor to fuse into a reduction over whole weight tensors — and
``torch.compile(fullgraph=True)`` still captures it without a graph break (``register_fake`` gives the output
shapes, ``register_autograd`` the backward). Kernels: on every device the Triton launcher; on CPU without the
interpreter the reference (``tpp_kernels.reference``), so the ops work on CPU tensors either way.

``variant="diagonal"`` needs the whole gram ``W Wᵀ`` (kept filters are pushed to orthonormality), which has no
pruned-rows shortcut: the public functions compute it with ``tpp_kernels.reference`` (autograd, every device).
"""
import math
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
# Every launch covers the layers of one dtype. Per layer l, `p_meta[l]` = (N, D, p, o_idx, o_r) (int64):
# `p_order[o_idx:o_idx+N]` lists the layer's rows P first then K, `p_m[o_idx:o_idx+N]` is m (int8), R lives at
# `p_r[o_r:o_r+p·N]` row-major. Weights are read at `p_w + p_ow[l] + i·D + k` (address offsets from an anchor).


@triton.jit
def _gram_fwd_kernel(
    p_w, p_ow, p_meta, p_tiles, p_order, p_m, p_r, p_part,
    MEAN: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile `p_tiles[t] = (l, a0, j0)`: R[a0:a0+BM, j0:j0+BN] of layer l, and its loss share into p_part[t].
    DOT_FP32 upcasts the operands (the interpreter has no bf16 matmul); else they keep the weight dtype."""
    i_t = tl.program_id(0)
    i_l = tl.load(p_tiles + i_t * 3)
    i_a = tl.load(p_tiles + i_t * 3 + 1)
    i_j = tl.load(p_tiles + i_t * 3 + 2)
    N = tl.load(p_meta + i_l * 5)
    D = tl.load(p_meta + i_l * 5 + 1)
    P = tl.load(p_meta + i_l * 5 + 2)
    o_idx = tl.load(p_meta + i_l * 5 + 3)
    o_r = tl.load(p_meta + i_l * 5 + 4)
    p_wl = p_w + tl.load(p_ow + i_l)

    o_a = i_a + tl.arange(0, BLOCK_M)
    m_a = o_a < P
    o_j = i_j + tl.arange(0, BLOCK_N)
    m_j = o_j < N
    o_rows = tl.load(p_order + o_idx + o_a, mask=m_a, other=0).to(tl.int64)  # P_a

    b_r = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i_k in range(0, D, BLOCK_K):
        o_k = i_k + tl.arange(0, BLOCK_K)
        m_k = o_k < D
        b_wp = tl.load(p_wl + o_rows[:, None] * D + o_k[None, :], mask=m_a[:, None] & m_k[None, :], other=0.)
        b_wt = tl.load(p_wl + o_j[None, :] * D + o_k[:, None], mask=m_k[:, None] & m_j[None, :], other=0.)
        if DOT_FP32:
            b_wp, b_wt = b_wp.to(tl.float32), b_wt.to(tl.float32)
        b_r = tl.dot(b_wp, b_wt, b_r, input_precision=INPUT_PRECISION)
    tl.store(p_r + o_r + o_a[:, None] * N + o_j[None, :], b_r, mask=m_a[:, None] & m_j[None, :])

    b_m = tl.load(p_m + o_idx + o_j, mask=m_j, other=0).to(tl.float32)
    b_loss = tl.sum(tl.sum(b_r * b_r * (1. + b_m)[None, :], axis=1), axis=0)
    if MEAN:
        b_loss = b_loss / (N * N).to(tl.float32)
    tl.store(p_part + i_t, b_loss)


@triton.jit
def _pruned_rows(p_r, p_wl, o_s, m_s, o_d, m_d, N, D,
                 INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_J: tl.constexpr):
    """Σ_j R[o_s, j] W[j, o_d] for pruned positions o_s (rows of R)."""
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i_j in range(0, N, BLOCK_J):
        o_j = i_j + tl.arange(0, BLOCK_J)
        m_j = o_j < N
        b_r = tl.load(p_r + o_s[:, None] * N + o_j[None, :], mask=m_s[:, None] & m_j[None, :], other=0.)
        b_w = tl.load(p_wl + o_j[:, None] * D + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.)
        b_acc = tl.dot(b_r, b_w.to(tl.float32), b_acc, input_precision=INPUT_PRECISION)
    return b_acc


@triton.jit
def _kept_rows(p_r, p_wl, p_order, o_rows, m_s, o_d, m_d, N, D, P,
               INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_J: tl.constexpr):
    """Σ_a R[a, o_rows] W[P_a, o_d] for kept rows o_rows (columns of R)."""
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i_b in range(0, P, BLOCK_J):
        o_b = i_b + tl.arange(0, BLOCK_J)
        m_b = o_b < P
        b_rt = tl.load(p_r + o_b[None, :] * N + o_rows[:, None], mask=m_s[:, None] & m_b[None, :], other=0.)
        o_pb = tl.load(p_order + o_b, mask=m_b, other=0).to(tl.int64)
        b_wp = tl.load(p_wl + o_pb[:, None] * D + o_d[None, :], mask=m_b[:, None] & m_d[None, :], other=0.)
        b_acc = tl.dot(b_rt, b_wp.to(tl.float32), b_acc, input_precision=INPUT_PRECISION)
    return b_acc


@triton.jit
def _gram_bwd_kernel(
    p_w, p_ow, p_out, p_oout, p_meta, p_tiles, p_order, p_r, p_scale, scale,
    MEAN: tl.constexpr, ACCUMULATE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Tile `p_tiles[t] = (l, s0, d0)`: gradient rows order[s0:s0+BM] (all in P if s0 < p, else all in K),
    columns d0:d0+BD, times `4·s·scale·p_scale` (p_scale: 0-d tensor or None), stored to or (ACCUMULATE) added
    into `p_out + p_oout[l]`."""
    i_t = tl.program_id(0)
    i_l = tl.load(p_tiles + i_t * 3)
    i_s = tl.load(p_tiles + i_t * 3 + 1)
    i_d = tl.load(p_tiles + i_t * 3 + 2)
    N = tl.load(p_meta + i_l * 5)
    D = tl.load(p_meta + i_l * 5 + 1)
    P = tl.load(p_meta + i_l * 5 + 2)
    o_idx = tl.load(p_meta + i_l * 5 + 3)
    o_r = tl.load(p_meta + i_l * 5 + 4)
    p_wl = p_w + tl.load(p_ow + i_l)

    is_pruned = i_s < P
    o_s = i_s + tl.arange(0, BLOCK_M)
    m_s = o_s < tl.where(is_pruned, P, N)
    o_rows = tl.load(p_order + o_idx + o_s, mask=m_s, other=0).to(tl.int64)
    o_d = i_d + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    if is_pruned:
        b_acc = _pruned_rows(p_r + o_r, p_wl, o_s, m_s, o_d, m_d, N, D,
                             INPUT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_J)
    else:
        b_acc = _kept_rows(p_r + o_r, p_wl, p_order + o_idx, o_rows, m_s, o_d, m_d, N, D, P,
                           INPUT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_J)

    b_scale = 4. * scale
    if p_scale is not None:
        b_scale = b_scale * tl.load(p_scale).to(tl.float32)
    if MEAN:
        b_scale = b_scale / (N * N).to(tl.float32)
    b_out = b_acc * b_scale
    p_o = p_out + tl.load(p_oout + i_l) + o_rows[:, None] * D + o_d[None, :]
    m_o = m_s[:, None] & m_d[None, :]
    if ACCUMULATE:
        b_out += tl.load(p_o, mask=m_o, other=0.).to(tl.float32)
    tl.store(p_o, b_out.to(p_out.dtype.element_ty), mask=m_o)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


class _Layout(tables.Layout):
    """Gram launch tables. ``sizes[i] = (N, D)``; ``meta[i] = (N, D, p, o_idx, o_r)`` (int64): rows P-then-K at
    ``order[o_idx:o_idx+N]`` (int32), m at ``m[o_idx:o_idx+N]``, R at ``r[o_r:o_r+p·N]`` of one fp32 buffer;
    ``o_out[i]``: offset of the layer in its dtype group's flat gradient buffer of ``out_numel[group]`` elements."""

    def __init__(self, sizes: Sequence[Tuple[int, int]], dtypes: Sequence[torch.dtype], pruned: Sequence[Tensor],
                 device: torch.device):
        super().__init__(sizes, dtypes, pruned, device)
        self.n, self.d = [n for n, _ in sizes], [d for _, d in sizes]
        orders, meta, o_r = [], [], 0
        for (n, d), p, o_idx, idx in zip(sizes, self.p, self.o_idx, pruned):
            orders += [idx.long(), self.m[o_idx:o_idx + n].nonzero().squeeze(1)]
            meta.append((n, d, p, o_idx, o_r))
            o_r += p * n
        o_out, self.out_numel = [0] * len(sizes), []
        for group in self.groups:
            o_grad = 0
            for i in group:
                o_out[i], o_grad = o_grad, o_grad + self.n[i] * self.d[i]
            self.out_numel.append(o_grad)
        self.order = torch.cat(orders).to(torch.int32)
        self.meta = torch.tensor(meta, dtype=torch.int64).to(device)
        self.o_out = torch.tensor(o_out, dtype=torch.int64).to(device)
        self.r_numel = o_r

    def signature(self, group: int) -> Tuple:
        return tuple((self.n[i], self.d[i], self.p[i]) for i in self.groups[group])

    def fwd_tiles(self, group: int, cfg: config.Config) -> Tensor:
        """(layer, first pruned position, first column) of every R tile of the group."""
        def rows():
            return [(i, a, j) for i in self.groups[group]
                    for a in range(0, self.p[i], cfg.block_rows) for j in range(0, self.n[i], cfg.block_cols)]
        return self.tiles(("fwd", group, cfg.block_rows, cfg.block_cols), rows, 3)

    def bwd_tiles(self, group: int, cfg: config.Config, unpruned_layers: bool) -> Tensor:
        """(layer, first position in P-then-K order, first column of D) of every gradient tile of the group; P and
        K rows never share a tile. Layers with p = 0 (zero gradient) are included only if ``unpruned_layers``."""
        def rows():
            out = []
            for i in self.groups[group]:
                n, d, p = self.n[i], self.d[i], self.p[i]
                if p or unpruned_layers:
                    starts = [*range(0, p, cfg.block_rows), *range(p, n, cfg.block_rows)]
                    out += [(i, s, c) for s in starts for c in range(0, d, cfg.block_cols)]
            return out
        return self.tiles(("bwd", group, cfg.block_rows, cfg.block_cols, unpruned_layers), rows, 3)


_layouts = LRU(16)


def _layout(weights: Sequence[Tensor], pruned: Sequence[Tensor]) -> _Layout:
    config.check_device(weights[0])
    sizes = [(w.shape[0], math.prod(w.shape[1:])) for w in weights]
    return tables.layout(_layouts, _Layout, sizes, [w.dtype for w in weights], pruned, weights[0].device)


def _launch_fwd(layout: _Layout, group: int, cfg: config.Config, weights: Sequence[Tensor], o_w: Tensor,
                r: Tensor, partials: Tensor, mean: bool, precision: str) -> None:
    tiles = layout.fwd_tiles(group, cfg)
    anchor = weights[layout.groups[group][0]]
    _gram_fwd_kernel[(tiles.shape[0],)](
        anchor, o_w, layout.meta, tiles, layout.order, layout.m, r, partials,
        MEAN=mean, INPUT_PRECISION=precision, DOT_FP32=config.INTERPRET and anchor.dtype == torch.bfloat16,
        BLOCK_M=cfg.block_rows, BLOCK_N=cfg.block_cols, BLOCK_K=cfg.block_red,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _gram_rows(weights: Sequence[Tensor], pruned: Sequence[Tensor], mean: bool,
               precision: str) -> Tuple[Tensor, Optional[Tensor]]:
    """(R of every layer in one flat fp32 buffer, one loss partial per tile). One launch per dtype group with a
    pruned layer; none, and no partials, if no layer is pruned."""
    layout = _layout(weights, pruned)
    r = torch.empty(layout.r_numel, dtype=torch.float32, device=weights[0].device)
    if layout.r_numel == 0:
        return r, None
    o_w = layout.offsets(weights)
    groups = [g for g, positions in enumerate(layout.groups) if any(layout.p[i] for i in positions)]

    def tune(group: int, cfg: config.Config) -> None:
        scratch = r.new_empty(layout.fwd_tiles(group, cfg).shape[0])
        _launch_fwd(layout, group, cfg, weights, o_w, r, scratch, mean, precision)

    cfgs = [config.pick("gram_fwd", (weights[layout.groups[g][0]].dtype, precision, layout.signature(g)),
                        lambda cfg, g=g: tune(g, cfg)) for g in groups]
    counts = [layout.fwd_tiles(g, cfg).shape[0] for g, cfg in zip(groups, cfgs)]
    partials = r.new_empty(sum(counts))
    for g, cfg, part in zip(groups, cfgs, partials.split(counts)):
        _launch_fwd(layout, g, cfg, weights, o_w, r, part, mean, precision)
    return r, partials


def _forward(weights: Sequence[Tensor], pruned: Sequence[Tensor], mean: bool, precision: str) -> Tuple[Tensor, Tensor]:
    """(Σ_i L_i as a float32 0-d tensor — one deterministic sum of the tile partials —, flat fp32 R)."""
    r, partials = _gram_rows(weights, pruned, mean, precision)
    if partials is None:
        return torch.zeros((), dtype=torch.float32, device=r.device), r
    return partials.sum(), r


def _backward(layout: _Layout, group: int, weights: Sequence[Tensor], r: Tensor, out: Tensor, o_out: Tensor,
              scale: float, scale_tensor: Optional[Tensor], accumulate: bool, mean: bool, precision: str) -> None:
    """For the layers of ``group``: write (or add, if ``accumulate``) ``scale·scale_tensor·∂L_i/∂W_i`` at
    ``out + o_out[i]``, ``out`` being the group's flat gradient buffer or its first ``.grad``. One launch."""
    anchor = weights[layout.groups[group][0]]
    o_w = layout.offsets(weights)

    def launch(cfg: config.Config, out: Tensor, o_out: Tensor, accumulate: bool) -> None:
        tiles = layout.bwd_tiles(group, cfg, unpruned_layers=not accumulate)
        _gram_bwd_kernel[(tiles.shape[0],)](
            anchor, o_w, out, o_out, layout.meta, tiles, layout.order, r, scale_tensor, scale,
            MEAN=mean, ACCUMULATE=accumulate, INPUT_PRECISION=precision,
            BLOCK_M=cfg.block_rows, BLOCK_D=cfg.block_cols, BLOCK_J=cfg.block_red,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def tune(cfg: config.Config) -> None:  # into a scratch buffer: tuning must not touch .grad
        launch(cfg, anchor.new_empty(layout.out_numel[group]), layout.o_out, False)

    cfg = config.pick("gram_bwd", (anchor.dtype, precision, layout.signature(group)), tune)
    launch(cfg, out, o_out, accumulate)


def _grads(grad: Tensor, weights: Sequence[Tensor], pruned: Sequence[Tensor], r: Tensor, mean: bool,
           precision: str) -> List[Tensor]:
    """``grad · ∂(Σ_i L_i)/∂W``: per dtype group, one flat buffer holding each layer's ``N·D`` gradient in its
    weight's memory order. One launch per group; none (zeros) if no layer is pruned."""
    layout = _layout(weights, pruned)
    if layout.r_numel == 0:
        return [weights[group[0]].new_zeros(numel) for group, numel in zip(layout.groups, layout.out_numel)]
    outs = [weights[group[0]].new_empty(numel) for group, numel in zip(layout.groups, layout.out_numel)]
    for g, out in enumerate(outs):
        _backward(layout, g, weights, r, out, layout.o_out, 1.0, grad, False, mean, precision)
    return outs


def _add_grads(weights: Sequence[Tensor], grads: Sequence[Tensor], pruned: Sequence[Tensor], scale: float,
               scale_tensor: Optional[Tensor], mean: bool, precision: str) -> None:
    """``grads[i] += scale·scale_tensor·∂L_i/∂W_i``: R, then the gradients — one launch each per dtype group with
    a pruned layer."""
    r, partials = _gram_rows(weights, pruned, mean, precision)
    if partials is None:
        return
    layout = _layout(weights, pruned)
    o_grads = layout.offsets(grads)
    for g, positions in enumerate(layout.groups):
        if any(layout.p[i] for i in positions):
            _backward(layout, g, weights, r, grads[positions[0]], o_grads, scale, scale_tensor, True, mean,
                      precision)


# ----------------------------------------------------------------------------------------------------------------
# Ops (on CPU without the interpreter, the kernels are tpp_kernels.reference)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tpp::gram_penalty_fwd", mutates_args=())
def _gram_penalty_fwd(weights: List[Tensor], pruned: List[Tensor], mean: bool,
                      input_precision: str) -> Tuple[Tensor, Tensor]:
    with config.on_device(weights[0]):
        return _forward(weights, pruned, mean, input_precision)


@torch.library.custom_op("tpp::gram_penalty_bwd", mutates_args=())
def _gram_penalty_bwd(grad: Tensor, weights: List[Tensor], pruned: List[Tensor], r: Tensor, mean: bool,
                      input_precision: str) -> List[Tensor]:
    with config.on_device(weights[0]):
        return _grads(grad, weights, pruned, r, mean, input_precision)


@torch.library.custom_op("tpp::gram_penalty_add_grad", mutates_args=("grads",))
def _gram_penalty_add_grad(weights: List[Tensor], grads: List[Tensor], pruned: List[Tensor], scale: float,
                           scale_tensor: Optional[Tensor], mean: bool, input_precision: str) -> None:
    with config.on_device(weights[0]):
        _add_grads(weights, grads, pruned, scale, scale_tensor, mean, input_precision)


def _groups(weights: Sequence[Tensor]) -> List[List[int]]:
    return tables.dtype_groups([w.dtype for w in weights])


@_gram_penalty_fwd.register_fake
def _(weights, pruned, mean, input_precision):
    r_numel = sum(idx.shape[0] * w.shape[0] for w, idx in zip(weights, pruned))
    return weights[0].new_empty((), dtype=torch.float32), weights[0].new_empty(r_numel, dtype=torch.float32)


@_gram_penalty_bwd.register_fake
def _(grad, weights, pruned, r, mean, input_precision):
    return [weights[g[0]].new_empty(sum(weights[i].numel() for i in g)) for g in _groups(weights)]


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
    flats = []
    for group in _groups(weights):
        flat = weights[group[0]].new_empty(sum(weights[i].numel() for i in group))
        for view, i in zip(flat_views(flat, [weights[i] for i in group]), group):
            g = reference.gram_penalty_grad_fp32(weights[i], pruned[i], "decorrelate", _reduction(mean))
            view.copy_((g * grad).reshape(view.shape))
        flats.append(flat)
    return flats


def _add_grad_reference(weights, grads, pruned, scale, scale_tensor, mean, input_precision):
    checks.index_values(weights, pruned)
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
    flats = _gram_penalty_bwd(grad_loss, weights, pruned, r, ctx.mean, ctx.input_precision)
    grads = [None] * len(weights)
    for group, flat in zip(_groups(weights), flats):
        for i, view in zip(group, flat_views(flat, [weights[i] for i in group])):
            grads[i] = view
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
    input is validated before the first launch: on error no gradient has changed.
    """
    checks.options(variant, reduction, input_precision)
    weights, pruned_idxs = checks.layers(weights, pruned_idxs, "weights", "pruned_idxs", min_dim=2)
    grads = checks.dense_like(grads, weights, "grads", "weights")
    if not weights:
        return
    scale, scale_tensor = checks.scale(scale, weights[0].device)
    if variant == "diagonal":
        checks.index_values(weights, pruned_idxs)  # every layer, before the first update
        factor = scale if scale_tensor is None else scale * scale_tensor
        for w, g, idx in zip(weights, grads, pruned_idxs):
            g.add_((reference.gram_penalty_grad_fp32(w, idx, "diagonal", reduction) * factor).reshape(g.shape))
        return
    # the kernel writes gradient rows in the weight's memory order: give each weight its gradient's layout
    weights = [w if w.stride() == g.stride() else torch.empty_like(g).copy_(w) for w, g in zip(weights, grads)]
    _gram_penalty_add_grad(weights, grads, pruned_idxs, scale, scale_tensor, reduction == "mean",
                           config.input_precision(input_precision))
