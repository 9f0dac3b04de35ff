"""The units of a walked graph (tpp-method.md §12): :func:`model_graph` turns the walks of a
:class:`tpp.walk.ChannelWalk` into the :class:`tpp.units.ModelGraph` that :func:`tpp.graph.analyze_model` returns.

Per layer: its uses (a constant a removed channel carries into a consumer folded in, :mod:`tpp.zeros`), why it is
not independently prunable (``coupling``), its join group and why that group cannot share one index set
(``group_coupling``). Then the units: private layers; coupled groups (one channel count, or streams of different
widths joined through option-A shortcuts, placed in the widest one's channels: ``Unit.spans``, ``Unit.pads``),
parameter producers included; attention heads. Every other Conv2d/Linear (and attention module) is a refusal with
its reason.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import fx, nn

from .attention import head_parameters
from .fxnodes import NORMALIZED, listing, out_channels
from .units import LayerInfo, ModelGraph, Unit
from .walk import ChannelWalk
from .zeros import ZERO, refusal

__all__ = ["model_graph"]


def model_graph(walk: ChannelWalk) -> ModelGraph:
    """The ``traced=True`` :class:`tpp.units.ModelGraph` of ``walk``'s graph."""
    return _Units(walk).model_graph()


class _Units:
    """Builds the :class:`tpp.units.ModelGraph` of one walk; ``blocking``: per producer, the first reason its join
    group cannot share one index set (None: it can), filled by :meth:`_layer` and :meth:`_parameter_blocking`."""

    def __init__(self, walk: ChannelWalk) -> None:
        self.walk = walk
        self.blocking: dict[str, str | None] = {}

    def model_graph(self) -> ModelGraph:
        """Every layer's :class:`tpp.units.LayerInfo`, the units and the refusals."""
        layers = [self._layer(name) for name in self.walk.order]  # fills self.blocking for every layer first
        for name in self.walk.produced:
            if name not in self.walk.modules:
                self._parameter_blocking(name)
        layers = {info.name: replace(info, group_coupling=self._group_coupling(self.walk.members(info.name)))
                  for info in layers}
        units, refusals = {}, {}
        for info in layers.values():
            parameters = tuple(p for p in self.walk.members(info.name) if p not in self.walk.modules)
            inexact = self._inexact(info.group, layers)
            if info.independent:
                units[info.name] = Unit(info.name, "layer", (info.name,), info.out_channels,
                                        self._segments((info.name,), layers), info.index, inexact=inexact)
            elif len(info.group) + len(parameters) > 1 and info.group_coupling is None \
                    and info.name == info.group[0]:
                sizes = {self.walk.source(m)[1] for m in info.group + parameters}
                if len(sizes) == 1:
                    dims = tuple((p, self.walk.channel_dim(p)) for p in parameters)
                    units[info.name] = Unit(info.name, "group", info.group, info.out_channels,
                                            self._segments(info.group, layers), info.index, dims, inexact)
                elif parameters or inexact is not None:
                    refusals[info.name] = f"group {listing(info.group + parameters)} joins different channel " \
                                          f"counts {sizes}"
                else:  # streams of different widths: placed by _spanned below, or refused there
                    units[info.name] = Unit(info.name, "group", info.group, max(sizes),
                                            self._segments(info.group, layers), info.index)
        for name, unit in list(units.items()):
            unit, reason = self._spanned(unit, layers)
            if unit is None:
                refusals[name] = reason
                del units[name]
            else:
                units[name] = unit
        heads = self._heads()
        for name, (unit, reason) in heads.items():
            if unit is not None:
                units[name] = unit
            else:
                refusals[name] = reason
        members = {m for unit in units.values() for m in unit.members}
        inside_heads = tuple(f"{name}." for name, unit in units.items() if unit.kind == "heads")  # opaque to fx
        for info in layers.values():
            if info.name in members or info.name in refusals or info.name.startswith(inside_heads):
                continue
            if len(info.group) > 1 and info.group_coupling is not None:
                refusals[info.name] = f"group {listing(info.group)} cannot share one index set: " \
                                      f"{info.group_coupling}"
            else:
                refusals[info.name] = info.coupling
        units = dict(sorted(units.items(), key=lambda item: (item[1].index, item[1].kind != "heads")))
        return ModelGraph(layers=layers, traced=True, units=units, refusals=refusals)

    def _segments(self, members: tuple[str, ...], layers: dict[str, LayerInfo]) -> int:
        """How many grouped-conv groups the members' channels are split into (lcm over producers and consumers)."""
        segments = 1
        for member in members:
            m = self.walk.modules[member]
            segments = math.lcm(segments, m.groups if isinstance(m, nn.Conv2d) else 1)
            for use in layers[member].uses:
                segments = math.lcm(segments, use.groups)
        return segments

    def _heads(self) -> dict[str, tuple[Unit | None, str | None]]:
        """Every attention module (:func:`tpp.attention.head_parameters`): its heads unit, or why its heads cannot
        be pruned."""
        walk, found = self.walk, {}
        for name, m in walk.modules.items():
            params = head_parameters(m)
            if not isinstance(m, nn.MultiheadAttention) and params is None:
                continue
            calls = walk.calls.get(name, [])
            reason = None
            if len(calls) != 1:
                reason = f"attention module is called {len(calls)} times in forward"
            elif params is None:
                reason = "q, k and v have separate projections (kdim/vdim differ from embed_dim); tpp prunes the " \
                         "heads of a packed in_proj_weight only"
            elif getattr(m, "bias_k", None) is not None or getattr(m, "add_zero_attn", False):
                reason = "add_bias_kv/add_zero_attn is not supported"
            elif params.num_heads < 2:
                reason = "a single head"
            if reason is not None:
                found[name] = (None, reason)
                continue
            at = walk.pos[calls[0]]
            index = sum(1 for layer in walk.order if walk.calls.get(layer) and walk.pos[walk.calls[layer][0]] < at)
            found[name] = (Unit(name, "heads", (name,), params.num_heads, 1, index), None)
        return found

    def _group_coupling(self, group: tuple[str, ...]) -> str | None:
        """The first member's reason the group cannot be pruned with one shared index set, None if it can."""
        for member in group:
            reason = self.blocking[member]
            if reason is not None:
                return reason if len(group) == 1 else f"{member}: {reason}"
        states: dict[fx.Node, tuple] = {}
        widths = len({self.walk.source(m)[1] for m in group})  # streams of different widths meet at offsets: _spanned
        for member in group:  # joined producers must meet with their channels in the same place
            for node, state in self.walk.walked(member)[4].items():
                if state is not None and widths > 1:
                    state = state[0]
                if state is not None and states.setdefault(node, state) != state:
                    return f"{member}: its channels reach node {node.name} laid out as {state}, other members' as " \
                           f"{states[node]}"
        return None

    def _inexact(self, group: tuple[str, ...], layers: dict[str, LayerInfo]) -> str | None:
        """Why removing the group's channels changes the output (LayerNorms over them, allow_inexact), or None."""
        norms = list(dict.fromkeys(u.module for m in group for u in layers[m].uses if u.role == "ln"))
        if not norms:
            return None
        named = ", ".join(norms[:3]) + (f" and {len(norms) - 3} more LayerNorms" if len(norms) > 3 else "")
        return f"{NORMALIZED} {named} together with kept channels: removal changes their mean and variance " \
               "(tpp-method.md §12)"

    def _parameter_blocking(self, name: str) -> None:
        """``self.blocking`` of a parameter producer: the first reason its channels cannot follow the group."""
        _, reasons, _, is_output, _ = self.walk.walked(name)
        _, inexact = self.walk.carried(self.walk.root(name))
        blocking = [r for _, r, shared in sorted(reasons, key=lambda t: t[0]) if not shared]
        blocking += [r for _, r in sorted(inexact)]
        self.blocking[name] = "output is the model output" if is_output else (blocking or [None])[0]

    def _layer(self, name: str) -> LayerInfo:
        """Layer ``name``'s :class:`tpp.units.LayerInfo` (``group_coupling`` is set later); fills its ``blocking``."""
        m = self.walk.modules[name]
        channels = out_channels(m)
        uses, reasons, bn, is_output, _ = self.walk.walked(name)
        values, inexact = self.walk.carried(self.walk.root(name))
        uses, reasons = list(uses), list(reasons) + [(pos, reason, False) for pos, reason in inexact]
        for i, (pos, use, src) in enumerate(uses):
            carried = values.get(src, ZERO) if use.role == "input" else ZERO
            why = refusal(carried, use.module, self.walk.modules, channels)
            if why is not None:
                reasons.append((pos, why, False))
            elif carried:
                uses[i] = (pos, replace(use, constant=carried), src)
        uses = tuple(dict.fromkeys(use for _, use, _ in sorted(uses, key=lambda t: t[0])))
        reasons.sort(key=lambda t: t[0])
        blocking = [r for _, r, shared in reasons if not shared]
        normalized = [r for r in blocking if NORMALIZED in r]  # the reason a user most needs to see
        blocking = (normalized or blocking or [None])[0]
        reasons = [r for _, r, _ in reasons]
        structural = self._structural(name, m)
        coupling = "output is the model output" if is_output else structural or (reasons[0] if reasons else None)
        self.blocking[name] = "output is the model output" if is_output else structural or blocking
        root = self.walk.root(name)
        group = tuple(sorted((n for n in self.walk.order if self.walk.root(n) == root), key=self.walk.index.get))
        return LayerInfo(
            name=name,
            kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            index=self.walk.index[name],
            out_channels=channels,
            bn=bn,
            uses=uses,
            coupling=coupling,
            group=group,
            is_output=is_output,
        )

    def _structural(self, name: str, m: nn.Module) -> str | None:
        """A reason not to prune ``name`` that does not depend on its consumers."""
        calls = self.walk.produced.get(name, [])
        for node in self.walk.nodes:
            if node.op == "get_attr" and node.target.rpartition(".")[0] == name:
                return f"its parameter {node.target} is read directly in forward (node {node.name})"
        if not calls:
            return "never called as a module in forward"
        if len(calls) > 1:
            return f"module is called {len(calls)} times in forward (shared module)"
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1:
            return "depthwise conv: its channels follow the layer feeding it"
        own = {id(p) for p in m.parameters()}
        for other, mod in self.walk.modules.items():
            if other != name and mod is not m and any(id(p) in own for p in mod.parameters(recurse=False)):
                return f"shares parameters with {other}"
        return None

    def _spanned(self, unit: Unit, layers: dict[str, LayerInfo]) -> tuple[Unit | None, str | None]:
        """``unit`` (a layer or a group, possibly of different widths) with its ``spans`` and ``pads`` set, or why
        its members cannot share one channel space.

        Member ``m`` starts at ``s_m`` of the unit's channels; a node reached by ``m`` with its channels at offset
        ``o`` holds unit channels from ``s_m − o`` on, which must agree over every member reaching it."""
        walks = {m: {n: st for n, st in self.walk.walked(m)[4].items() if st is not None} for m in unit.members}
        widths = {m: self.walk.source(m)[1] for m in unit.members}
        starts = {max(unit.members, key=widths.get): 0}
        base: dict[fx.Node, int] = {}
        todo = list(starts)
        while todo:
            member = todo.pop()
            for node, state in walks[member].items():
                at = starts[member] - state[1]
                if base.setdefault(node, at) != at:
                    return None, f"group {listing(unit.members)} reaches node {node.name} at two channel offsets"
                for other in unit.members:
                    if other not in starts and node in walks[other]:
                        starts[other] = at + walks[other][node][1]
                        todo.append(other)
        if len(starts) < len(unit.members):
            return None, f"group {listing(unit.members)} joins streams tpp cannot place in one channel space"
        low = min(starts.values())
        spans = tuple((starts[m] - low, widths[m]) for m in unit.members)
        size = max(s + w for s, w in spans)
        covered = torch.zeros(size, dtype=torch.bool)
        for s, w in spans:
            covered[s:s + w] = True
        pads = tuple(sorted({(n.target, at - low) for n, at in base.items() if self.walk.kinds[n][0] == "pad"},
                            key=lambda p: self.walk.pos[self.walk.calls[p[0]][0]]))
        if all(span == (0, size) for span in spans):
            return replace(unit, pads=pads), None
        if not covered.all():
            return None, f"group {listing(unit.members)}: channels {int((~covered).nonzero()[0])}… of the joined " \
                         "streams come from no layer"
        if unit.segments > 1 or unit.parameters or unit.inexact is not None:
            return None, f"group {listing(unit.members)} joins streams of different widths and feeds grouped convs, " \
                         "has parameter producers or LayerNorms over its channels"
        constant = [u.module for m in unit.members for u in layers[m].uses if u.constant]
        if constant:
            return None, f"group {listing(unit.members)} joins streams of different widths and a removed channel " \
                         f"reaches {constant[0]} as a constant; tpp folds constants of one-width units only"
        return replace(unit, channels=size, spans=spans, pads=pads), None
