"""Which filters to prune (tpp-method.md §5, §12): per-unit ratios from a spec, then the smallest-score units.

Units are those of :mod:`tpp.graph` — private layers, coupled groups, attention heads. Ratio specs
(``pruning_ratio``):

* a float ``r`` — every unit gets ``r`` (the classifier is never a unit);
* a string ``"pattern:r,pattern:r"`` or a dict ``{pattern_or_name: r}`` — shell wildcards (``fnmatch``) on
  qualified module names; a pattern matches a group when it matches **any member's** name (heads: the attention
  module's name), and when several patterns match a unit, the **last** one wins.

``skip`` patterns force ratio 0 (a group is skipped when any member matches). Scores are ``mean |w|`` per filter
(float64; summed over a group's producers, averaged over those covering a channel where streams of different
widths are joined, see :func:`unit_scores`); the pruned units are the
``n = min(⌈r·N⌉, ⌊0.995·N⌋)`` smallest, ties broken by the lower index. ``⌈r·N⌉`` and ``⌊0.995·N⌋`` are computed
exactly on the decimal ratio (the reference code's float product gives ``⌈0.3·10⌉ = 4``; here it is 3).

:func:`search_speedup` finds the ratios for a target FLOPs speedup instead: one uniform ratio, or a ``global``
ranking of normalized scores, by bisection on :func:`tpp.count_flops` of the pruned model.
"""
from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import Iterable, Mapping, NamedTuple, Union

import torch
from torch import Tensor, nn

from .attention import head_parameters
from .graph import ModelGraph, Unit, analyze_model

RatioSpec = Union[float, str, Mapping[str, float]]

MAX_PRUNED_FRACTION = Fraction(995, 1000)

__all__ = ["RatioSpec", "parse_ratio_spec", "unit_ratios", "layer_ratios", "filter_scores", "unit_scores",
           "spanned_scores", "num_pruned", "select_filters", "pruned_by_ratio", "SPEEDUP_MODES", "SpeedupSearch",
           "search_speedup"]


def _check_ratio(ratio, where: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"pruning ratio for {where} must be a number in [0, 1), got {ratio!r}")
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio for {where} must lie in [0, 1), got {ratio!r}")
    return float(ratio)


def parse_ratio_spec(spec: Union[str, Mapping[str, float]]) -> list[tuple[str, float]]:
    """``"pat:r,pat:r"`` or ``{pat: r}`` → ordered ``[(pattern, ratio)]`` with every ratio checked."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            pattern, sep, value = part.rpartition(":")
            if not sep or not pattern.strip():
                raise ValueError(f"pruning ratio spec entry {part!r} is not of the form 'pattern:ratio'")
            try:
                items.append((pattern.strip(), float(value)))
            except ValueError:
                raise ValueError(f"pruning ratio spec entry {part!r}: {value!r} is not a number") from None
        if not items:
            raise ValueError(f"pruning ratio spec {spec!r} names no 'pattern:ratio' pair")
    else:
        raise TypeError(f"pruning_ratio must be a float, a 'pattern:ratio,...' string or a dict, "
                        f"got {type(spec).__name__}")
    for pattern, ratio in items:
        if not isinstance(pattern, str):
            raise TypeError(f"pruning ratio pattern must be a string, got {pattern!r}")
        _check_ratio(ratio, f"pattern {pattern!r}")
    return [(p, float(r)) for p, r in items]


def _skip_patterns(skip: Union[str, Iterable[str]]) -> list[str]:
    patterns = [s.strip() for s in skip.split(",")] if isinstance(skip, str) else list(skip)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"skip patterns must be non-empty strings, got {pattern!r}")
    return patterns


def unit_ratios(graph: ModelGraph, pruning_ratio: RatioSpec, skip: Union[str, Iterable[str]] = ()
                ) -> dict[str, float]:
    """Resolve a ratio spec to ``{unit name: ratio > 0}`` over the graph's prunable units (zero-out order).

    A float applies to every unit (the classifier is never one). A pattern matches a unit when it matches the
    name of any of its members (a group's Conv2d/Linear layers; for heads, the attention module); a unit takes the
    ratio of the **last** pattern matching it. A unit with any member matching a ``skip`` pattern gets ratio 0.
    Raises ``ValueError`` for a ratio outside [0, 1), a pattern or skip pattern matching no layer, and a nonzero
    ratio landing on a layer in no unit (naming the reason)."""
    names = list(graph.layers) + [u.name for u in graph.units.values() if u.kind == "heads"]
    skips = _skip_patterns(skip)
    for pattern in skips:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"skip pattern {pattern!r} matches no Conv2d/Linear layer; layers are: {_preview(names)}")
    skipped = {n for n in names if any(fnmatchcase(n, s) for s in skips)}
    members = {m for unit in graph.units.values() for m in unit.members}

    if isinstance(pruning_ratio, (int, float)) and not isinstance(pruning_ratio, bool):
        ratio = _check_ratio(pruning_ratio, "every prunable layer")
        chosen = {name: ratio for name in graph.units}
    else:
        chosen = {}
        for pattern, ratio in parse_ratio_spec(pruning_ratio):
            matched = [n for n in names if fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(f"pruning ratio pattern {pattern!r} matches no Conv2d/Linear layer; "
                                 f"layers are: {_preview(names)}")
            for n in matched:
                if n not in members and ratio > 0 and n not in skipped:
                    reason = graph.refusals.get(n) or graph.layers[n].coupling
                    raise ValueError(f"pattern {pattern!r} sets ratio {ratio} on layer {n!r}, which cannot be "
                                     f"pruned: {reason}. Exclude it with a narrower pattern or `skip`.")
            for name, unit in graph.units.items():
                if any(fnmatchcase(m, pattern) for m in unit.members):
                    chosen[name] = ratio
    return {n: r for n, r in chosen.items() if r > 0 and not skipped.intersection(graph.units[n].members)}


def layer_ratios(graph: ModelGraph, pruning_ratio: RatioSpec, skip: Union[str, Iterable[str]] = ()
                 ) -> dict[str, float]:
    """:func:`unit_ratios` listed per member: ``{layer or attention module: ratio > 0}``."""
    return {m: r for name, r in unit_ratios(graph, pruning_ratio, skip).items() for m in graph.units[name].members}


def _preview(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@torch.no_grad()
def filter_scores(weight: Tensor) -> Tensor:
    """L1 score of each output filter: ``mean |w|`` over all but the first dim, in float64 on the CPU."""
    return weight.detach().to("cpu", torch.float64).reshape(weight.shape[0], -1).abs().mean(dim=1)


def num_pruned(ratio: float, n: int) -> int:
    """``min(⌈r·N⌉, ⌊0.995·N⌋)``, exact on the decimal value of ``r``."""
    return min(math.ceil(Fraction(repr(float(ratio))) * n), math.floor(MAX_PRUNED_FRACTION * n))


@torch.no_grad()
def unit_scores(model: nn.Module, unit: Unit) -> Tensor:
    """Scores of a unit's ``size`` units (tpp-method.md §5, §12), float64 on the CPU.

    A layer's filter: ``mean |w|``; a group's channel: the sum over its producers of each one's ``mean |w|`` (a
    parameter producing channels counts as one: its ``mean |p|`` over its other dims); with
    grouped convs a unit's rows are one per group and their mean is taken; a head: ``mean |w|`` over its q, k and
    v rows of the packed in-projection. A group with ``spans`` (streams of different widths joined through option-A
    shortcuts): :func:`spanned_scores`."""
    modules = dict(model.named_modules())
    if unit.kind == "heads":
        w = head_parameters(modules[unit.name]).packed_weight.detach().to("cpu", torch.float64)
        return w.reshape(3, unit.channels, -1).abs().mean(dim=(0, 2))
    if unit.spans:
        return spanned_scores(modules, unit)
    total = torch.zeros(unit.size, dtype=torch.float64)
    for member in unit.members:
        total += filter_scores(modules[member].weight).reshape(unit.segments, unit.size).mean(dim=0)
    for name, dim in unit.parameters:  # a class token, position embedding or layer scale: mean |p| per channel
        total += filter_scores(model.get_parameter(name).detach().movedim(dim, 0))
    return total


def spanned_scores(modules: Mapping[str, nn.Module], unit: Unit) -> Tensor:
    """Scores of a spanned group's channels: the **mean**, over the members covering a channel, of each member's row
    score relative to that member's mean row score.

    tpp-method.md §12 sums over producers, which ranks alike when every producer covers every channel; here the
    stage-1 channels of a CIFAR ResNet are covered by all three stages' producers and the outer channels of the
    widest stream by its producers only, so a sum would rank a channel by how many layers cover it, not by its
    weights. Relative scores, because the stages' weights have different scales (He initialization shrinks them
    with the fan-in): raw means would prune the stage with the smallest weights first, whatever its channels."""
    total = torch.zeros(unit.channels, dtype=torch.float64)
    covered = torch.zeros(unit.channels, dtype=torch.float64)
    for member, (start, width) in zip(unit.members, unit.spans):
        scores = filter_scores(modules[member].weight)
        total[start:start + width] += scores / scores.mean()
        covered[start:start + width] += 1
    return total / covered


def select_filters(model: nn.Module, pruning_ratio: RatioSpec, skip: Union[str, Iterable[str]] = (),
                   *, graph: ModelGraph | None = None, bn_map: Mapping[str, str | None] | None = None
                   ) -> dict[str, Tensor]:
    """``{qualified layer name: sorted int64 indices of the filters to prune}`` for every unit with ratio > 0.

    Every member of a group is listed with the same channel indices; heads under the attention module's name
    with head indices. ``graph`` reuses an existing analysis; ``bn_map`` is passed to
    :func:`tpp.graph.analyze_model` for models torch.fx cannot trace."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    graph = graph if graph is not None else analyze_model(model, bn_map=bn_map)
    return pruned_by_ratio(model, graph, unit_ratios(graph, pruning_ratio, skip))


def pruned_by_ratio(model: nn.Module, graph: ModelGraph, ratios: Mapping[str, float]) -> dict[str, Tensor]:
    """The smallest-score units of each unit in ``ratios`` (``{unit name: ratio}``), as ``select_filters`` lists
    them."""
    pruned = {}
    for name, ratio in ratios.items():
        unit = graph.units[name]
        scores = unit_scores(model, unit)
        order = torch.sort(scores, stable=True).indices
        pruned.update(unit.member_indices(order[: num_pruned(ratio, unit.size)]))
    return pruned


SPEEDUP_MODES = ("uniform", "global")


@dataclass(frozen=True)
class SpeedupSearch:
    """The outcome of :func:`search_speedup`: ``level`` (the uniform ratio, or the global fraction of all units),
    ``ratios`` ``{unit name: fraction pruned}``, the ``pruned`` dict (as :func:`select_filters` returns it) and the
    FLOPs ``speedup`` it reaches on the example input."""

    target: float
    mode: str
    level: float
    ratios: dict[str, float]
    pruned: dict[str, Tensor]
    speedup: float
    steps: int

    def ratio_spec(self, graph: ModelGraph) -> str:
        """The ratios as a ``"unit:ratio,..."`` spec that prunes exactly the searched counts (``(k − ½)/N`` to nine
        decimals, so that :func:`num_pruned` gives back ``k`` for any ``N`` below 10⁸): what a run records and
        resumes by."""
        parts = []
        for name, ratio in self.ratios.items():
            size = graph.units[name].size
            k = round(ratio * size)
            parts.append(f"{glob.escape(name)}:{(k - 0.5) / size:.9f}")
        spec = ",".join(parts)
        found = {n: num_pruned(r, graph.units[n].size) for n, r in unit_ratios(graph, spec).items()}
        if found != {n: round(r * graph.units[n].size) for n, r in self.ratios.items()}:
            raise RuntimeError(f"ratio spec {spec!r} does not reproduce the searched counts")
        return spec

    def describe(self) -> str:
        """One line per unit with its ratio, then the speedup reached."""
        lines = [f"target speedup {self.target:g}x ({self.mode} {self.level:.4g}): {self.speedup:.3f}x by "
                 f"count_flops after {self.steps} steps"]
        lines += [f"  {name}: {ratio:.4g}" for name, ratio in self.ratios.items()]
        return "\n".join(lines)


def search_speedup(model: nn.Module, target: float, example_input, *, mode: str = "uniform",
                   skip: Union[str, Iterable[str]] = (), graph: ModelGraph | None = None,
                   tolerance: float = 0.02, max_steps: int = 40) -> SpeedupSearch:
    """Ratios whose pruning reaches ``count_flops(model) / count_flops(pruned) = target`` within ``tolerance``.

    ``mode="uniform"``: one ratio for every unit (every unit but the skipped ones), found by bisection; where the
    counts jump (many units change at one ratio), some units (in zero-out order) take the next count up.
    ``mode="global"``: every unit's scores (:func:`unit_scores`) divided by that unit's mean score, ranked
    together; the lowest fraction ``q`` of all units is pruned (each unit capped at ``⌊0.995·N⌋``), ``q`` found by
    bisection. FLOPs are counted on ``example_input`` (a batch of one is enough). ``model`` is not modified.
    Raises ``ValueError`` for a target ≤ 1, an unknown mode, or a target beyond what pruning every unit at the
    cap reaches (naming that speedup), or when the discrete counts cannot land within ``tolerance``.
    """
    from .metrics import count_flops
    from .surgery import prune_model

    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 1:
        raise ValueError(f"target_speedup must be a finite number > 1, got {target!r}")
    if mode not in SPEEDUP_MODES:
        raise ValueError(f"speedup mode must be one of {SPEEDUP_MODES}, got {mode!r}")
    graph = graph if graph is not None else analyze_model(model)
    units = list(unit_ratios(graph, 0.5, skip))
    if not units:
        raise ValueError(f"{type(model).__name__} has no prunable unit: nothing can reach a speedup")
    base = count_flops(model, example_input)
    scores = {name: unit_scores(model, graph.units[name]) for name in units}

    def at(level: float, counts: Mapping[str, int]) -> _Candidate:
        pruned, ratios = {}, {}
        for name, k in counts.items():
            unit = graph.units[name]
            if k:
                pruned.update(unit.member_indices(torch.sort(scores[name], stable=True).indices[:k]))
                ratios[name] = k / unit.size
        flops = count_flops(prune_model(model, pruned, graph=graph), example_input) if pruned else base
        return _Candidate(level, ratios, pruned, base / flops)

    def counts_at(q: float) -> dict[str, int]:
        return _uniform_counts(graph, units, q) if mode == "uniform" else _global_counts(graph, scores, q)

    def off(candidate: _Candidate) -> float:
        return abs(candidate.speedup / target - 1)

    low, high = 0.0, float(MAX_PRUNED_FRACTION)
    best = at(high, counts_at(high))
    if best.speedup < target * (1 - tolerance):
        raise ValueError(f"target speedup {target:g}x is out of reach: pruning every unit of "
                         f"{type(model).__name__} at the cap ({float(MAX_PRUNED_FRACTION)}) gives {best.speedup:.3f}x")
    steps = 1
    while off(best) > tolerance and steps < max_steps and high - low > 1e-9:
        mid = (low + high) / 2
        found = at(mid, counts_at(mid))
        steps += 1
        best = found if off(found) < off(best) else best
        low, high = (mid, high) if found.speedup < target else (low, mid)
    # units change counts in steps (many at one ratio): take the units that differ between the bracketing ratios
    # one at a time, in zero-out order, from the lower ratio's count to the higher one's
    below, above = counts_at(low), counts_at(high)
    differ = [name for name in units if below[name] != above[name]]
    first, last = 0, len(differ)
    while off(best) > tolerance and steps < max_steps and last - first > 1:
        k = (first + last) // 2
        found = at(low, {**below, **{name: above[name] for name in differ[:k]}})
        steps += 1
        best = found if off(found) < off(best) else best
        first, last = (k, last) if found.speedup < target else (first, k)
    if off(best) > tolerance:
        raise ValueError(f"no {mode} ratio reaches {target:g}x within {tolerance:.0%}: the closest is "
                         f"{best.speedup:.3f}x (the units are too coarse); try mode='global' or another target")
    return SpeedupSearch(float(target), mode, *best, steps)


class _Candidate(NamedTuple):
    level: float
    ratios: dict[str, float]
    pruned: dict[str, Tensor]
    speedup: float


def _uniform_counts(graph: ModelGraph, units: list[str], ratio: float) -> dict[str, int]:
    return {name: num_pruned(round(ratio, 12), graph.units[name].size) for name in units}


def _global_counts(graph: ModelGraph, scores: Mapping[str, Tensor], fraction: float) -> dict[str, int]:
    """How many units of each unit to prune when the lowest ``fraction`` of all normalized scores go."""
    names = list(scores)
    normalized = torch.cat([s / s.mean().clamp_min(torch.finfo(torch.float64).tiny) for s in scores.values()])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores.values())])
    order = torch.sort(normalized, stable=True).indices[: math.floor(fraction * normalized.numel())]
    counts = torch.bincount(owner[order], minlength=len(names))
    return {name: min(int(c), math.floor(MAX_PRUNED_FRACTION * graph.units[name].size))
            for name, c in zip(names, counts)}
