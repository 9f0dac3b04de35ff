"""The growing-penalty schedule of TPP (tpp-method.md §4, Algorithm 1 as the reference code runs it).

With ``t`` = number of finished training iterations (``step()`` calls):

* strength ``r(t) = min(ceiling, Δ·⌊t / K_u⌋)``; growth ends at ``t_s = K_u·⌈ceiling / Δ⌉`` (1e5 for CIFAR);
* phase ``"grow"`` for ``t < t_s``, ``"stabilize"`` for ``t_s ≤ t < t_s + S``, ``"done"`` afterwards;
* layer-wise zero-out: after the optimizer step of iteration ``t`` (``t ≥ t_s``), the layer with execution-order
  index ``i`` among all Conv2d/Linear layers has its pruned parameters set to 0 whenever
  ``t − t_s ≥ zero_out_interval·(i + 1)`` — from then on at every step, so removal at the end is lossless.
  ``spaced_for(slots)`` shortens the interval when ``slots`` layers would not fit into the stabilize phase (deep
  nets); the regularizer applies it, so the zero-out never runs past ``t_s + S``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

__all__ = ["GrowingSchedule"]


@dataclass(frozen=True)
class GrowingSchedule:
    """Schedule constants. Defaults are the paper's CIFAR run; ``GrowingSchedule.imagenet()`` the ImageNet one."""

    delta: float = 1e-4            # Δ: strength added every `interval` iterations
    interval: int = 10             # K_u: iterations between strength increments
    ceiling: float = 1.0           # τ: the strength at which growth ends
    stabilize_iters: int = 10_000  # S: iterations at the ceiling before removal
    zero_out_interval: int = 100   # iterations between zeroing consecutive layers during stabilize

    def __post_init__(self):
        for name in ("delta", "ceiling"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"GrowingSchedule.{name} must be a positive finite number, got {value!r}")
        for name in ("interval", "stabilize_iters", "zero_out_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "interval" else 0):
                raise ValueError(f"GrowingSchedule.{name} must be an integer >= {1 if name == 'interval' else 0}, "
                                 f"got {value!r}")

    @classmethod
    def imagenet(cls) -> "GrowingSchedule":
        """The reference ImageNet run: K_u = 5, 40k stabilize iterations."""
        return cls(interval=5, stabilize_iters=40_000)

    @property
    def growth_increments(self) -> int:
        """Number of Δ increments until the ceiling: ⌈ceiling / Δ⌉ (robust to float round-off, e.g. 1.0/1e-4)."""
        ratio = self.ceiling / self.delta
        nearest = round(ratio)
        return nearest if math.isclose(ratio, nearest, rel_tol=1e-9) else math.ceil(ratio)

    @property
    def stabilize_start(self) -> int:
        """t_s: the first iteration run at the ceiling."""
        return self.interval * self.growth_increments

    @property
    def total_iters(self) -> int:
        """Iterations of regularization before removal: t_s + S."""
        return self.stabilize_start + self.stabilize_iters

    def strength(self, t: int) -> float:
        """r(t) = min(ceiling, Δ·⌊t / K_u⌋)."""
        k = t // self.interval
        return self.ceiling if k >= self.growth_increments else self.delta * k

    def phase(self, t: int) -> str:
        if t < self.stabilize_start:
            return "grow"
        return "stabilize" if t < self.total_iters else "done"

    def zero_out_due(self, t: int, layer_index: int) -> bool:
        """Whether, after iteration ``t``, the layer with execution-order index ``layer_index`` is zeroed."""
        return t >= self.stabilize_start and t - self.stabilize_start >= self.zero_out_interval * (layer_index + 1)

    def spaced_for(self, slots: int) -> "GrowingSchedule":
        """This schedule with the zero-out of ``slots`` execution-order slots fitted into the stabilize phase
        (tpp-method.md §12): ``zero_out_interval = min(zero_out_interval, ⌊(stabilize_iters − 1) / slots⌋)``, so
        that the last slot is due at an iteration ``t < total_iters`` that ``step()`` runs (``⌊stabilize_iters /
        slots⌋`` would leave it due exactly at ``total_iters``, after the last step). Unchanged (the paper's exact
        timing) whenever the configured interval already fits."""
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        spacing = min(self.zero_out_interval, max(0, self.stabilize_iters - 1) // slots)
        return self if spacing == self.zero_out_interval else replace(self, zero_out_interval=spacing)

    def state_dict(self) -> dict:
        return asdict(self)
