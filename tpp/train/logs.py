"""What `tpp train` writes besides checkpoints: progress lines (rank 0), ``args.yaml``, ``summary.csv``,
``regularize.csv``, ``metrics.json`` and optional TensorBoard scalars.

``args.yaml`` is written by a small emitter (no PyYAML needed): mappings, lists and scalars, strings quoted when
YAML would read them as something else. ``args.json`` holds the same for programs.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ..files import write_text_atomic

__all__ = ["to_yaml", "write_text_atomic", "write_json", "write_csv", "Progress", "TensorBoard"]


# ----------------------------------------------------------------------------------------------- files
def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    write_text_atomic(path, buf.getvalue())


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


_PLAIN = re.compile(r"^[A-Za-z_./][A-Za-z0-9_./ +-]*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "~", "y", "n"}


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ".nan"
        if math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        return repr(v)
    s = str(v)
    if _PLAIN.match(s) and s.lower() not in _RESERVED and not s.endswith(" ") and ": " not in s:
        return s
    return json.dumps(s, ensure_ascii=False)        # a double-quoted JSON string is a valid YAML scalar


def to_yaml(data: Any, indent: int = 0) -> str:
    """Block-style YAML of nested dicts/lists/tuples and scalars (keys as strings)."""
    pad = " " * indent
    lines = []
    if isinstance(data, Mapping):
        if not data:
            return pad + "{}\n"
        for k, v in data.items():
            key = _scalar(str(k))
            if isinstance(v, (Mapping, list, tuple)) and v:
                lines.append(f"{pad}{key}:\n{to_yaml(v, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {_inline(v)}\n")
    elif isinstance(data, (list, tuple)):
        if not data:
            return pad + "[]\n"
        for v in data:
            if isinstance(v, (Mapping, list, tuple)) and v:
                body = to_yaml(v, indent + 2)
                lines.append(f"{pad}- {body.lstrip()}")
            else:
                lines.append(f"{pad}- {_inline(v)}\n")
    else:
        return pad + _scalar(data) + "\n"
    return "".join(lines)


def _inline(v: Any) -> str:
    if isinstance(v, Mapping):
        return "{}"
    if isinstance(v, (list, tuple)):
        return "[]"
    return _scalar(v)


# -------------------------------------------------------------------------------------------- progress
def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Rank-0 progress: phase, bar, position, loss, strength/lr, images/s over the last interval and ETA.

    On a terminal one line is rewritten every ``tty_interval`` seconds; otherwise (logs, pipes) a line is printed
    every ``interval`` seconds and when a phase ends. The loss (a tensor) is read only when a line is printed.
    """

    def __init__(self, enabled: bool, global_batch: int, stream=None, interval: float = 30.0,
                 tty_interval: float = 0.5, tensorboard: Optional["TensorBoard"] = None):
        self.enabled, self.global_batch = enabled, global_batch
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = tty_interval if self.tty else interval
        self.tb = tensorboard
        self.phase: Optional[str] = None
        self.last_time = self.last_done = self.phase_start = self.phase_done0 = 0.0

    def __call__(self, phase: str, done: int, total: int, info: dict) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if phase != self.phase:
            if self.tty and self.phase is not None:
                self.stream.write("\n")
            self.phase, self.phase_start, self.phase_done0 = phase, now, done
            self.last_time, self.last_done = now, done       # rates are measured from the phase's first step
        finished = bool(total) and done >= total
        if (now - self.last_time < self.interval or done == self.last_done) and not finished:
            return
        rate = (done - self.last_done) / max(now - self.last_time, 1e-9)          # iterations/s, last interval
        overall = (done - self.phase_done0) / max(now - self.phase_start, 1e-9)
        eta = (total - done) / overall if total and overall > 0 else float("nan")
        loss = info.get("loss")
        loss = float(loss) if isinstance(loss, (torch.Tensor, float, int)) else float("nan")
        parts = [f"{phase:>10}"]
        if total:
            filled = int(20 * done / total)
            parts.append(f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{total} ({100 * done / total:.1f}%)")
        if "epoch" in info:
            parts.append(f"epoch {info['epoch']}/{info.get('epochs', '?')}")
        parts.append(f"loss {loss:.4f}")
        if "strength" in info:
            parts.append(f"r {info['strength']:.4g} {info.get('phase', '')}".rstrip())
        if "lr" in info:
            parts.append(f"lr {info['lr']:.3g}")
        parts.append(f"{rate * self.global_batch:,.0f} img/s")
        parts.append(f"eta {_duration(eta)}")
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line[:180].ljust(180) + ("\n" if finished else ""))
        else:
            self.stream.write(time.strftime("%H:%M:%S ") + line + "\n")
        self.stream.flush()
        if self.tb is not None:
            self.tb.scalar(f"{phase}/loss", loss, done)
            self.tb.scalar(f"{phase}/images_per_s", rate * self.global_batch, done)
            if "strength" in info:
                self.tb.scalar(f"{phase}/strength", info["strength"], done)
        self.last_time, self.last_done = now, done


# ----------------------------------------------------------------------------------------- tensorboard
class TensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` when it can be imported (needs the ``tensorboard`` package);
    otherwise :meth:`open` returns ``None`` with the reason."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, folder: Path) -> tuple[Optional["TensorBoard"], Optional[str]]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as err:  # noqa: BLE001 - ImportError, or tensorboard's own import errors
            return None, f"{type(err).__name__}: {err}"
        return cls(SummaryWriter(str(folder))), None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None and math.isfinite(float(value)):
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
