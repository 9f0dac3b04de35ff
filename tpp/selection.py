"""Which filters to prune (tpp-method.md §5): per-layer ratios from a spec, then the smallest-L1 filters.

Ratio specs (``pruning_ratio``):

* a float ``r`` — every independently prunable Conv2d/Linear except the classifier gets ``r``;
* a string ``"pattern:r,pattern:r"`` or a dict ``{pattern_or_name: r}`` — shell wildcards (``fnmatch``) on
  qualified module names; when several patterns match a layer, the **last** one wins.

``skip`` patterns force ratio 0. Scores are ``mean |w|`` per filter (float64); the pruned filters are the
``n = min(⌈r·N⌉, ⌊0.995·N⌋)`` smallest, ties broken by the lower index. ``⌈r·N⌉`` and ``⌊0.995·N⌋`` are computed
exactly on the decimal ratio (the reference code's float product gives ``⌈0.3·10⌉ = 4``; here it is 3).
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import Iterable, Mapping, Union

import torch
from torch import Tensor, nn

from .graph import ModelGraph, analyze_model

RatioSpec = Union[float, str, Mapping[str, float]]

MAX_PRUNED_FRACTION = Fraction(995, 1000)

__all__ = ["RatioSpec", "parse_ratio_spec", "layer_ratios", "filter_scores", "num_pruned", "select_filters"]


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


def layer_ratios(graph: ModelGraph, pruning_ratio: RatioSpec, skip: Union[str, Iterable[str]] = ()) -> dict[str, float]:
    """Resolve a ratio spec to ``{layer: ratio > 0}`` over the graph's Conv2d/Linear layers (execution order).

    Raises ``ValueError`` for a ratio outside [0, 1), a pattern or skip pattern matching no Conv2d/Linear layer,
    and a nonzero ratio landing on a layer that is not independently prunable (naming the coupling)."""
    names = list(graph.layers)
    skips = _skip_patterns(skip)
    for pattern in skips:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"skip pattern {pattern!r} matches no Conv2d/Linear layer; layers are: {_preview(names)}")

    if isinstance(pruning_ratio, (int, float)) and not isinstance(pruning_ratio, bool):
        ratio = _check_ratio(pruning_ratio, "every prunable layer")
        chosen = {n: ratio for n in graph.independent()}
    else:
        chosen, origin = {}, {}
        for pattern, ratio in parse_ratio_spec(pruning_ratio):
            matched = [n for n in names if fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(f"pruning ratio pattern {pattern!r} matches no Conv2d/Linear layer; "
                                 f"layers are: {_preview(names)}")
            for n in matched:
                chosen[n], origin[n] = ratio, pattern
        for n, ratio in chosen.items():
            info = graph.layers[n]
            if ratio > 0 and not info.independent and not any(fnmatchcase(n, s) for s in skips):
                raise ValueError(f"pattern {origin[n]!r} sets ratio {ratio} on layer {n!r}, which cannot be pruned "
                                 f"on its own: {info.coupling}. Exclude it with a narrower pattern or `skip`.")
    return {n: r for n, r in chosen.items()
            if r > 0 and not any(fnmatchcase(n, s) for s in skips)}


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


def select_filters(model: nn.Module, pruning_ratio: RatioSpec, skip: Union[str, Iterable[str]] = (),
                   *, graph: ModelGraph | None = None, bn_map: Mapping[str, str | None] | None = None
                   ) -> dict[str, Tensor]:
    """``{qualified layer name: sorted int64 indices of the filters to prune}`` for every layer with ratio > 0.

    ``graph`` reuses an existing analysis; ``bn_map`` is passed to :func:`tpp.graph.analyze_model` for models
    torch.fx cannot trace."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    graph = graph if graph is not None else analyze_model(model, bn_map=bn_map)
    modules = dict(model.named_modules())
    pruned = {}
    for name, ratio in layer_ratios(graph, pruning_ratio, skip).items():
        scores = filter_scores(modules[name].weight)
        order = torch.sort(scores, stable=True).indices
        pruned[name] = order[: num_pruned(ratio, scores.numel())].sort().values
    return pruned
