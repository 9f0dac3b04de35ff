"""Attention heads as pruning units (tpp-method.md §12): where their parameters live (:func:`head_parameters`) and
``PrunedMultiheadAttention``, an ``nn.MultiheadAttention`` whose heads were removed.

``nn.MultiheadAttention`` ties its inner width (``num_heads · head_dim``) to ``embed_dim``, the width of its input
and output; removing heads keeps ``embed_dim`` and ``head_dim`` (so the ``1/√head_dim`` scale) and shrinks the
inner width. This subclass holds exactly that: ``in_proj_weight [3·H'·d_h, E]``, ``in_proj_bias [3·H'·d_h]``,
``out_proj: Linear(H'·d_h → E)``, with the parameter names of ``nn.MultiheadAttention`` (so state_dicts line up) and
the same call signature and results (``(output, weights or None)``). Only self-attention-shaped modules are built
(packed q/k/v projection, no ``bias_k``/``bias_v``, no ``add_zero_attn``): the ones :mod:`tpp.graph` accepts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention", "HeadParameters", "head_parameters"]


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` on an ``embed_dim``-wide stream.

    Built by :func:`tpp.prune_model` from an ``nn.MultiheadAttention`` (or another of these) keeping some heads;
    ``embed_dim``, ``head_dim``, ``dropout`` and ``batch_first`` are those of the original.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        inner = num_heads * head_dim
        kw = {"device": device, "dtype": dtype}
        self.embed_dim = self.kdim = self.vdim = embed_dim
        self._qkv_same_embed_dim = True
        self.num_heads, self.head_dim, self.dropout, self.batch_first = num_heads, head_dim, dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **kw)) if bias else None
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(inner, embed_dim, bias=bias, **kw)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False

    @classmethod
    @torch.no_grad()
    def keeping(cls, module: nn.MultiheadAttention, heads: Tensor) -> "PrunedMultiheadAttention":
        """A copy of ``module`` (an ``nn.MultiheadAttention`` with a packed in-projection, or one of these) with only
        the heads ``heads`` (sorted int64 indices): parameters copied, ``requires_grad`` and train/eval kept."""
        inner = module.in_proj_weight.shape[0] // 3
        head_dim = inner // module.num_heads
        weight = module.in_proj_weight
        rows = (heads.to(weight.device)[:, None] * head_dim + torch.arange(head_dim, device=weight.device)).flatten()
        packed = torch.cat([rows + s * inner for s in range(3)])
        new = cls(module.embed_dim, heads.numel(), head_dim, module.dropout, bias=module.in_proj_bias is not None,
                  batch_first=module.batch_first, device=weight.device, dtype=weight.dtype)
        pairs = [(new.in_proj_weight, weight.index_select(0, packed)),
                 (new.out_proj.weight, module.out_proj.weight.index_select(1, rows))]
        if module.in_proj_bias is not None:
            pairs += [(new.in_proj_bias, module.in_proj_bias.index_select(0, packed)),
                      (new.out_proj.bias, module.out_proj.bias)]
        old = {id(p): p.requires_grad for p in module.parameters()}
        for (param, value), source in zip(pairs, (weight, module.out_proj.weight, module.in_proj_bias,
                                                  module.out_proj.bias)):
            param.copy_(value)
            param.requires_grad_(old[id(source)])
        return new.train(module.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(output, averaged or per-head weights, or None)``."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        (length, batch, _), source = query.shape, key.shape[0]
        heads, d = self.num_heads, self.head_dim
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = (F.linear(t, w, b).reshape(t.shape[0], batch * heads, d).transpose(0, 1)
                   for t, w, b in zip((query, key, value), weights, biases))
        scores = torch.bmm(q * math.sqrt(1.0 / d), k.transpose(1, 2))  # [batch·heads, length, source]
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask.reshape(-1, length, source)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask.reshape(batch, 1, 1, source).expand(batch, heads, 1, source)
            pad = pad.reshape(batch * heads, 1, source)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        attn = F.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        out = torch.bmm(attn, v).transpose(0, 1).reshape(length, batch, heads * d)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)  # as nn.MultiheadAttention: not a module call
        if self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        if not need_weights:
            return out, None
        attn = attn.view(batch, heads, length, source)
        attn = attn.mean(dim=1) if average_attn_weights else attn
        return out, (attn.squeeze(0) if unbatched else attn)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


@dataclass(frozen=True)
class HeadParameters:
    """Where an attention module's heads live: ``packed_weight`` ``[3·H·d_h, E]`` (q, k, v rows of head ``h`` at
    ``[h·d_h, (h+1)·d_h)`` of each third), its bias (or None), and ``out_weight`` ``[E_out, H·d_h]`` (head ``h``'s
    input columns at the same range)."""

    packed_weight: Tensor
    packed_bias: Tensor | None
    out_weight: Tensor
    num_heads: int
    head_dim: int


def head_parameters(module: nn.Module) -> HeadParameters | None:
    """The heads of ``module`` if tpp can prune them whole, else None.

    Two layouts: ``nn.MultiheadAttention`` (and :class:`PrunedMultiheadAttention`) with a packed
    ``in_proj_weight``; and a *packed-qkv* module in timm's ``Attention`` style: attributes ``qkv`` and ``proj``
    (Linear), ``num_heads``, ``head_dim`` and ``attn_dim = num_heads · head_dim`` — the width its forward reshapes
    to (timm ≥ 1.0), no ``gate`` and an ``nn.Identity`` ``norm`` if it has those."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is None:  # separate q/k/v projections (kdim/vdim differ from embed_dim)
            return None
        inner = module.in_proj_weight.shape[0] // 3
        return HeadParameters(module.in_proj_weight, module.in_proj_bias, module.out_proj.weight,
                              module.num_heads, inner // module.num_heads)
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)
            and isinstance(head_dim, int)):
        return None
    inner = heads * head_dim
    if getattr(module, "attn_dim", None) != inner or qkv.out_features != 3 * inner or proj.in_features != inner:
        return None
    if getattr(module, "gate", None) is not None or not isinstance(getattr(module, "norm", nn.Identity()),
                                                                   nn.Identity):
        return None
    return HeadParameters(qkv.weight, qkv.bias, proj.weight, heads, head_dim)
