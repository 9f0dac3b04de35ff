"""Gram-term microbenchmarks: the per-layer sweep and the paper's layer sets, for every form (:mod:`forms`).

Modes: "fwd" — the loss, recording the autograd graph (the weights require grad) as a training forward does;
"fwd+bwd" — the loss and its backward into fresh ``.grad`` tensors (cleared before each call, untimed);
"in-place" — the gradient added into preallocated buffers without autograd (``TPPRegularizer.apply_gradients``).
Every case records in ``extra_info`` its shape, FLOPs, bytes and floor (:mod:`roofline`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import roofline
import torch
from timing import run_case
from torch import Tensor
from workloads import layer_set, sweep_layer


def _call(form, mode: str, weights: Sequence[Tensor], pruned: Sequence[Tensor]) -> tuple[Callable, Callable]:
    """(timed call, untimed setup) of ``form`` in ``mode``."""
    if mode == "fwd":
        return lambda: form.penalty(weights, pruned), lambda: None
    if mode == "fwd+bwd":
        def clear_grads() -> None:
            for w in weights:
                w.grad = None
        return lambda: form.penalty(weights, pruned).backward(), clear_grads
    grads = [torch.zeros_like(w) for w in weights]
    return lambda: form.add_grad(weights, grads, pruned), lambda: None


def _measure(benchmark, bench, rates: roofline.Rates, form, mode: str, weights: list[Tensor],
             indices: list[Tensor], group: str, **info) -> None:
    dtype = str(weights[0].dtype).removeprefix("torch.")
    flops = nbytes = 0
    for w, p in zip(weights, indices):
        f, b = roofline.gram_work(w.shape[0], w[0].numel(), p.numel(), mode, w.element_size())
        flops, nbytes = flops + f, nbytes + b
    benchmark.group = group
    benchmark.extra_info.update(info, form=form.name, mode=mode, dtype=dtype, flops=flops, bytes=nbytes,
                                floor_s=rates.floor(flops, nbytes, dtype))
    fn, setup = _call(form, mode, weights, indices)
    run_case(benchmark, fn, bench.device, bench.suite.policy(bench.device, info["kind"]), setup)


def test_sweep(benchmark, bench, rates, form, case):
    """One layer: N filters of D inputs, ⌈ratio·N⌉ pruned."""
    w, p = sweep_layer(case.n, case.d, case.ratio, case.dtype, str(bench.device))
    _measure(benchmark, bench, rates, form, case.mode, [w], [p], "sweep",
             kind="sweep", n=case.n, d=case.d, ratio=case.ratio, p=p.numel())


def test_layer_set(benchmark, bench, rates, form, case):
    """Every layer a paper setting prunes, together (float32 weights)."""
    weights, pruned = layer_set(case.layer_set, str(bench.device))
    _measure(benchmark, bench, rates, form, case.mode, weights, pruned, "layer sets", kind="layer_set",
             layer_set=case.layer_set, layers=len(weights), pruned=sum(p.numel() for p in pruned))
