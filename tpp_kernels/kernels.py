"""The Triton kernels of the penalty plan (:mod:`tpp_kernels.plan` builds their tables and launches them).

Two kernels, each one program per row of a tile table mixing tile kinds (first column; the others: tensor
position, first pruned/row position, segment, first column):

* :func:`fwd_kernel` — ``R_TILE``: ``R[a, j] = W_{P_a} · W_j`` over the unit vectors (segments of ``L`` elements),
  stored fp32, and with the loss its ``Σ (1 + m_j) R_aj²`` share; ``SQUARES`` / ``GRAM_SQUARES``: ``½Σ x²`` of the
  pruned units of a squares tensor / of a gram tensor (its L2 term). Loss shares are ``r ×`` partials, one per tile.
* :func:`bwd_kernel` — ``PRUNED_ROWS``: ``4cs·r Σ_j R_aj W_j + l2·r·W_{P_a}``; ``KEPT_ROWS``: ``4cs·r Σ_a R_ai
  W_{P_a}``; ``SQUARES``: ``r·x_j`` — written, or added into existing gradients.

Where a tensor's row length, offsets and R rows are multiples of 16 bytes (the metadata's ``aligned`` flag), the
kernels take a branch whose index arithmetic proves it (:func:`aligned`: ``(x // V) * V``), so loads compile to
16-byte vectors; the other branch is the same code without that proof, unpipelined (its 4-byte copies would hold
the registers of every path).
"""
import triton
import triton.language as tl

R_TILE, SQUARES, PRUNED_ROWS, KEPT_ROWS, GRAM_SQUARES = 0, 1, 2, 3, 4
TILE = 5  # ints per tile row
# Per gram tensor ``p_gmeta[l]`` = (N, S, L, p, o_idx, o_r, aligned, 0); per squares tensor ``p_smeta[q]`` =
# (N, S, L, p, o_idx, aligned, 0, 0), int32 (index arithmetic stays 32-bit: every tensor and the R buffer hold
# fewer than 2^31 elements; tensors are addressed as an anchor pointer plus an int64 offset).
# ``p_order[o_idx:o_idx+N]`` lists P then K (squares: P only), ``p_m`` is m.
META = 8



@triton.jit
def aligned(x, V: tl.constexpr):
    """``x`` itself for a multiple of ``V``, written so that the compiler can prove it."""
    return (x // V) * V


@triton.jit
def _r_tile(p_wl, o_rows, m_a, o_j, m_j, N, S, L,
            INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """R[a, j] for pruned positions a and units j, over the S segments of length L (loads pipelined in STAGES
    stages; None: the launch's num_stages)."""
    b_r = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i_s in range(0, S):
        p_s = p_wl + i_s * N * L
        for i_k in tl.range(0, L, BLOCK_K, num_stages=STAGES):
            o_k = i_k + tl.arange(0, BLOCK_K)
            m_k = o_k < L
            b_wp = tl.load(p_s + o_rows[:, None] * L + o_k[None, :], mask=m_a[:, None] & m_k[None, :], other=0.)
            b_w = tl.load(p_s + o_j[:, None] * L + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0.)
            if DOT_FP32:
                b_wp, b_w = b_wp.to(tl.float32), b_w.to(tl.float32)
            # both operands K-major (tf32 tensor-core dots read no other layout from shared memory)
            b_r = tl.dot(b_wp, tl.trans(b_w), b_r, input_precision=INPUT_PRECISION)
    return b_r


@triton.jit
def _squares_tile(p_xl, o_rows, m_a, i_s, N, L, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ x² over segment i_s of the given units."""
    b_sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    p_s = p_xl + i_s * N * L
    for i_k in range(0, L, BLOCK_K):
        o_k = i_k + tl.arange(0, BLOCK_K)
        b_x = tl.load(p_s + o_rows[:, None] * L + o_k[None, :], mask=m_a[:, None] & (o_k < L)[None, :], other=0.)
        b_sq += b_x.to(tl.float32) * b_x.to(tl.float32)
    return tl.sum(tl.sum(b_sq, axis=1), axis=0)


@triton.jit
def fwd_kernel(p_w, p_ow, p_gmeta, p_x, p_ox, p_smeta, p_tiles, p_order, p_m, p_r, p_part, p_strength,
                gram_weight, l2_weight,
                LOSS: tl.constexpr, MEAN: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                VEC_W: tl.constexpr, VEC_X: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile ``(kind, l, a0, b, 0)``: an R tile (kind R_TILE, columns b…), a squares tile (kind SQUARES, segment b)
    or the squares of a gram tensor's pruned rows (kind GRAM_SQUARES, segment b, times l2_weight); with LOSS,
    ``r ×`` its loss share into ``p_part[t]``."""
    i_t = tl.program_id(0)
    kind = tl.load(p_tiles + i_t * 5)
    i_l = tl.load(p_tiles + i_t * 5 + 1)
    i_a = tl.load(p_tiles + i_t * 5 + 2)
    i_b = tl.load(p_tiles + i_t * 5 + 3)
    o_a = i_a + tl.arange(0, BLOCK_M)
    if kind == 0:
        p_meta = p_gmeta + i_l * 8
        N = tl.load(p_meta)
        S = tl.load(p_meta + 1)
        L = tl.load(p_meta + 2)
        P = tl.load(p_meta + 3)
        o_idx = tl.load(p_meta + 4)
        o_r = tl.load(p_meta + 5)
        o_w = tl.load(p_ow + i_l)
        m_a = o_a < P
        o_j = aligned(i_b, BLOCK_N) + tl.arange(0, BLOCK_N)
        m_j = o_j < N
        o_rows = tl.load(p_order + o_idx + o_a, mask=m_a, other=0)
        if tl.load(p_meta + 6) != 0:
            b_r = _r_tile(p_w + aligned(o_w, VEC_W), o_rows, m_a, o_j, m_j, N, S, aligned(L, VEC_W),
                          INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K, None)
            N_v = aligned(N, 4)
            tl.store(p_r + aligned(o_r, 4) + o_a[:, None] * N_v + o_j[None, :], b_r,
                     mask=m_a[:, None] & (o_j < N_v)[None, :])
        else:
            b_r = _r_tile(p_w + o_w, o_rows, m_a, o_j, m_j, N, S, L,  # (unaligned: unpipelined, few registers)
                          INPUT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_K, 1)
            tl.store(p_r + o_r + o_a[:, None] * N + o_j[None, :], b_r, mask=m_a[:, None] & m_j[None, :])
        if LOSS:
            b_m = tl.load(p_m + o_idx + o_j, mask=m_j, other=0).to(tl.float32)
            b_loss = tl.sum(tl.sum(b_r * b_r * (1. + b_m)[None, :], axis=1), axis=0) * gram_weight
            if MEAN:
                b_loss = b_loss / (N * N).to(tl.float32)
            tl.store(p_part + i_t, b_loss * tl.load(p_strength).to(tl.float32))
    elif kind == 1:
        b_sq = _squares_of(p_x, tl.load(p_ox + i_l), p_smeta + i_l * 8, 5, p_order, o_a, i_b, VEC_X, BLOCK_M, BLOCK_K)
        if LOSS:  # (squares tiles are in the loss tables only)
            tl.store(p_part + i_t, 0.5 * b_sq * tl.load(p_strength).to(tl.float32))
    else:
        b_sq = _squares_of(p_w, tl.load(p_ow + i_l), p_gmeta + i_l * 8, 6, p_order, o_a, i_b, VEC_W, BLOCK_M, BLOCK_K)
        if LOSS:
            tl.store(p_part + i_t, 0.5 * l2_weight * b_sq * tl.load(p_strength).to(tl.float32))


@triton.jit
def _squares_of(p_t, o_t, p_meta, ALIGNED: tl.constexpr, p_order, o_a, i_s, VEC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ x² over segment i_s of the pruned units at positions o_a of the tensor at ``p_t + o_t`` whose metadata
    row (N, S, L, p, o_idx, …) is at ``p_meta``, column ``ALIGNED`` its alignment flag."""
    N = tl.load(p_meta)
    L = tl.load(p_meta + 2)
    m_a = o_a < tl.load(p_meta + 3)
    o_rows = tl.load(p_order + tl.load(p_meta + 4) + o_a, mask=m_a, other=0)
    if tl.load(p_meta + ALIGNED) != 0:
        b_sq = _squares_tile(p_t + aligned(o_t, VEC), o_rows, m_a, i_s, N, aligned(L, VEC), BLOCK_M, BLOCK_K)
    else:
        b_sq = _squares_tile(p_t + o_t, o_rows, m_a, i_s, N, L, BLOCK_M, BLOCK_K)
    return b_sq


@triton.jit
def _pruned_rows(p_r, p_wl, o_s, m_s, o_d, m_d, N, L, INPUT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, STAGES: tl.constexpr):
    """Σ_j R[o_s, j] W[j, o_d] (``p_wl``: the segment's first element; rows L apart)."""
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i_j in tl.range(0, N, BLOCK_J, num_stages=STAGES):
        o_j = i_j + tl.arange(0, BLOCK_J)
        m_j = o_j < N
        b_r = tl.load(p_r + o_s[:, None] * N + o_j[None, :], mask=m_s[:, None] & m_j[None, :], other=0.)
        b_w = tl.load(p_wl + o_j[:, None] * L + o_d[None, :], mask=m_j[:, None] & m_d[None, :], other=0.)
        b_acc = tl.dot(b_r, b_w.to(tl.float32), b_acc, input_precision=INPUT_PRECISION)
    return b_acc


@triton.jit
def _kept_rows(p_r, p_wl, p_order, o_rows, m_s, o_d, m_d, N, L, P, INPUT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, STAGES: tl.constexpr):
    """Σ_a R[a, o_rows] W[P_a, o_d] for kept units o_rows (columns of R)."""
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i_b in tl.range(0, P, BLOCK_J, num_stages=STAGES):
        o_b = i_b + tl.arange(0, BLOCK_J)
        m_b = o_b < P
        b_rt = tl.load(p_r + o_b[None, :] * N + o_rows[:, None], mask=m_s[:, None] & m_b[None, :], other=0.)
        o_pb = tl.load(p_order + o_b, mask=m_b, other=0)
        b_wp = tl.load(p_wl + o_pb[:, None] * L + o_d[None, :], mask=m_b[:, None] & m_d[None, :], other=0.)
        b_acc = tl.dot(b_rt, b_wp.to(tl.float32), b_acc, input_precision=INPUT_PRECISION)
    return b_acc


@triton.jit
def _gram_grad_tile(p_w, p_out, p_r, p_order, o_idx, kind, i_s, o_d, N, L, P, b_gram, b_l2,
                    ACCUMULATE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, STAGES: tl.constexpr):
    """Gradient rows order[i_s…] (all pruned for kind PRUNED_ROWS, all kept otherwise), columns o_d of one
    segment (``p_w``/``p_out`` point at the segment's first element)."""
    o_s = i_s + tl.arange(0, BLOCK_M)
    m_d = o_d < L
    if kind == 2:
        m_s = o_s < P
        o_rows = tl.load(p_order + o_idx + o_s, mask=m_s, other=0)
        b_out = b_gram * _pruned_rows(p_r, p_w, o_s, m_s, o_d, m_d, N, L, INPUT_PRECISION,
                                      BLOCK_M, BLOCK_D, BLOCK_J, STAGES)
        b_w = tl.load(p_w + o_rows[:, None] * L + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.)
        b_out += b_l2 * b_w.to(tl.float32)
    else:
        m_s = o_s < N
        o_rows = tl.load(p_order + o_idx + o_s, mask=m_s, other=0)
        b_out = b_gram * _kept_rows(p_r, p_w, p_order + o_idx, o_rows, m_s, o_d, m_d, N, L, P, INPUT_PRECISION,
                                    BLOCK_M, BLOCK_D, BLOCK_J, STAGES)
    p_o = p_out + o_rows[:, None] * L + o_d[None, :]
    m_o = m_s[:, None] & m_d[None, :]
    if ACCUMULATE:
        b_out += tl.load(p_o, mask=m_o, other=0.).to(tl.float32)
    tl.store(p_o, b_out.to(p_out.dtype.element_ty), mask=m_o)


@triton.jit
def _squares_grad_tile(p_xl, p_out, o_rows, m_a, N, L, b_scale, ACCUMULATE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[rows] (+)= scale · x[rows]`` over one segment (``p_xl``/``p_out`` at its first element)."""
    for i_k in range(0, L, BLOCK_K):
        o_k = i_k + tl.arange(0, BLOCK_K)
        m = m_a[:, None] & (o_k < L)[None, :]
        o = o_rows[:, None] * L + o_k[None, :]
        b_out = b_scale * tl.load(p_xl + o, mask=m, other=0.).to(tl.float32)
        if ACCUMULATE:
            b_out += tl.load(p_out + o, mask=m, other=0.).to(tl.float32)
        tl.store(p_out + o, b_out.to(p_out.dtype.element_ty), mask=m)


@triton.jit
def bwd_kernel(p_w, p_ow, p_gmeta, p_gout, p_ogout, p_x, p_ox, p_smeta, p_xout, p_oxout, p_tiles, p_order, p_r,
                p_strength, p_grad, gram_weight, l2_weight,
                ACCUMULATE: tl.constexpr, MEAN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                VEC_W: tl.constexpr, VEC_X: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr):
    """Tile ``(kind, l, s0, segment, d0)``: gradient rows of a gram tensor (kinds PRUNED_ROWS, KEPT_ROWS) or of
    the pruned units of a squares tensor (kind SQUARES), times ``r`` (and the incoming ``p_grad`` if given)."""
    i_t = tl.program_id(0)
    kind = tl.load(p_tiles + i_t * 5)
    i_l = tl.load(p_tiles + i_t * 5 + 1)
    i_s = tl.load(p_tiles + i_t * 5 + 2)
    i_g = tl.load(p_tiles + i_t * 5 + 3)
    i_d = tl.load(p_tiles + i_t * 5 + 4)
    b_scale = tl.load(p_strength).to(tl.float32)
    if p_grad is not None:
        b_scale = b_scale * tl.load(p_grad).to(tl.float32)
    if kind != 1:
        p_meta = p_gmeta + i_l * 8
        N = tl.load(p_meta)
        L = tl.load(p_meta + 2)
        P = tl.load(p_meta + 3)
        o_idx = tl.load(p_meta + 4)
        p_rl = p_r + tl.load(p_meta + 5)
        b_gram = 4. * gram_weight * b_scale
        if MEAN:
            b_gram = b_gram / (N * N).to(tl.float32)
        o_d = aligned(i_d, BLOCK_D) + tl.arange(0, BLOCK_D)
        o_seg = i_g * N * L
        if tl.load(p_meta + 6) != 0:
            L_v = aligned(L, VEC_W)
            o_seg_v = aligned(o_seg, VEC_W)
            _gram_grad_tile(p_w + aligned(tl.load(p_ow + i_l), VEC_W) + o_seg_v,
                            p_gout + aligned(tl.load(p_ogout + i_l), VEC_W) + o_seg_v,
                            p_r + aligned(tl.load(p_meta + 5), 4), p_order, o_idx, kind, i_s, o_d,
                            aligned(N, 4), L_v, P, b_gram, b_scale * l2_weight,
                            ACCUMULATE, INPUT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_J, None)
        else:
            _gram_grad_tile(p_w + tl.load(p_ow + i_l) + o_seg, p_gout + tl.load(p_ogout + i_l) + o_seg,
                            p_rl, p_order, o_idx, kind, i_s, o_d, N, L, P, b_gram, b_scale * l2_weight,
                            ACCUMULATE, INPUT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_J, 1)
    else:
        p_meta = p_smeta + i_l * 8
        N = tl.load(p_meta)
        L = tl.load(p_meta + 2)
        P = tl.load(p_meta + 3)
        o_idx = tl.load(p_meta + 4)
        o_a = i_s + tl.arange(0, BLOCK_M)
        m_a = o_a < P
        o_rows = tl.load(p_order + o_idx + o_a, mask=m_a, other=0)
        o_seg = i_g * N * L
        if tl.load(p_meta + 5) != 0:
            o_seg_v = aligned(o_seg, VEC_X)
            _squares_grad_tile(p_x + aligned(tl.load(p_ox + i_l), VEC_X) + o_seg_v,
                               p_xout + aligned(tl.load(p_oxout + i_l), VEC_X) + o_seg_v,
                               o_rows, m_a, N, aligned(L, VEC_X), b_scale, ACCUMULATE, BLOCK_M, BLOCK_D)
        else:
            _squares_grad_tile(p_x + tl.load(p_ox + i_l) + o_seg, p_xout + tl.load(p_oxout + i_l) + o_seg,
                               o_rows, m_a, N, L, b_scale, ACCUMULATE, BLOCK_M, BLOCK_D)
