"""Measurements of a model: FLOPs, parameters, input–output Jacobian spectrum (trainability) and latency.

* ``count_flops``: 2 × multiply-accumulates of every ``nn.Conv2d``, ``nn.Linear`` and ``nn.MultiheadAttention``
  call in one forward pass (biases, BN, activations, softmax, pooling and additions are not counted). A conv
  producing ``out`` (all elements, batch included) costs ``out.numel() · (C_in / groups) · kh · kw`` MACs; a Linear
  ``out.numel() · in_features``; an attention call with ``L`` queries, ``S`` keys and inner width ``I`` (heads ×
  head dim) ``B·I·(L·E_q + S·E_k + S·E_v)`` for the projections, ``2·B·L·S·I`` for ``QKᵀ`` and ``AV``, and
  ``B·L·I·E_out`` for the out-projection — what ``torch.utils.flop_counter.FlopCounterMode`` counts. A timm-style
  packed-qkv attention module (:func:`tpp.attention.head_parameters`) adds ``2·B·N²·I`` for its two attention
  matmuls to its ``qkv`` and ``proj`` Linears. A Swin window attention (:func:`tpp.attention.is_window_attention`,
  projections applied functionally) on ``T`` tokens (``B·H·W`` after padding to whole windows of ``N`` tokens)
  costs ``T·E·3I`` (qkv), ``2·T·N·I`` (``QKᵀ`` and ``AV`` in every window) and ``T·I·E_out`` (proj); V2's
  ``cpb_mlp`` Linears count as Linears.
* ``output_deviation``: how far a pruned model's outputs are from the model's — 0 for exact removal, the figure
  reported for ``allow_inexact`` units (LayerNorm-coupled channels, tpp-method.md §12).
* ``jacobian_singular_values``: per sample, ``J(x) = ∂f(x)/∂x ∈ R^{classes × inputs}`` and its singular values
  (tpp-method.md §7), measured in eval mode so that samples do not interact through BN batch statistics.

Every function runs the model in eval mode and restores each submodule's train/eval flag afterwards.
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from typing import Iterator, Union

import torch
import torch.nn as nn
from torch import Tensor

from .attention import head_parameters, is_window_attention

__all__ = ["count_flops", "flops_by_module", "count_params", "output_deviation", "jacobian_singular_values",
           "jsv_summary", "measure_latency"]

Inputs = Union[Tensor, tuple]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, then restore every submodule's own ``training`` flag."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _as_args(example_input: Inputs) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def count_flops(model: nn.Module, example_input: Inputs) -> int:
    """FLOPs (2 × MACs of Conv2d, Linear and attention modules) of ``model(example_input)`` for the whole batch.

    Pass a batch of one for per-image FLOPs; a tuple is unpacked as positional arguments.
    """
    return sum(flops_by_module(model, example_input).values())


def flops_by_module(model: nn.Module, example_input: Inputs) -> dict[str, int]:
    """``{qualified module name: FLOPs}`` of every Conv2d/Linear/attention module called in
    ``model(example_input)`` (a module called twice counts twice); :func:`count_flops` is their sum."""
    names = {m: name for name, m in model.named_modules()}
    macs: dict[str, int] = {}

    def add(m: nn.Module, n: int) -> None:
        macs[names[m]] = macs.get(names[m], 0) + n

    def conv_hook(m: nn.Conv2d, _inputs, out: Tensor) -> None:
        add(m, out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size))

    def linear_hook(m: nn.Linear, _inputs, out: Tensor) -> None:
        add(m, out.numel() * m.in_features)

    def attention_hook(m: nn.MultiheadAttention, args: tuple, kwargs: dict, _out) -> None:
        add(m, _attention_macs(m, *_qkv(args, kwargs)))

    def window_hook(m: nn.Module, args: tuple, kwargs: dict, _out) -> None:
        add(m, _window_attention_macs(m, args[0] if args else next(iter(kwargs.values()))))

    def packed_hook(m: nn.Module, args: tuple, kwargs: dict, _out) -> None:
        x = args[0] if args else next(iter(kwargs.values()))  # [batch, tokens, features]
        params = head_parameters(m)
        add(m, 2 * x.shape[0] * x.shape[1] ** 2 * params.num_heads * params.head_dim)  # QKᵀ and AV

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_hook(attention_hook, with_kwargs=True))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif is_window_attention(m):
            handles.append(m.register_forward_hook(window_hook, with_kwargs=True))
        elif head_parameters(m) is not None:  # timm-style: its qkv/proj Linears are counted as such
            handles.append(m.register_forward_hook(packed_hook, with_kwargs=True))
    try:
        with _eval_mode(model), torch.no_grad():
            model(*_as_args(example_input))
    finally:
        for h in handles:
            h.remove()
    return {name: 2 * n for name, n in macs.items()}


def _qkv(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    names = ("query", "key", "value")
    return tuple(args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))


def _attention_macs(m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor) -> int:
    """MACs of one ``nn.MultiheadAttention`` call: q/k/v projections, ``QKᵀ``, ``AV`` and the out-projection.

    The inner width is that of the projections (``num_heads · head_dim``: smaller than ``embed_dim`` once heads
    are removed, see :class:`tpp.attention.PrunedMultiheadAttention`)."""
    batch_dim = 0 if m.batch_first else 1
    if query.dim() == 2:  # unbatched
        query, key, value = (t.unsqueeze(batch_dim) for t in (query, key, value))
    batch = query.shape[batch_dim]
    length, source = query.shape[1 - batch_dim], key.shape[1 - batch_dim]
    inner = (m.in_proj_weight.shape[0] // 3) if m.in_proj_weight is not None else m.embed_dim
    projections = batch * inner * (length * query.shape[-1] + source * key.shape[-1] + source * value.shape[-1])
    attention = 2 * batch * length * source * inner
    return projections + attention + batch * length * inner * m.out_proj.out_features


def _window_attention_macs(m: nn.Module, x: Tensor) -> int:
    """MACs of one Swin window attention call on ``x [B, H, W, E]``: qkv, ``QKᵀ`` and ``AV`` per window, proj."""
    (wh, ww), batch, height, width, embed = m.window_size, *x.shape
    tokens = batch * (height + (-height) % wh) * (width + (-width) % ww)
    params = head_parameters(m)
    inner = params.num_heads * params.head_dim
    return tokens * (3 * embed * inner + 2 * wh * ww * inner + inner * params.out_weight.shape[0])


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def output_deviation(model: nn.Module, pruned: nn.Module, example_input: Inputs) -> dict[str, float]:
    """``{"max_abs": max |f(x) − g(x)|, "max_output": max |f(x)|, "relative": max_abs / max_output}`` of ``model``
    (f) and ``pruned`` (g) on ``example_input``, in eval mode; the outputs (tensors, or tuples/lists/dicts of them)
    must have the same structure and shapes. ``relative`` is NaN when both are 0 (e.g. a zero-initialized
    classifier: nothing to measure on)."""
    with _eval_mode(model), _eval_mode(pruned):
        ours, theirs = model(*_as_args(example_input)), pruned(*_as_args(example_input))
    a, b = _tensors(ours), _tensors(theirs)
    if [t.shape for t in a] != [t.shape for t in b]:
        raise ValueError(f"output_deviation: the outputs differ in shape: {[tuple(t.shape) for t in a]} vs "
                         f"{[tuple(t.shape) for t in b]}")
    worst = max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    scale = max((float(x.double().abs().max()) for x in a if x.numel()), default=0.0)
    return {"max_abs": worst, "max_output": scale,
            "relative": worst / scale if scale else (math.nan if worst == 0 else math.inf)}


def _tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in _tensors(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for part in out for t in _tensors(part)]
    return []


def jacobian_singular_values(model: nn.Module, inputs: Tensor) -> Tensor:
    """Singular values of each sample's input–output Jacobian, shape ``[batch, min(classes, input_dim)]``.

    ``model`` maps ``inputs [batch, ...]`` to logits ``[batch, classes]``; ``input_dim`` is the number of elements
    of one sample. Computed in eval mode with one backward pass per class (the gradient of the class-``c`` logits
    summed over the batch is each sample's row ``c`` of ``J``, as samples are independent in eval mode).
    Values are in descending order, in the model's dtype; for a linear network they are those of ``W_L … W_1``.
    """
    with _eval_mode(model), torch.enable_grad():
        x = inputs.detach().requires_grad_(True)
        out = model(x)
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"jacobian_singular_values: expected logits [batch, classes], got {tuple(out.shape)}")
        classes = out.shape[1]
        rows = [
            torch.autograd.grad(out[:, c].sum(), x, retain_graph=c < classes - 1)[0].flatten(1) for c in range(classes)
        ]
    return torch.linalg.svdvals(torch.stack(rows, dim=1))


def jsv_summary(sv: Tensor) -> dict[str, float]:
    """Summary of ``jacobian_singular_values`` output ``[batch, k]``.

    ``mean``/``std`` (population) / ``max``/``min`` over all values, and ``condition_number``: the mean over samples
    of each sample's ``max / min`` (``inf`` when a sample has a zero singular value).
    """
    if sv.dim() != 2 or sv.numel() == 0:
        raise ValueError(f"jsv_summary: expected a non-empty [batch, k] tensor, got shape {tuple(sv.shape)}")
    sv = sv.detach().double()
    return {
        "mean": sv.mean().item(),
        "std": sv.std(correction=0).item(),
        "max": sv.max().item(),
        "min": sv.min().item(),
        "condition_number": (sv.max(dim=1).values / sv.min(dim=1).values).mean().item(),
    }


def measure_latency(model: nn.Module, example_input: Inputs, warmup: int = 10, iters: int = 50) -> float:
    """Median wall-clock seconds of one ``model(example_input)`` call, in eval mode under ``no_grad``.

    Runs ``warmup`` untimed calls first; on CUDA the device is synchronized around every timed call.
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"measure_latency: need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    args = _as_args(example_input)
    devices = {a.device for a in args if isinstance(a, Tensor) and a.is_cuda}

    def sync() -> None:
        for device in devices:
            torch.cuda.synchronize(device)

    times = []
    with _eval_mode(model), torch.no_grad():
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            model(*args)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)
