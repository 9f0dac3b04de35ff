"""What a run writes besides checkpoints and JSON (:func:`tpp.files.write_json`): ``args.yaml``, ``summary.csv``,
``regularize.csv`` and optional TensorBoard scalars. Progress lines are :mod:`tpp.progress`.

``args.yaml`` is written by a small emitter (no PyYAML needed): mappings, lists and scalars, strings quoted when
YAML would read them as something else. ``args.json`` holds the same for programs.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..files import write_text_atomic

__all__ = ["to_yaml", "write_csv", "TensorBoard"]


# ----------------------------------------------------------------------------------------------- files
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
