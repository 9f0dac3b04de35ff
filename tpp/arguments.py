"""Command-line argument types and the usage error shared by ``tpp prune`` and ``tpp train``."""
from __future__ import annotations

import argparse
import math

__all__ = ["EXIT_USAGE", "UsageError", "count", "number", "epoch_list", "parse_ratio", "add_schedule_arguments"]

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input: printed as ``tpp <cmd>: error: <message>``, exit status ``EXIT_USAGE``."""


def count(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def number(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def epoch_list(text: str) -> tuple[int, ...]:
    """Comma-separated epochs, e.g. ``30,60,75``."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 30,60,75, got {text!r}") from None


def add_schedule_arguments(group) -> None:
    """The :class:`tpp.GrowingSchedule` overrides, each defaulting to ``None`` (= the recipe's value)."""
    group.add_argument("--delta", type=number, help="Δ, strength added every --interval iterations")
    group.add_argument("--interval", type=count, help="K_u, iterations between strength increments")
    group.add_argument("--ceiling", type=number, help="strength at which growth stops")
    group.add_argument("--stabilize-iters", type=count, help="iterations at the ceiling before removal")
    group.add_argument("--zero-out-interval", type=count, help="iterations between zeroing consecutive layers")


def parse_ratio(text):
    """``--ratio``: a number in [0, 1), or a ``'pattern:ratio,...'`` spec whose ratios lie in [0, 1); else
    :class:`UsageError`. Numbers (e.g. from a JSON config) pass through the same check."""
    from .selection import parse_ratio_spec

    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None
    if value is not None:
        if not (math.isfinite(value) and 0 <= value < 1):
            raise UsageError(f"--ratio {text!r}: the pruning ratio must lie in [0, 1) (0 keeps every filter, "
                             "1 would remove all)")
        return value
    try:
        parse_ratio_spec(text)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--ratio {text!r}: {err}; expected a number in [0, 1) or 'pattern:ratio,...' with "
                         "ratios in [0, 1)") from None
    return text
