"""The regularizer's launch plan: every penalty term of every layer in at most two launches per weight dtype.

A :class:`PenaltyPlan` is built once per pruned set from two lists of :class:`Rows` — parameters read as
``[segments, units, length]`` in memory order, unit ``i`` owning ``[:, i, :]``, with their pruned units ``P``:

* ``grams``: the gram term ``c·s·Σ_{a<p, j<N} (1 + m_j) R_aj²`` of each (``R = W_P Wᵀ`` over unit vectors,
  ``s = 1/N²`` for ``mean=True``) plus ``(l2/2)·‖W_P‖²``;
* ``squares``: ``½ Σ_{j∈P} ‖x_j‖²`` of each (biases, depthwise carriers, BatchNorm γ and β).

Everything is multiplied by the strength ``r``, read from a 0-d device tensor inside the kernels (no host sync,
no recompilation per value, and a captured CUDA graph sees the value of each replay). Gradients
(tpp-method.md §2): pruned unit rows ``4cs·r Σ_j R_aj W_j + l2·r·W_{P_a}``, kept rows ``4cs·r Σ_a R_ai W_{P_a}``,
squares ``r·x_j`` for ``j ∈ P``.

Launches (the kernels are in :mod:`tpp_kernels.kernels`), per dtype group (gram tensors of one dtype paired with
squares tensors of one dtype):

* forward: R tiles (stored fp32 for the backward; with the loss, one partial each) and squares tiles (one partial
  each); the loss is one sum of the partials: deterministic, no atomics;
* backward: gradient tiles of pruned rows, kept rows and squares, added into every ``.grad``
  (:meth:`PenaltyPlan.add_grads_`) or written to fresh buffers (the autograd path of :meth:`PenaltyPlan.penalty`).

Every device table is uploaded when the plan is built — per-tensor metadata with the 16-byte alignment flag, the
P-then-K row order, tile tables sorted longest program first, int64 address offsets from one anchor tensor per
dtype; a call reads the ``.grad`` addresses of its tensors and re-uploads their offsets only when one moved.
"""
import itertools
import weakref
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import checks, config, kernels
from .checks import rows_dense
from .reference import check_pruned_indices
from .tables import dtype_groups

# Launch configurations on a GPU, chosen without timing (so identical on every DDP rank): the largest tiles that
# compile for sm_90 without register spills (benchmarks/ptx_report.py), which minimize the modelled traffic
# (benchmarks/traffic.py): 128×128 R tiles, 64 gradient rows × 128 columns, 32-wide reduction chunks, 8 warps,
# 3 pipeline stages. The interpreter runs config.INTERPRETER_CONFIG's small blocks.
GPU_CONFIGS = {"fwd": config.Config(128, 128, 32, 8, 3), "bwd": config.Config(64, 128, 32, 8, 3)}


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------


class Rows(NamedTuple):
    """``tensor`` read as ``[segments, units, length]`` in memory order (``segment_length=0``: one segment, a whole
    row per unit, any dense memory format) with its pruned units ``pruned`` (distinct integer indices)."""

    tensor: Tensor
    pruned: Tensor
    segments: int = 1
    segment_length: int = 0

    @property
    def length(self) -> int:
        return self.segment_length or self.tensor.numel() // self.tensor.shape[0]

    @property
    def units(self) -> int:
        return self.tensor.numel() // (self.segments * self.length)


def _vec(t: Tensor) -> int:
    """Elements in 16 bytes."""
    return 16 // t.element_size()


def _offsets(tensors: Sequence[Tensor], anchor: Tensor) -> List[int]:
    """Element distance of each tensor from ``anchor`` (same dtype)."""
    return [(t.data_ptr() - anchor.data_ptr()) // anchor.element_size() for t in tensors]


def _flat_offsets(tensors: Sequence[Tensor]) -> Tuple[List[int], int]:
    """Consecutive offsets of ``tensors`` in one flat buffer (every element written: no gaps), and its size."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += t.numel()
    return offsets, end


def flat_layout(grams: Sequence[Tuple[int, torch.dtype, int]], squares: Sequence[Tuple[int, torch.dtype, int]]
                ) -> Tuple[List[Tuple[int, torch.dtype]], List[Optional[Tuple[int, int]]]]:
    """Where a plan over tensors described as ``(numel, dtype, p)`` puts its autograd gradients: ``(size, dtype)``
    of each flat buffer — per launch (dtype pairing), one of its gram tensors then one of its squares tensors, a
    1-element placeholder where it has none — and ``(flat, offset)`` of each tensor in ``grams + squares`` order
    (``None`` for p = 0: the plan leaves such a tensor out). Computable from shapes alone (fake tensors)."""
    kept = [[i for i, (_, _, p) in enumerate(part) if p] for part in (grams, squares)]
    groups = [[[idx[k] for k in g] for g in dtype_groups([part[i][1] for i in idx])]
              for part, idx in zip((grams, squares), kept)]
    flats, where = [], [None] * (len(grams) + len(squares))
    for g, s in itertools.zip_longest(*groups, fillvalue=[]):
        anchor = grams[g[0]][1] if g else squares[s[0]][1]  # a placeholder has the launch's anchor dtype
        for part, members, base in ((grams, g, 0), (squares, s, len(grams))):
            offset = 0
            for i in members:
                where[base + i] = (len(flats), offset)
                offset += part[i][0]
            flats.append((max(offset, 1), part[members[0]][1] if members else anchor))
    return flats, where


class _Launch:
    """One dtype pairing: gram tensors ``grams`` (one dtype) and squares tensors ``squares`` (one dtype), their
    device tables, tile tables and the R and partials regions they own."""

    def __init__(self, grams: Sequence[Rows], squares: Sequence[Rows], l2: bool, o_r: int, o_part: int,
                 fwd: config.Config, bwd: config.Config, device: torch.device):
        self.grams, self.squares, self.l2 = list(grams), list(squares), l2
        self.fwd_cfg, self.bwd_cfg = fwd, bwd
        tensors = [rows.tensor for rows in (*grams, *squares)]
        self.vec_w = _vec(grams[0].tensor) if grams else 1
        self.vec_x = _vec(squares[0].tensor) if squares else 1
        self.anchor_w = grams[0].tensor if grams else tensors[0]
        self.anchor_x = squares[0].tensor if squares else tensors[0]
        order, m, gmeta, smeta, o_idx = [], [], [], [], 0
        for rows in grams:
            n, p = rows.units, rows.pruned.numel()
            mask = torch.ones(n, dtype=torch.int8)
            mask[rows.pruned.cpu().long()] = 0
            order += [rows.pruned.cpu().long(), (mask != 0).nonzero().squeeze(1)]
            m.append(mask)
            gmeta.append([n, rows.segments, rows.length, p, o_idx, o_r, 0, 0])
            o_idx, o_r = o_idx + n, o_r + p * n
        for rows in squares:
            order.append(rows.pruned.cpu().long())
            m.append(torch.zeros(rows.pruned.numel(), dtype=torch.int8))  # unused: keeps o_idx aligned with m
            smeta.append([rows.units, rows.segments, rows.length, rows.pruned.numel(), o_idx, 0, 0, 0])
            o_idx += rows.pruned.numel()
        self.r_end = o_r
        self._gmeta, self._smeta = gmeta, smeta
        self.order = torch.cat(order).to(torch.int32).to(device)
        self.m = torch.cat(m).to(device)
        self.o_w = self._upload(_offsets([r.tensor for r in grams], self.anchor_w), device)
        self.o_x = self._upload(_offsets([r.tensor for r in squares], self.anchor_x), device)
        self.fwd_tiles_loss = self._tiles(self._fwd_rows(loss=True), device)
        self.fwd_tiles = self._tiles(self._fwd_rows(loss=False), device)
        self.bwd_tiles = self._tiles(self._bwd_rows(), device)
        self.o_part = o_part
        self.n_part = self.fwd_tiles_loss.shape[0]
        # the autograd path writes gradients into flat buffers, tensor after tensor
        self.o_gflat, self.gflat_numel = _flat_offsets([r.tensor for r in grams])
        self.o_xflat, self.xflat_numel = _flat_offsets([r.tensor for r in squares])
        self.gmeta = self._meta(gmeta, 6, self.o_gflat, self.vec_w, device)
        self.smeta = self._meta(smeta, 5, self.o_xflat, self.vec_x, device)
        self.o_gflat_t, self.o_xflat_t = self._upload(self.o_gflat, device), self._upload(self.o_xflat, device)
        self.grad_ptrs: Optional[List[int]] = None

    @staticmethod
    def _upload(values: Sequence[int], device: torch.device) -> Tensor:
        return torch.tensor(list(values) or [0], dtype=torch.int64).to(device)

    def _meta(self, rows: List[List[int]], column: int, o_out: Sequence[int], vec: int,
              device: torch.device) -> Tensor:
        """The metadata table with column ``column`` = 1 where every address of the tensor (its own, its output
        at ``o_out``) and its segment length are multiples of 16 bytes."""
        rows = [list(r) for r in rows] or [[0] * kernels.META]
        tensors = [r.tensor for r in (self.grams if column == 6 else self.squares)]
        anchor = self.anchor_w if column == 6 else self.anchor_x
        for row, t, o_t, o in zip(rows, tensors, _offsets(tensors, anchor), o_out):
            r_aligned = column == 5 or (row[0] % 4 == 0 and row[5] % 4 == 0)  # gram tensors: R rows too
            row[column] = int(row[2] % vec == 0 and o_t % vec == 0 and o % vec == 0 and r_aligned
                              and anchor.data_ptr() % 16 == 0)
        return torch.tensor(rows, dtype=torch.int32).to(device)

    def _fwd_rows(self, loss: bool) -> List[Tuple[int, ...]]:
        cfg = self.fwd_cfg
        rows = [(kernels.R_TILE, i, a, j, 0) for i, r in enumerate(self.grams)
                for a in range(0, r.pruned.numel(), cfg.block_rows) for j in range(0, r.units, cfg.block_cols)]
        if loss:
            rows += [(kernels.SQUARES, q, a, s, 0) for q, r in enumerate(self.squares)
                     for a in range(0, r.pruned.numel(), cfg.block_rows) for s in range(r.segments)]
            rows += [(kernels.GRAM_SQUARES, i, a, s, 0) for i, r in enumerate(self.grams) if self.l2
                     for a in range(0, r.pruned.numel(), cfg.block_rows) for s in range(r.segments)]
        return rows

    def _bwd_rows(self) -> List[Tuple[int, ...]]:
        cfg = self.bwd_cfg
        rows = []
        for i, r in enumerate(self.grams):
            p, n = r.pruned.numel(), r.units
            for s in range(r.segments):
                for d in range(0, r.length, cfg.block_cols):
                    rows += [(kernels.PRUNED_ROWS, i, a, s, d) for a in range(0, p, cfg.block_rows)]
                    rows += [(kernels.KEPT_ROWS, i, a, s, d) for a in range(p, n, cfg.block_rows)]
        rows += [(kernels.SQUARES, q, a, s, 0) for q, r in enumerate(self.squares)
                 for a in range(0, r.pruned.numel(), cfg.block_rows) for s in range(r.segments)]
        return rows

    def _work(self, tile: Tuple[int, ...]) -> int:
        """Elements a program streams (operand tiles over its reduction), to launch the longest first."""
        kind, i, a, b, d = tile
        if kind in (kernels.SQUARES, kernels.GRAM_SQUARES):
            rows = self.squares[i] if kind == kernels.SQUARES else self.grams[i]
            return min(self.fwd_cfg.block_rows, rows.pruned.numel() - a) * rows.length
        rows = self.grams[i]
        n, p, length = rows.units, rows.pruned.numel(), rows.length
        if kind == kernels.R_TILE:
            m, cols = min(self.fwd_cfg.block_rows, p - a), min(self.fwd_cfg.block_cols, n - b)
            return (m + cols) * rows.segments * length
        cols = min(self.bwd_cfg.block_cols, length - d)
        if kind == kernels.PRUNED_ROWS:
            return (min(self.bwd_cfg.block_rows, p - a) + cols) * n
        return (min(self.bwd_cfg.block_rows, n - a) + cols) * p

    def _tiles(self, rows: Sequence[Tuple[int, ...]], device: torch.device) -> Tensor:
        """The tile table, longest programs first (the GPU starts them in order: the short ones fill the tail)."""
        rows = sorted(rows, key=self._work, reverse=True)
        return torch.tensor(rows, dtype=torch.int32).reshape(len(rows), kernels.TILE).to(device)

    def bind_grads(self, grads: Sequence[Tensor], device: torch.device) -> None:
        """Offsets and alignment of the ``.grad`` tensors (rebuilt when one of them moved)."""
        ng = len(self.grams)
        gw, gx = grads[:ng], grads[ng:]
        self.anchor_gw = gw[0] if gw else grads[0]
        self.anchor_gx = gx[0] if gx else grads[0]
        o_gw, o_gx = _offsets(gw, self.anchor_gw), _offsets(gx, self.anchor_gx)
        self.o_gw, self.o_gx = self._upload(o_gw, device), self._upload(o_gx, device)
        aligned_w = self.anchor_gw.data_ptr() % 16 == 0
        aligned_x = self.anchor_gx.data_ptr() % 16 == 0
        self.gmeta_acc = self._meta(self._gmeta, 6, [o if aligned_w else 1 for o in o_gw], self.vec_w, device)
        self.smeta_acc = self._meta(self._smeta, 5, [o if aligned_x else 1 for o in o_gx], self.vec_x, device)


_plans: "weakref.WeakValueDictionary[int, PenaltyPlan]" = weakref.WeakValueDictionary()
_view_specs: Dict[int, Tuple] = {}  # plan id -> PenaltyPlan._view_specs()
_plan_ids = itertools.count()


class PenaltyPlan:
    """Every device table of the penalty of ``grams`` and ``squares`` (see the module docstring), built once.

    ``gram_weight`` is c, ``l2_weight`` (0 or 1) switches the gram tensors' ``½‖W_P‖²``, ``mean`` divides each gram
    term by N². Tensors must be float32/float16/bfloat16 on one device (CUDA, or CPU under ``TRITON_INTERPRET=1``),
    rows dense; empty pruned sets are dropped. Indices are validated here (a device sync), never per call.
    ``configs`` ({"fwd": …, "bwd": …}) overrides the launch configurations (the traffic model builds GPU tile tables
    on a CPU with it). ``names`` and ``grad_names`` (of ``grams + squares``, as given) name the tensors and their
    gradients in errors.
    """

    def __init__(self, grams: Sequence[Rows], squares: Sequence[Rows], *, gram_weight: float, l2_weight: float,
                 mean: bool, input_precision: Optional[str] = None,
                 configs: Optional[Dict[str, config.Config]] = None, names: Optional[Sequence[str]] = None,
                 grad_names: Optional[Sequence[str]] = None):
        names = list(names) if names is not None else [f"tensor {i}" for i in range(len(grams) + len(squares))]
        grad_names = list(grad_names) if grad_names is not None else [f"the gradient of {n}" for n in names]
        n_grams = len(grams)
        positions = [i for i, r in enumerate((*grams, *squares)) if r.pruned.numel()]
        grams = [r for r in grams if r.pruned.numel()]
        squares = [r for r in squares if r.pruned.numel()]
        everything = [*grams, *squares]
        if not everything:
            raise ValueError("a PenaltyPlan needs at least one tensor with pruned units")
        device = everything[0].tensor.device
        config.check_device(everything[0].tensor)
        for i, rows in enumerate(everything):
            _check_rows(rows, device, f"tensor {i}")
        self.device = device
        self.gram_weight, self.l2_weight, self.mean = float(gram_weight), float(l2_weight), bool(mean)
        self.precision = config.input_precision(input_precision)
        if configs is None:
            configs = {"fwd": config.INTERPRETER_CONFIG, "bwd": config.INTERPRETER_CONFIG} if config.INTERPRET \
                else GPU_CONFIGS
        fwd, bwd = configs["fwd"], configs["bwd"]
        gram_order = dtype_groups([r.tensor.dtype for r in grams])
        square_order = [[len(grams) + i for i in g] for g in dtype_groups([r.tensor.dtype for r in squares])]
        gram_groups = [[everything[i] for i in g] for g in gram_order]
        square_groups = [[everything[i] for i in g] for g in square_order]
        self.launches, o_r, o_part = [], 0, 0
        for g, s in itertools.zip_longest(gram_groups, square_groups, fillvalue=[]):
            launch = _Launch(g, s, bool(self.l2_weight), o_r, o_part, fwd, bwd, device)
            self.launches.append(launch)
            o_r, o_part = launch.r_end, o_part + launch.n_part
        self.r_numel, self.n_part = o_r, o_part
        if o_r >= 2**31:
            raise ValueError(f"the pruned rows' gram blocks need {o_r} elements, more than 2^31 - 1")
        self.tensors = [r.tensor for launch in self.launches for r in (*launch.grams, *launch.squares)]
        # self.tensors[k] is grams + squares (as given) [self.positions[k]]
        self.positions = [positions[i] for g, s in itertools.zip_longest(gram_order, square_order, fillvalue=[])
                          for i in (*g, *s)]
        self.names = [names[i] for i in self.positions]
        self.grad_names = [grad_names[i] for i in self.positions]
        self._twins = _twins([r for launch in self.launches for r in (*launch.grams, *launch.squares)],
                             [i >= n_grams for i in self.positions])
        self._r = torch.empty(self.r_numel, dtype=torch.float32, device=device)  # scratch of add_grads_
        self.id = next(_plan_ids)
        _plans[self.id] = self
        _view_specs[self.id] = self._view_specs()
        weakref.finalize(self, _view_specs.pop, self.id, None)

    # -------------------------------------------------------------- launches
    def _launch_fwd(self, launch: _Launch, tiles: Tensor, r: Tensor, partials: Optional[Tensor],
                    strength: Tensor) -> None:
        cfg = launch.fwd_cfg
        kernels.fwd_kernel[(tiles.shape[0],)](
            launch.anchor_w, launch.o_w, launch.gmeta, launch.anchor_x, launch.o_x, launch.smeta, tiles,
            launch.order, launch.m, r, partials, strength, self.gram_weight, self.l2_weight,
            LOSS=partials is not None, MEAN=self.mean, INPUT_PRECISION=self.precision,
            DOT_FP32=config.INTERPRET and launch.anchor_w.dtype == torch.bfloat16,
            VEC_W=launch.vec_w, VEC_X=launch.vec_x,
            BLOCK_M=cfg.block_rows, BLOCK_N=cfg.block_cols, BLOCK_K=cfg.block_red,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def _launch_bwd(self, launch: _Launch, r: Tensor, outs: Tuple[Tensor, Tensor, Tensor, Tensor],
                    metas: Tuple[Tensor, Tensor], strength: Tensor, grad: Optional[Tensor],
                    accumulate: bool) -> None:
        cfg = launch.bwd_cfg
        gout, o_gout, xout, o_xout = outs
        kernels.bwd_kernel[(launch.bwd_tiles.shape[0],)](
            launch.anchor_w, launch.o_w, metas[0], gout, o_gout, launch.anchor_x, launch.o_x, metas[1], xout,
            o_xout, launch.bwd_tiles, launch.order, r, strength, grad, self.gram_weight, self.l2_weight,
            ACCUMULATE=accumulate, MEAN=self.mean, INPUT_PRECISION=self.precision,
            VEC_W=launch.vec_w, VEC_X=launch.vec_x,
            BLOCK_M=cfg.block_rows, BLOCK_D=cfg.block_cols, BLOCK_J=cfg.block_red,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    # ------------------------------------------------------------------ paths
    @torch.no_grad()
    def add_grads_(self, strength: Tensor, grads: Optional[Sequence[Tensor]] = None) -> None:
        """Add the penalty's gradients at strength ``strength`` (0-d float tensor on the device) into ``grads``
        (one per tensor, laid out like it), by default the tensors' ``.grad`` (created as zeros where missing):
        two launches per dtype group."""
        if grads is None:
            grads = [t.grad for t in self.tensors]
        ptrs = [None if g is None else g.data_ptr() for g in grads]
        if ptrs != self._grad_ptrs:
            self._bind_grads(grads)
        with config.on_device(self._r):
            for launch in self.launches:
                if launch.grams:
                    self._launch_fwd(launch, launch.fwd_tiles, self._r, None, strength)
                self._launch_bwd(launch, self._r, (launch.anchor_gw, launch.o_gw, launch.anchor_gx, launch.o_gx),
                                 (launch.gmeta_acc, launch.smeta_acc), strength, None, True)

    _grad_ptrs: Optional[List[Optional[int]]] = None

    def _bind_grads(self, grads: Sequence[Optional[Tensor]]) -> None:
        """Check ``grads`` (a ``None`` becomes the tensor's new zero ``.grad``) and upload their offsets: once per
        set of gradient addresses. A gradient sharing memory with a tensor or another gradient is refused
        (:func:`~tpp_kernels.checks.disjoint_outputs`), but a squares tensor listed twice with disjoint index sets
        has one gradient for both."""
        if len(grads) != len(self.tensors):
            raise ValueError(f"{len(grads)} gradients for {len(self.tensors)} tensors")
        grads = list(grads)
        for i, (t, g) in enumerate(zip(self.tensors, grads)):
            if g is None:  # (a tensor listed twice, e.g. a BN shared by two units, gets one new .grad)
                if t.grad is None:
                    t.grad = torch.zeros_like(t)
                g = grads[i] = t.grad
            if g.shape != t.shape or g.stride() != t.stride() or g.dtype != t.dtype or g.device != t.device:
                raise ValueError(f"gradient {i} (shape {tuple(g.shape)}, strides {g.stride()}, {g.dtype}, {g.device}) "
                                 f"has another layout, dtype or device than its tensor (shape {tuple(t.shape)}, "
                                 f"strides {t.stride()}, {t.dtype}, {t.device}): gradients are added in the "
                                 "tensor's memory order")
        checks.disjoint_outputs(self.tensors, grads, self.names, self.grad_names, self._twins)
        start = 0
        for launch in self.launches:
            count = len(launch.grams) + len(launch.squares)
            launch.bind_grads(grads[start:start + count], self.device)
            start += count
        self._grad_ptrs = [g.data_ptr() for g in grads]

    def penalty(self, strength: Tensor) -> Tensor:
        """The penalty at strength ``strength`` (0-d float tensor on the device): a differentiable float32 scalar
        (one launch per dtype group and one sum; the backward one launch per dtype group)."""
        return _PenaltyFunction.apply(self.id, strength, *self.tensors)

    def forward(self, strength: Tensor) -> Tuple[Tensor, Tensor]:
        r = torch.empty(self.r_numel, dtype=torch.float32, device=self.device)
        partials = torch.empty(self.n_part, dtype=torch.float32, device=self.device)
        with config.on_device(r):
            for launch in self.launches:
                self._launch_fwd(launch, launch.fwd_tiles_loss, r,
                                 partials[launch.o_part:launch.o_part + launch.n_part], strength)
        return partials.sum(), r

    def gradients(self, grad: Tensor, strength: Tensor, r: Tensor) -> List[Tensor]:
        """Per launch, the flat gradient buffers of its gram and its squares tensors."""
        flats = []
        with config.on_device(r):
            for launch in self.launches:
                gflat = launch.anchor_w.new_empty(launch.gflat_numel) if launch.gflat_numel \
                    else launch.anchor_w.new_zeros(1)  # (no gram tensor: a placeholder, fully written)
                xflat = launch.anchor_x.new_zeros(max(launch.xflat_numel, 1))
                self._launch_bwd(launch, r, (gflat, launch.o_gflat_t, xflat, launch.o_xflat_t),
                                 (launch.gmeta, launch.smeta), strength, grad, False)
                flats += [gflat, xflat]
        return flats

    def _view_specs(self) -> Tuple[Tuple[int, Tuple[int, ...], Tuple[int, ...], int], ...]:
        """(flat buffer position, shape, strides, offset) of each tensor's gradient in the buffers of
        :meth:`gradients`: plain data, so that the autograd backward can be traced by torch.compile."""
        specs = []
        for k, launch in enumerate(self.launches):
            specs += [(2 * k, tuple(r.tensor.shape), r.tensor.stride(), o)
                      for r, o in zip(launch.grams, launch.o_gflat)]
            specs += [(2 * k + 1, tuple(r.tensor.shape), r.tensor.stride(), o)
                      for r, o in zip(launch.squares, launch.o_xflat)]
        return tuple(specs)


def strength_tensor(value: float, device: torch.device, tensor: Optional[Tensor] = None) -> Tensor:
    """``value · tensor`` as the 0-d float64 device tensor a plan reads its strength from (a fill: no copy from the
    host)."""
    out = torch.full((), value, dtype=torch.float64, device=device)
    return out if tensor is None else out * tensor


def _twins(rows: Sequence[Rows], squares: Sequence[bool]) -> List[bool]:
    """Per tensor: whether it is a squares tensor listed more than once, each time with other pruned units — its
    one gradient is then written at disjoint places by each listing (a BatchNorm carrying two concatenated units)."""
    groups: Dict[Tuple, List[int]] = {}
    for i, (r, square) in enumerate(zip(rows, squares)):
        if square:
            groups.setdefault((r.tensor.data_ptr(), tuple(r.tensor.shape), r.tensor.stride()), []).append(i)
    twins = [False] * len(rows)
    for members in groups.values():
        if len(members) > 1:
            units = torch.cat([rows[i].pruned.cpu().long() for i in members])
            if units.unique().numel() == units.numel():
                for i in members:
                    twins[i] = True
    return twins


def _check_rows(rows: Rows, device: torch.device, what: str) -> None:
    t = rows.tensor
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{what}: float32, float16 or bfloat16 expected, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, expected {device}")
    if not rows.segment_length and not rows_dense(t):
        raise ValueError(f"{what}: rows must be dense (contiguous or channels-last)")
    if t.numel() >= 2**31:
        raise ValueError(f"{what} has {t.numel()} elements; the kernels index up to 2^31 - 1")
    if rows.segment_length and (not t.is_contiguous() or t.numel() % (rows.segments * rows.length)):
        raise ValueError(f"{what}: a tensor read in {rows.segments} segments must be contiguous and a multiple of "
                         f"segments × segment_length elements")
    check_pruned_indices(rows.pruned, rows.units, what)


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------


# Registered with torch.library.Library rather than custom_op: the plan's ops take ~100 tensors, and custom_op's
# per-call Python (aliasing checks, dynamo-disable wrappers) cost more than the rest of the step's host work.
# Autograd is the plain autograd.Function below; the fake kernels give torch.compile the output shapes.
_lib = torch.library.Library("tpp", "FRAGMENT")
_lib.define("plan_penalty(int plan, Tensor strength, Tensor[] tensors) -> (Tensor, Tensor)")
_lib.define("plan_penalty_bwd(int plan, Tensor grad, Tensor strength, Tensor r, Tensor[] tensors) -> Tensor[]")


def _plan_penalty_impl(plan: int, strength: Tensor, tensors: List[Tensor]) -> Tuple[Tensor, Tensor]:
    return _plans[plan].forward(strength)


def _plan_penalty_bwd_impl(plan: int, grad: Tensor, strength: Tensor, r: Tensor, tensors: List[Tensor]) -> List[Tensor]:
    return _plans[plan].gradients(grad, strength, r)


_lib.impl("plan_penalty", _plan_penalty_impl, "CompositeExplicitAutograd")
_lib.impl("plan_penalty_bwd", _plan_penalty_bwd_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("tpp::plan_penalty", lib=_lib)
def _(plan, strength, tensors):
    return strength.new_empty((), dtype=torch.float32), strength.new_empty(_plans[plan].r_numel,
                                                                            dtype=torch.float32)


@torch.library.register_fake("tpp::plan_penalty_bwd", lib=_lib)
def _(plan, grad, strength, r, tensors):
    out = []
    for launch in _plans[plan].launches:
        out += [r.new_empty(max(launch.gflat_numel, 1), dtype=launch.anchor_w.dtype),
                r.new_empty(max(launch.xflat_numel, 1), dtype=launch.anchor_x.dtype)]
    return out


_plan_penalty = torch.ops.tpp.plan_penalty.default
_plan_penalty_bwd = torch.ops.tpp.plan_penalty_bwd.default


class _PenaltyFunction(torch.autograd.Function):
    """Autograd of the two ops (a plain ``autograd.Function``: its per-call cost stays small with ~100 inputs)."""

    @staticmethod
    def forward(ctx, plan: int, strength: Tensor, *tensors: Tensor) -> Tensor:
        loss, r = _plan_penalty(plan, strength, list(tensors))
        ctx.plan = plan
        ctx.save_for_backward(strength, r, *tensors)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        strength, r, *tensors = ctx.saved_tensors
        flats = _plan_penalty_bwd(ctx.plan, grad_loss, strength, r, tensors)
        return None, None, *(flats[k].as_strided(shape, stride, offset)
                             for k, shape, stride, offset in _view_specs[ctx.plan])
