"""``tpp inspect``: what tpp can prune in a model, as text (units, sizes, FLOPs shares, refusals, a ratio's speedup).

``inspect_model(model, example_input, ratio=0.5)`` returns the report the command (:mod:`tpp.cli`) prints; it only
reads the model.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

from torch import nn

from .graph import analyze_model
from .metrics import count_params, flops_by_module, output_deviation
from .regularizer import TPPRegularizer
from .selection import RatioSpec, layer_ratios, select_filters
from .surgery import prune_model

__all__ = ["inspect_model"]


def inspect_model(model: nn.Module, example_input=None, ratio: RatioSpec | None = None,
                  skip: str | Iterable[str] = (), *, bn_map: Mapping[str, str | None] | None = None,
                  leaf_modules: Iterable[str] = (), allow_inexact: bool = False) -> str:
    """The report of ``tpp inspect``: every prunable unit (private layer, coupled group with its members,
    attention heads) with its kind, size (``size×segments`` with grouped convs) and the share of the model's FLOPs
    spent in the layers pruning it shrinks (its producers and consumers; shares overlap), then every refused layer
    with the reason.

    ``example_input`` (e.g. one image) enables the FLOPs columns; ``ratio`` (any spec :func:`tpp.select_filters`
    takes, with ``skip``) adds the units it prunes and the FLOPs and parameter reduction of removing them, without
    training. ``bn_map``/``leaf_modules``/``allow_inexact`` go to :func:`tpp.graph.analyze_model`; units whose
    removal is inexact are marked, and with a ``ratio`` and an ``example_input`` the output deviation of removing
    them (after the zero-out, random weights) is shown. Raises what it and :func:`tpp.select_filters` raise.
    """
    graph = analyze_model(model, bn_map=bn_map, leaf_modules=leaf_modules, allow_inexact=allow_inexact)
    flops = flops_by_module(model, example_input) if example_input is not None else None
    total = sum(flops.values()) if flops else 0
    chosen = layer_ratios(graph, ratio, skip) if ratio is not None else {}
    kinds = [u.kind for u in graph.units.values()]
    lines = [f"{type(model).__name__}: {len(graph.layers)} Conv2d/Linear layers, {len(graph.units)} prunable units "
             f"({kinds.count('layer')} layers, {kinds.count('group')} groups, {kinds.count('heads')} attention "
             f"modules' heads), {len(graph.refusals)} refused" + ("" if graph.traced else " (from bn_map)")]
    if flops is not None:
        lines.append(f"FLOPs: {_si(total)} on an input of shape {_shape(example_input)}")
    header = f"{'unit':<48} {'kind':<6} {'size':>6}" + (f" {'FLOPs':>7}" if flops else "") + \
        (f" {'ratio':>6}" if ratio is not None else "")
    lines += ["", header]
    for unit in graph.units.values():
        size = f"{unit.size}" + (f"×{unit.segments}" if unit.segments > 1 else "")
        row = f"{_clip(unit.name + (' (inexact)' if unit.inexact else ''), 48):<48} {unit.kind:<6} {size:>6}"
        if flops:
            shrunk = set(unit.members) | {u.module for m in unit.members if m in graph.layers
                                          for u in graph.layers[m].uses if u.role == "input"}
            if unit.kind == "heads":  # a packed-qkv module's projections are called as Linears of their own
                shrunk |= {f"{unit.name}.qkv", f"{unit.name}.proj"}
            row += f" {100 * sum(flops.get(m, 0) for m in shrunk) / total:>6.1f}%"
        if ratio is not None:
            row += f" {chosen.get(unit.members[0], 0):>6.3g}"
        lines.append(row)
        if unit.kind == "group":
            members = [f"{m} [{s}, {s + w})" for m, (s, w) in zip(unit.members, unit.spans)] if unit.spans \
                else list(unit.members)
            lines.append(f"{'':<4}members: {', '.join(members + [p for p, _ in unit.parameters])}")
        if unit.inexact:
            lines.append(f"{'':<4}inexact: {unit.inexact}")
    lines += ["", f"refused ({len(graph.refusals)}):"]
    lines += [f"  {name}: {reason}" for name, reason in graph.refusals.items()]
    if ratio is not None:
        pruned = select_filters(model, ratio, skip, graph=graph)
        small = prune_model(model, pruned, graph=graph)
        inexact = graph.inexact_in(pruned)
        if inexact and example_input is not None:
            zeroed = copy.deepcopy(model)
            TPPRegularizer(zeroed, ratio, skip, graph=graph, example_input=example_input).zero_pruned()
            deviation = output_deviation(zeroed, small, example_input)
            what = f"output changes by max |Δ| {deviation['max_abs']:.4g}, {deviation['relative']:.3g} of max " \
                   "|output|" if deviation["max_output"] else "not measured: the model's output is 0 on this input " \
                   "(a zero-initialized classifier?)"
            lines.append(f"\ninexact removal of {', '.join(inexact)} (after the zero-out): {what}")
        params = f"params {_si(count_params(model))} -> {_si(count_params(small))}"
        if flops is not None:
            after = sum(flops_by_module(small, example_input).values())
            lines.append(f"\nratio {ratio}: {len(pruned)} layers pruned, FLOPs {_si(total)} -> {_si(after)} "
                         f"({total / after:.3f}x fewer), {params}")
        else:
            lines.append(f"\nratio {ratio}: {len(pruned)} layers pruned, {params}")
    return "\n".join(lines)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:g}"


def _shape(example_input) -> str:
    parts = example_input if isinstance(example_input, tuple) else (example_input,)
    return ", ".join(str(list(getattr(p, "shape", ()))) for p in parts)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]

