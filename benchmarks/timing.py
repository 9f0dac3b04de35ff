"""Device-synchronized timing shared by every benchmark and by the roofline measurements.

A timed call is ``fn(); synchronize()`` measured with ``time.perf_counter``, after a ``setup(); synchronize()`` that
is not timed: on a GPU the clock therefore stops only when all queued work has finished, and nothing left over from
the setup or an earlier call is counted. No host sync happens inside ``fn`` unless the code under test makes one
itself (the paper's algorithm does: it reads the pruned indices back with ``.tolist()``).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for all work queued on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class Policy:
    """How long to measure one case: ``warmup`` untimed calls (compilation and autotuning happen there), then as
    many timed calls as fit in ``budget_s`` judged from the last warm-up call, clamped to [min_rounds, max_rounds]."""

    warmup: int
    budget_s: float
    min_rounds: int
    max_rounds: int

    def rounds(self, seconds_per_call: float) -> int:
        wanted = math.ceil(self.budget_s / max(seconds_per_call, 1e-9))
        return max(self.min_rounds, min(self.max_rounds, wanted))


def _timed(fn: Callable[[], object], setup: Callable[[], object], sync: Callable[[], None]) -> float:
    setup()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run_case(benchmark, fn: Callable[[], object], device: torch.device, policy: Policy,
             setup: Callable[[], object] = lambda: None) -> None:
    """Time ``fn`` with pytest-benchmark (``benchmark.pedantic``: one call per round, ``setup`` before each, both
    followed by a device synchronization); pytest-benchmark records the statistics (median, IQR, ...)."""
    sync = synchronizer(device)
    last = 0.0
    for _ in range(policy.warmup):
        last = _timed(fn, setup, sync)

    def prepare() -> None:
        setup()
        sync()

    def target() -> None:
        fn()
        sync()

    benchmark.pedantic(target, setup=prepare, rounds=policy.rounds(last), iterations=1, warmup_rounds=0)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronized call of ``fn``."""
    return _timed(fn, lambda: None, synchronizer(device))


def fastest_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Shortest time of ``fn`` over ``repeats`` synchronized calls after ``warmup`` untimed ones: the roofline
    probes want what the device can do, not what a busy moment let it do."""
    sync = synchronizer(device)
    for _ in range(warmup):
        _timed(fn, lambda: None, sync)
    return min(_timed(fn, lambda: None, sync) for _ in range(repeats))


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
                   inner: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` synchronized windows of ``inner`` back-to-back calls,
    after ``warmup`` untimed calls: for calls too short to time one by one (a CUDA-graph replay)."""
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    sync()

    def window() -> None:
        for _ in range(inner):
            fn()

    return statistics.median(_timed(window, lambda: None, sync) / inner for _ in range(repeats))
