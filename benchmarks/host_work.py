"""Host work of a regularizer step, without a GPU: every Triton launch stubbed, the rest timed and counted.

    TRITON_INTERPRET=1 python benchmarks/host_work.py [--calls 300] [--out benchmarks/results/host-work.md]

On the ResNet50 2.31× layer set (torchvision ResNet50, ``*layer[1-3]*conv[1-2]:0.6,*layer4*conv[1-2]:0.21``,
float32, CPU tensors) with ``backend="triton"``: the host microseconds per call (median over ``--calls`` after a
warm-up), the kernel launches and the top-level ATen ops (a ``TorchDispatchMode`` count) of

* ``apply_gradients()`` (``.grad`` kept between calls, as in a training loop with ``zero_grad(set_to_none=False)``);
* ``penalty()`` + ``backward()`` (``.grad`` set to ``None`` before each call);
* beside it, PyTorch's own floor for that path: a no-op ``autograd.Function`` over the same tensors whose backward
  returns views of one buffer (what autograd costs for that many leaves, whatever the penalty).

A stub replaces each ``@triton.jit`` kernel of ``tpp_kernels``: launching costs one Python call and records the
grid, so the figures are what the host does around the launches. Triton's own launcher (argument binding, about
10–40 µs per launch on a server CPU) is not included; it is measured on a GPU by ``make gpu-check``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from tpp import GrowingSchedule, TPPRegularizer  # noqa: E402

SPEC = "*layer[1-3]*conv[1-2]:0.6,*layer4*conv[1-2]:0.21"


class _Stub:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` only counts."""

    launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        _Stub.launches += 1


@contextmanager
def stubbed_kernels():
    """Every jitted function of the tpp_kernels modules replaced by a counting stub."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = []
    for module in [m for name, m in sys.modules.items() if name.startswith("tpp_kernels.")]:
        for attr, value in list(vars(module).items()):
            if isinstance(value, (JITFunction, InterpretedFunction)):
                saved.append((module, attr, value))
                setattr(module, attr, _Stub())
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


class _NoOp(torch.autograd.Function):
    """The cheapest autograd node over ``tensors``: a constant forward, views of one buffer as gradients."""

    @staticmethod
    def forward(ctx, flat, *tensors):
        ctx.shapes = [(t.shape, t.stride()) for t in tensors]
        return flat.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        flat = grad.new_empty(sum(s.numel() for s, _ in ctx.shapes))
        offsets = [0]
        for shape, _ in ctx.shapes:
            offsets.append(offsets[-1] + shape.numel())
        return None, *(flat.as_strided(shape, stride, o) for (shape, stride), o in zip(ctx.shapes, offsets))


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def measure(fn, calls: int) -> dict:
    """Median host µs of ``fn()`` over ``calls`` calls after a warm-up; launches and ATen ops of one call."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    _Stub.launches = 0
    with _OpCounter() as counter:
        fn()
    return {"host_us": statistics.median(times) * 1e6, "launches": _Stub.launches,
            "aten_ops": sum(counter.ops.values()), "ops": dict(sorted(counter.ops.items()))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    reg = TPPRegularizer(model, SPEC, schedule=GrowingSchedule.imagenet(), backend="triton")
    reg.strength = 0.5
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)

    def penalty_backward():
        for p in params:
            p.grad = None
        reg.penalty().backward()

    tensors = [slot.param for name in reg.pruned for slot in reg.slots(name)]
    flat = torch.zeros(1)

    def autograd_floor():
        for p in params:
            p.grad = None
        _NoOp.apply(flat, *tensors).backward()

    with stubbed_kernels():
        rows = {"apply_gradients()": measure(reg.apply_gradients, args.calls),
                "penalty() + backward()": measure(penalty_backward, args.calls),
                f"autograd floor ({len(tensors)} leaves)": measure(autograd_floor, args.calls)}
    layers = len(reg.pruned)
    lines = [f"Host work per call, ResNet50 2.31x set ({layers} layers, {sum(len(i) for i in reg.pruned.values())} "
             f"filters), backend triton, launches stubbed; {torch.__version__}, one torch thread",
             "", "| call | host µs (median) | launches | ATen ops |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['host_us']:.0f} | {r['launches']} | {r['aten_ops']} |" for name, r in rows.items()]
    lines += ["", "ATen ops: " + "; ".join(f"{name}: {r['ops']}" for name, r in rows.items())]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
