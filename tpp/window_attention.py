"""torchvision's Swin window attention with heads removed (tpp-method.md §12).

``ShiftedWindowAttention`` (swin_t/s/b) and ``ShiftedWindowAttentionV2`` (swin_v2_*) call torchvision's functional
``shifted_window_attention``, which derives the head dim as ``C // num_heads`` from its input width ``C``: a module
with fewer heads of the same ``head_dim`` cannot be expressed by changing ``num_heads``. The subclasses here hold
``num_heads`` heads of an explicit ``head_dim`` on a ``dim``-wide stream — ``qkv: Linear(dim → 3·H·d_h)``,
``proj: Linear(H·d_h → dim)``, the per-head parameters sliced (V1: ``relative_position_bias_table [(2W−1)², H]``;
V2: ``logit_scale [H, 1, 1]`` and the last Linear of ``cpb_mlp``, ``H`` outputs) — with the parameter names of
torchvision's classes (so state_dicts line up), and compute the same function: :func:`window_attention` is
``shifted_window_attention`` with the head dim given. :func:`keeping` builds one from a module and the heads kept.

Importing this module imports torchvision; :func:`tpp.attention.is_window_attention` recognizes these modules
without that.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from .attention import head_parameters, kept_state

__all__ = ["PrunedShiftedWindowAttention", "PrunedShiftedWindowAttentionV2", "keeping", "window_attention"]


def window_attention(x: Tensor, qkv_weight: Tensor, proj_weight: Tensor, relative_position_bias: Tensor,
                     window_size: list[int], num_heads: int, head_dim: int, shift_size: list[int],
                     attention_dropout: float = 0.0, dropout: float = 0.0, qkv_bias: Tensor | None = None,
                     proj_bias: Tensor | None = None, logit_scale: Tensor | None = None,
                     training: bool = True) -> Tensor:
    """torchvision's ``shifted_window_attention`` with ``num_heads`` heads of ``head_dim``: ``x [B, H, W, C]`` →
    ``[B, H, W, C_out]``.

    The map is padded (bottom, right) to whole windows and, where a window is smaller than the padded map, rolled
    by ``−shift_size``; each window's tokens attend to each other: ``softmax(q kᵀ/√d_h + bias + mask) v`` (V1), or
    with ``logit_scale`` (V2) cosine attention ``softmax(cos(q, k)·exp(min(logit_scale, log 100)) + bias + mask)
    v`` with the k bias zero. ``mask`` is −100 between tokens of one shifted window that came from different
    regions of the map, else 0. Then ``proj``, the windows put back, the roll undone and the padding dropped."""
    batch, height, width, channels = x.shape
    wh, ww = window_size
    x = F.pad(x, (0, 0, 0, (-width) % ww, 0, (-height) % wh))
    _, ph, pw, _ = x.shape
    shift = [0 if wh >= ph else shift_size[0], 0 if ww >= pw else shift_size[1]]
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    grid, tokens = (ph // wh) * (pw // ww), wh * ww
    x = x.view(batch, ph // wh, wh, pw // ww, ww, channels).permute(0, 1, 3, 2, 4, 5).reshape(-1, tokens, channels)

    inner = num_heads * head_dim
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner:2 * inner]), qkv_bias[2 * inner:]])
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.shape[0], tokens, 3, num_heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [windows, heads, tokens, head_dim]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if shifted:
        mask = _shift_mask(ph, pw, window_size, shift, x)
        attn = attn.view(batch, grid, num_heads, tokens, tokens) + mask[None, :, None]
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)

    x = (attn @ v).transpose(1, 2).reshape(x.shape[0], tokens, inner)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    out = x.shape[-1]
    x = x.view(batch, ph // wh, pw // ww, wh, ww, out).permute(0, 1, 3, 2, 4, 5).reshape(batch, ph, pw, out)
    if shifted:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


torch.fx.wrap("window_attention")  # opaque to torch.fx, as torchvision's shifted_window_attention


def _shift_mask(ph: int, pw: int, window_size: list[int], shift: list[int], like: Tensor) -> Tensor:
    """``[windows, tokens, tokens]``: −100 between two tokens of a window of the rolled map from different regions,
    else 0. Along each axis of length ``n`` the regions are ``[0, n − w)``, ``[n − w, n − s)``, ``[n − s, n)``
    (window ``w``, shift ``s``; with ``s = 0`` the first two hold whole windows and the last is empty)."""
    def regions(n: int, w: int, s: int) -> Tensor:
        i = torch.arange(n, device=like.device)
        return (i >= n - w).long() + (i >= n - s).long()

    (wh, ww), (sh, sw) = window_size, shift
    label = regions(ph, wh, sh)[:, None] * 3 + regions(pw, ww, sw)[None, :]
    label = label.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    differ = label[:, None, :] != label[:, :, None]
    return torch.zeros(differ.shape, dtype=like.dtype, device=like.device).masked_fill(differ, -100.0)


class PrunedShiftedWindowAttention(ShiftedWindowAttention):
    """Swin (V1) window attention with ``num_heads`` heads of ``head_dim`` on a ``dim``-wide stream.

    Built by :func:`tpp.prune_model` (:func:`keeping`) from a ``ShiftedWindowAttention`` (or one of these); the
    other arguments are those of torchvision's class."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int, head_dim: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0) -> None:
        super().__init__(dim, window_size, shift_size, num_heads, qkv_bias, proj_bias, attention_dropout, dropout)
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, H, W, dim]`` → ``[B, H, W, dim]``, as torchvision's module (:func:`window_attention`)."""
        return window_attention(x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(),
                                self.window_size, self.num_heads, self.head_dim, self.shift_size,
                                attention_dropout=self.attention_dropout, dropout=self.dropout,
                                qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
                                logit_scale=getattr(self, "logit_scale", None), training=self.training)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, window_size={self.window_size}, " \
               f"shift_size={self.shift_size}"


class PrunedShiftedWindowAttentionV2(PrunedShiftedWindowAttention, ShiftedWindowAttentionV2):
    """Swin V2 window attention (cosine attention, ``logit_scale``, ``cpb_mlp`` position bias) with ``num_heads``
    heads of ``head_dim``: the forward of :class:`PrunedShiftedWindowAttention`, the rest of
    ``ShiftedWindowAttentionV2`` (method resolution order: this, the V1 pruned class, V2, V1)."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int, head_dim: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0) -> None:
        super().__init__(dim, window_size, shift_size, num_heads, head_dim, qkv_bias, proj_bias, attention_dropout,
                         dropout)
        if qkv_bias:  # as ShiftedWindowAttentionV2: the k bias is zero (and ignored by the forward)
            with torch.no_grad():
                self.qkv.bias[num_heads * head_dim:2 * num_heads * head_dim].zero_()


@torch.no_grad()
def keeping(module: ShiftedWindowAttention, heads: Tensor) -> PrunedShiftedWindowAttention:
    """A copy of ``module`` (torchvision's Swin window attention, V1 or V2, or a pruned one) with only the heads
    ``heads`` (sorted int64 indices): parameters and buffers copied or sliced (:func:`tpp.attention.kept_state`),
    with their dtypes, devices and ``requires_grad``; train/eval kept."""
    params = head_parameters(module)
    if params is None:
        raise ValueError(f"{type(module).__name__}: qkv/proj shapes do not match num_heads={module.num_heads}; "
                         "not a Swin window attention tpp can prune")
    cls = PrunedShiftedWindowAttentionV2 if isinstance(module, ShiftedWindowAttentionV2) else \
        PrunedShiftedWindowAttention
    with torch.device("meta"):  # no memory, no random initialization: every tensor comes from kept_state
        new = cls(module.qkv.in_features, list(module.window_size), list(module.shift_size), heads.numel(),
                  params.head_dim, module.qkv.bias is not None, module.proj.bias is not None,
                  module.attention_dropout, module.dropout)
    new.load_state_dict(kept_state(module, heads), assign=True)
    old = dict(module.named_parameters())
    for name, param in new.named_parameters():
        param.requires_grad_(old[name].requires_grad)
    return new.train(module.training)
