"""Attention heads as pruning units (tpp-method.md §12): where their parameters live (:func:`head_parameters`:
``nn.MultiheadAttention``, torchvision's Swin window attention, timm-style packed-qkv modules), what removing some
keeps of a module's state (:func:`kept_state`), and ``PrunedMultiheadAttention``, an ``nn.MultiheadAttention`` whose
heads were removed (Swin's counterpart: :mod:`tpp.window_attention`).

``nn.MultiheadAttention`` ties its inner width (``num_heads · head_dim``) to ``embed_dim``, the width of its input
and output; removing heads keeps ``embed_dim`` and ``head_dim`` (so the ``1/√head_dim`` scale) and shrinks the
inner width. This subclass holds exactly that: ``in_proj_weight [3·H'·d_h, E]``, ``in_proj_bias [3·H'·d_h]``,
``out_proj: Linear(H'·d_h → E)``, with the parameter names of ``nn.MultiheadAttention`` (so state_dicts line up) and
the same call signature and results (``(output, weights or None)``). Only self-attention-shaped modules are built
(packed q/k/v projection, no ``bias_k``/``bias_v``, no ``add_zero_attn``): the ones :mod:`tpp.graph` accepts.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention", "HeadParameters", "head_parameters", "is_window_attention", "kept_state"]


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
    ``[h·d_h, (h+1)·d_h)`` of each third), its bias (or None), ``out_weight`` ``[E_out, H·d_h]`` (head ``h``'s
    input columns at the same range), and ``per_head``: further parameters of the module holding one slice per head,
    each with the dim that indexes the heads (e.g. a relative position bias table ``[(2W−1)², H]``, dim 1) — removal
    slices them (:func:`kept_state`); the regularizer leaves them alone (a head whose v rows and out-projection
    columns are zero contributes nothing, whatever they hold)."""

    packed_weight: Tensor
    packed_bias: Tensor | None
    out_weight: Tensor
    num_heads: int
    head_dim: int
    per_head: tuple[tuple[Tensor, int], ...] = ()


def head_parameters(module: nn.Module) -> HeadParameters | None:
    """The heads of ``module`` if tpp can prune them whole, else None.

    Three layouts: ``nn.MultiheadAttention`` (and :class:`PrunedMultiheadAttention`) with a packed
    ``in_proj_weight``; torchvision's Swin window attention (:func:`is_window_attention`); and a *packed-qkv*
    module in timm's ``Attention`` style: attributes ``qkv`` and ``proj`` (Linear), ``num_heads``, ``head_dim`` and
    ``attn_dim = num_heads · head_dim`` — the width its forward reshapes to (timm ≥ 1.0), no ``gate`` and an
    ``nn.Identity`` ``norm`` if it has those."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is None:  # separate q/k/v projections (kdim/vdim differ from embed_dim)
            return None
        inner = module.in_proj_weight.shape[0] // 3
        return HeadParameters(module.in_proj_weight, module.in_proj_bias, module.out_proj.weight,
                              module.num_heads, inner // module.num_heads)
    if is_window_attention(module):
        return _window_heads(module)
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


def is_window_attention(module: nn.Module) -> bool:
    """Whether ``module`` is torchvision's Swin window attention (``ShiftedWindowAttention``/``…V2``, or one of
    :mod:`tpp.window_attention`'s pruned subclasses). Its forward applies ``qkv``/``proj`` functionally and derives
    the head dim from its input width, so it is replaced (not shrunk in place) when it loses heads. A module of that
    class exists only once torchvision's Swin module is loaded: the check does not import torchvision."""
    swin = sys.modules.get("torchvision.models.swin_transformer")
    return swin is not None and isinstance(module, swin.ShiftedWindowAttention)


def _window_heads(module: nn.Module) -> HeadParameters | None:
    """Swin: ``qkv: Linear(C → 3·H·d_h)``, ``proj: Linear(H·d_h → C)``, ``d_h = C // H`` (a pruned module's
    ``head_dim``); per head a column of V1's ``relative_position_bias_table``, or V2's ``logit_scale`` row and the
    output row of its ``cpb_mlp``'s last Linear."""
    qkv, proj, heads = module.qkv, module.proj, module.num_heads
    head_dim = getattr(module, "head_dim", qkv.in_features // heads)
    inner = heads * head_dim
    if qkv.out_features != 3 * inner or proj.in_features != inner or proj.out_features != qkv.in_features:
        return None
    if hasattr(module, "logit_scale"):  # V2: cosine attention, continuous position bias from cpb_mlp
        last = module.cpb_mlp[-1]
        per_head = ((module.logit_scale, 0), (last.weight, 0)) + (((last.bias, 0),) if last.bias is not None else ())
    else:
        per_head = ((module.relative_position_bias_table, 1),)
    return HeadParameters(qkv.weight, qkv.bias, proj.weight, heads, head_dim, per_head)


def kept_state(module: nn.Module, heads: Tensor) -> dict[str, Tensor]:
    """``module.state_dict()`` keeping only the heads ``heads`` (sorted int64 indices) of
    :func:`head_parameters`: the q, k and v rows of the packed weight and bias, the out-projection's input columns
    and the ``per_head`` slices; every other entry copied as it is."""
    p = head_parameters(module)
    if p is None:
        raise ValueError(f"{type(module).__name__}: no attention heads tpp can prune (tpp.attention.head_parameters)")
    device = p.packed_weight.device
    rows = (heads.to(device)[:, None] * p.head_dim + torch.arange(p.head_dim, device=device)).flatten()
    packed = torch.cat([rows + s * p.num_heads * p.head_dim for s in range(3)])
    slices = {id(p.packed_weight): (0, packed), id(p.out_weight): (1, rows)}
    if p.packed_bias is not None:
        slices[id(p.packed_bias)] = (0, packed)
    slices.update({id(t): (dim, heads.to(t.device)) for t, dim in p.per_head})
    state = module.state_dict(keep_vars=True)
    return {k: t.detach().index_select(*slices[id(t)]) if id(t) in slices else t.detach().clone()
            for k, t in state.items()}
