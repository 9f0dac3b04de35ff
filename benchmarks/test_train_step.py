"""End-to-end: one SGD training step without and with the TPP regularizer, per backend.

A step is forward (bfloat16 autocast and channels_last on CUDA, cudnn.benchmark on), cross-entropy, [+ penalty],
backward, [in-place gradients], ``optimizer.step()``; ``zero_grad(set_to_none=True)`` runs untimed before it. One
fixed random batch lives on the device. The regularizer covers the layers of the step's layer set (:mod:`workloads`)
at strength 1 (the schedule starts at 0, where it does nothing); its penalty is added outside autocast, in float32.

Variants:

* ``none`` — no regularizer;
* ``paper`` — as the paper's code: the gram term by its algorithm (:mod:`forms` ``paper``) in the loss, the L2 and
  BN terms added as gradients after backward (``TPPRegularizer(gram_weight=0).apply_gradients()``);
* ``<backend>`` — ``loss + reg.penalty()`` with ``TPPRegularizer(backend=<backend>)``;
* ``<backend>-inplace`` — ``reg.apply_gradients()`` after backward.

Each regularized step is paired with an unregularized one run just before it (untimed by pytest-benchmark, timed
apart): the regularizer's cost is the median of the per-round differences (``extra_info["paired_overhead_s"]``),
which a busy or drifting machine disturbs far less than the difference of two separately measured medians. The
report gives its share of the step: ``paired_overhead_s / t_variant``.
"""
from __future__ import annotations

import statistics
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from timing import run_case, time_call
from workloads import LAYER_SETS, StepCase

from tpp import TPPRegularizer, reference
from tpp.models import build_model

PAPER_GRAM_WEIGHT = 1000.0  # c of tpp-method.md §3


def variants(device: torch.device) -> tuple[str, ...]:
    """Step variants timed on ``device`` (Triton and CUDA backends on CUDA only)."""
    names = ("none", "paper", "torch", "torch-inplace")
    if device.type == "cuda":
        names += ("triton", "triton-inplace", "cuda", "cuda-inplace")
    return names


@lru_cache(maxsize=None)
def _training(step: StepCase, device: str):
    """The model, its optimizer and a batch, shared by the variants of ``step``."""
    torch.manual_seed(0)
    on_gpu = torch.device(device).type == "cuda"
    memory_format = torch.channels_last if on_gpu else torch.contiguous_format
    model = build_model(step.model, num_classes=step.num_classes).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(step.batch, 3, step.image, step.image, device=device).to(memory_format=memory_format)
    y = torch.randint(0, step.num_classes, (step.batch,), device=device)
    return model, optimizer, x, y


def _regularizer(step: StepCase, variant: str, model: torch.nn.Module):
    """(penalty added to the loss, hook run after backward) of ``variant``; either may be None."""
    if variant == "none":
        return None, None
    spec = LAYER_SETS[step.layer_set]
    backend = "torch" if variant == "paper" else variant.removesuffix("-inplace")
    try:
        reg = TPPRegularizer(model, spec.spec, spec.skip, gram_weight=0.0 if variant == "paper" else PAPER_GRAM_WEIGHT,
                             backend=backend)
    except ValueError as e:  # backend unavailable here
        pytest.skip(str(e))
    reg.strength = 1.0
    if variant == "paper":
        device = next(model.parameters()).device
        layers = [(model.get_submodule(n), p.to(device)) for n, p in reg.pruned.items()]

        def paper_penalty() -> torch.Tensor:
            terms = [reference.decorrelation_penalty_reference_run(m.weight, p) for m, p in layers]
            return PAPER_GRAM_WEIGHT * torch.stack(terms).sum()
        return paper_penalty, reg.apply_gradients
    if variant.endswith("-inplace"):
        return None, reg.apply_gradients
    return reg.penalty, None


def _step(model, optimizer, x, y, amp: bool, penalty, after_backward):
    def train_step() -> None:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
    return train_step


def test_train_step(benchmark, bench, step, variant):
    """Time one training step of ``step`` regularized as ``variant`` says, each paired with an unregularized one."""
    device = bench.device
    torch.backends.cudnn.benchmark = True
    model, optimizer, x, y = _training(step, str(device))
    amp = device.type == "cuda"
    regularized = _step(model, optimizer, x, y, amp, *_regularizer(step, variant, model))
    plain = _step(model, optimizer, x, y, amp, None, None)
    plain_times = []

    def setup() -> None:
        optimizer.zero_grad(set_to_none=True)
        if variant != "none":
            plain_times.append(time_call(plain, device))
            optimizer.zero_grad(set_to_none=True)

    benchmark.group = "train step"
    benchmark.extra_info.update(kind="step", model=step.model, batch=step.batch, image=step.image, variant=variant,
                                layer_set=step.layer_set, amp_bf16=amp, channels_last=amp)
    run_case(benchmark, regularized, device, bench.suite.policy(device, "step"), setup)
    if plain_times:
        timed = benchmark.stats.stats.data
        pairs = list(zip(timed, plain_times[-len(timed):]))
        benchmark.extra_info.update(paired_none_s=statistics.median(p for _, p in pairs),
                                    paired_overhead_s=statistics.median(t - p for t, p in pairs))
