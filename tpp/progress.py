"""The one progress printer of ``tpp prune`` and ``tpp train`` (rank 0): phase, bar, position, loss, strength/lr,
throughput and ETA on stderr.

On a terminal one line is rewritten every ``tty_interval`` seconds. Otherwise (logs, pipes) a line is printed every
``interval`` seconds, at every tenth of a phase, and when a phase ends. Rates are measured between printed lines,
from the phase's first reported step on — never over an interval of zero, so the first line is as sane as the
others. The loss (a tensor, to avoid a host sync per step) is read only when a line is printed.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional

__all__ = ["Progress", "duration"]


def duration(seconds: float) -> str:
    """``1h02m`` / ``3m07s``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """``progress(phase, done, total, info)`` callback of :func:`tpp.pipeline.run_pruning` and :func:`tpp.loop.train`.

    ``batch``: samples per step over all processes (rates in img/s; ``None``: it/s). ``tensorboard``: an object
    with ``scalar(tag, value, step)`` receiving loss, throughput and strength at every printed line.
    """

    def __init__(self, enabled: bool = True, batch: Optional[int] = None, stream=None, interval: float = 30.0,
                 tty_interval: float = 0.5, tensorboard: Any = None):
        self.enabled, self.batch = enabled, batch
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = tty_interval if self.tty else interval
        self.tb = tensorboard
        self.phase: Optional[str] = None
        self.last_time = self.phase_start = 0.0
        self.last_done = self.phase_done0 = self.decile = 0

    def __call__(self, phase: str, done: int, total: int, info: dict) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        finished = bool(total) and done >= total
        if phase != self.phase:
            if self.tty and self.phase is not None:
                self.stream.write("\n")
            self.phase, self.phase_start, self.phase_done0 = phase, now, done
            self.last_time, self.last_done = now, done        # rates are measured from this step on
            self.decile = int(10 * done / total) if total else 0
            if not finished:
                return
        decile = int(10 * done / total) if total else 0
        due = now - self.last_time >= self.interval or (not self.tty and decile > self.decile)
        if not finished and (not due or done == self.last_done):
            return
        elapsed = now - self.last_time
        rate = (done - self.last_done) / elapsed if elapsed > 0 and done > self.last_done else None
        overall_time = now - self.phase_start
        overall = (done - self.phase_done0) / overall_time if overall_time > 0 and done > self.phase_done0 else None
        eta = (total - done) / overall if total and overall else float("nan")
        self._write(phase, done, total, info, rate, eta, finished)
        self.last_time, self.last_done, self.decile = now, done, decile

    def _write(self, phase, done, total, info, rate, eta, finished) -> None:
        loss = info.get("loss")
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            loss = float("nan")
        parts = [f"{phase:>10}"]
        if total:
            filled = int(20 * done / total)
            parts.append(f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{total} ({100 * done / total:.1f}%)")
        else:
            parts.append(f"step {done}")
        if "epoch" in info:
            parts.append(f"epoch {info['epoch']}/{info.get('epochs', '?')}")
        parts.append(f"loss {loss:.4f}")
        if "strength" in info:
            parts.append(f"r {info['strength']:.4g} {info.get('phase', '')}".rstrip())
        if "lr" in info:
            parts.append(f"lr {info['lr']:.3g}")
        if rate is None:
            parts.append("– img/s" if self.batch else "– it/s")
        elif self.batch:
            parts.append(f"{rate * self.batch:,.0f} img/s")
        else:
            parts.append(f"{rate:,.1f} it/s")
        parts.append(f"eta {duration(eta)}")
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line[:180].ljust(180) + ("\n" if finished else ""))
        else:
            self.stream.write(time.strftime("%H:%M:%S ") + line + "\n")
        self.stream.flush()
        if self.tb is not None:
            self.tb.scalar(f"{phase}/loss", loss, done)
            if rate is not None:
                self.tb.scalar(f"{phase}/images_per_s" if self.batch else f"{phase}/iterations_per_s",
                               rate * (self.batch or 1), done)
            if "strength" in info:
                self.tb.scalar(f"{phase}/strength", info["strength"], done)
