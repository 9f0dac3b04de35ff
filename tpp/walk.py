"""The walk of :func:`tpp.graph.analyze_model`: every producer's output channels followed forward through one
traced graph (tpp-method.md §12).

:class:`ChannelWalk` classifies each node (:func:`tpp.fxnodes.classify`) and knows what the walk needs of each value
— its rank (:func:`tpp.layouts.ranks`), the producers' channels and other values it carries, its channel count —
and the join groups (union-find over producers whose outputs meet at an add/mul). It then follows each producer (a
Conv2d/Linear, an attention module's out-projection, a parameter read in forward such as a class token) from its
output node by node (:meth:`ChannelWalk.walked`): each step gives the channels' layout after the node, the
:class:`tpp.units.ChannelUse` of a module using them, or the reason the walk stops there.
:meth:`ChannelWalk.carried` says what a removed channel is at each node it reaches (:mod:`tpp.zeros`). The units
are built from the walks by :mod:`tpp.unitbuild`.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, fx, nn

from .attention import head_parameters
from .fxnodes import BNS, FLAT, LAST, LAYERS, MOVES, NCHW, NCL, NORMALIZED, UNARY, Tracer, arg, classify, out_channels
from .layouts import moved, ranks
from .units import ChannelUse
from .zeros import ZERO, Carried, through

__all__ = ["ChannelWalk"]


_OWNERS = LAYERS + BNS + (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)  # whose parameters are not producers


def _projections(name: str, module: nn.Module) -> tuple[str, str]:
    """The attention module's in-projection (the consumer of its input's channels) and out-projection (the producer
    of its output's channels): ``nn.MultiheadAttention`` itself (``in_proj_weight``) and ``out_proj``, else the
    packed-qkv layout's ``qkv`` and ``proj`` Linears."""
    if isinstance(module, nn.MultiheadAttention):
        return name, f"{name}.out_proj"
    return f"{name}.qkv", f"{name}.proj"


class ChannelWalk:
    """Per-node facts of one traced graph and every producer's walk, computed on construction.

    Read by :mod:`tpp.unitbuild`: ``modules`` (by qualified name), ``nodes`` (in execution order), ``pos`` (a
    node's place in ``nodes``), ``kinds`` (:func:`tpp.fxnodes.classify` of each node), ``calls`` (each module's call
    nodes), ``order`` (the Conv2d/Linear modules: those called, in call order, then the others), ``produced`` (each
    producer's output nodes), ``index`` (producers in execution order: the layers, then parameters) and the methods
    :meth:`walked`, :meth:`carried`, :meth:`root`, :meth:`members`, :meth:`source`, :meth:`channel_dim`.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, allow_inexact: bool = False,
                 leaves: Iterable[str] = ()) -> None:
        self.allow_inexact, self.leaves = allow_inexact, leaves
        self.modules = dict(model.named_modules())
        self.nodes = list(graph.nodes)
        self.pos = {node: i for i, node in enumerate(self.nodes)}
        self.kinds = {node: classify(node, self.modules) for node in self.nodes}
        self.calls: dict[str, list[fx.Node]] = {}
        for node in self.nodes:
            if node.op == "call_module":
                self.calls.setdefault(node.target, []).append(node)
        registered = [name for name, m in self.modules.items() if isinstance(m, LAYERS)]
        called = [name for name in self.calls if isinstance(self.modules[name], LAYERS)]
        self.order = called + [name for name in registered if name not in self.calls]
        self.produced = self._produced(model)
        self.index = {name: i for i, name in enumerate(self.order + [p for p in self.produced if p not in
                                                                      self.modules])}
        parameters = {n.target: len(self._parameter(n.target).shape) for n in self.nodes
                      if n.op == "get_attr" and n.target in self.produced}
        self.ranks = ranks(self.nodes, self.kinds, parameters)
        self.internal: set[fx.Node] = set()  # concatenations along a non-channel dim (tokens): joins of a group
        self.counts = self._channel_counts()
        self._carried: dict[str, tuple] = {}  # per join group (by root): what carried found
        self._walk_all()
        if self.internal:  # what the concatenations along tokens carry is known now: walk again with it
            self._walk_all()

    def _walk_all(self) -> None:
        """Value origins, the groups joined by add/mul (union-find) and every producer's walk."""
        self.origins = self._origins()
        self.walks: dict[str, tuple] = {}  # per producer: what _walk found
        self.parent = {name: name for name in self.index}  # union-find over joined producers
        for node in self.nodes:
            if self.kinds[node][0] == "join":
                self._union(set().union(*(self.origins[a][0] for a in node.all_input_nodes)))
        for name in self.produced:
            self.walked(name)

    def _produced(self, model: nn.Module) -> dict[str, list[fx.Node]]:
        """Where each producer's output channels appear: a Conv2d/Linear at its calls, an attention module's
        out-projection at the module's output, and a parameter read in forward (not one of a layer, a norm or an
        attention module: e.g. a class token, a position embedding, a layer scale) at its ``get_attr`` nodes."""
        produced = {name: list(calls) for name, calls in self.calls.items() if isinstance(self.modules[name], LAYERS)}
        parameters = dict(model.named_parameters())
        for node in self.nodes:
            kind, detail = self.kinds[node]
            if kind == "attention-output" and detail == 0 or kind == "attention" and not isinstance(
                    self.modules[node.target], nn.MultiheadAttention):
                attention = node.args[0].target if kind == "attention-output" else node.target
                produced.setdefault(_projections(attention, self.modules[attention])[1], []).append(node)
            elif node.op == "get_attr" and node.target in parameters:
                owner = self.modules[node.target.rpartition(".")[0]]
                if not isinstance(owner, _OWNERS) and head_parameters(owner) is None:
                    produced.setdefault(node.target, []).append(node)
        return produced

    def _parameter(self, name: str) -> Tensor:
        return self.modules[""].get_parameter(name)

    def _origins(self) -> dict[fx.Node, tuple[frozenset[str], tuple[str, ...]]]:
        """For every node: the layers whose output channels it carries, and the non-layer values mixed in."""
        producer = {node: name for name, nodes in self.produced.items() for node in nodes}
        origins = {}
        for node in self.nodes:
            kind = self.kinds[node][0]
            if node in producer and kind != "depthwise":  # a depthwise conv carries its input's channels
                origins[node] = (frozenset({producer[node]}), ())
            elif kind in UNARY | MOVES | {"layernorm"} and node.args and isinstance(node.args[0], fx.Node):
                origins[node] = origins[node.args[0]]
            elif kind == "join" or node in self.internal:
                parts = [origins[a] for a in node.all_input_nodes]
                values = tuple(dict.fromkeys(v for p in parts for v in p[1]))  # deduplicated: diamonds repeat them
                origins[node] = (frozenset().union(*(p[0] for p in parts)), values)
            else:
                origins[node] = (frozenset(), (self._value(node),))
        return origins

    def _channel_counts(self) -> dict[fx.Node, int]:
        """Channels (dim 1) of the NCHW values whose count follows from the layers producing them."""
        counts: dict[fx.Node, int] = {}
        for node in self.nodes:
            kind, m = self.kinds[node]
            args = [a for a in node.all_input_nodes if a in counts]
            if kind in ("layer", "grouped") and isinstance(m, nn.Conv2d):
                counts[node] = m.out_channels
            elif kind in ("depthwise", "bn", "carry", "spatial") and node.args and node.args[0] in counts:
                counts[node] = counts[node.args[0]]
            elif kind == "join" and args:
                counts[node] = counts[args[0]]
            elif kind == "pad":
                counts[node] = m.out_channels
            elif kind == "cat" and arg(node, 1, "dim", 0) in (1, -3):
                parts = node.args[0]
                if all(isinstance(a, fx.Node) and a in counts for a in parts):
                    counts[node] = sum(counts[a] for a in parts)
        return counts

    def root(self, name: str) -> str:
        """The producer naming ``name``'s join group (its first member in execution order)."""
        while self.parent[name] != name:
            name = self.parent[name]
        return name

    def _union(self, names: Iterable[str]) -> None:
        """Join the groups of ``names`` (producers), under the first in execution order."""
        names = sorted(names, key=self.index.get)
        for name in names[1:]:
            self.parent[self.root(name)] = self.root(names[0])

    def members(self, name: str) -> tuple[str, ...]:
        """The producers joined with ``name`` (incl. itself): layers, then parameters, each in execution order."""
        root = self.root(name)
        return tuple(n for n in self.index if self.root(n) == root)

    def source(self, name: str) -> tuple[str, int]:
        """The layout and number of channels a producer emits: a Conv2d NCHW, a Linear (or out-projection) in the
        last dim, a parameter per :meth:`channel_dim`."""
        m = self.modules.get(name)
        if m is not None:
            return (NCHW if isinstance(m, nn.Conv2d) else LAST), out_channels(m)
        dim = self.channel_dim(name)
        return (NCHW if dim == -3 else LAST), self._parameter(name).shape[dim]

    def channel_dim(self, name: str) -> int:
        """A parameter's channel dim: -3 for ``[..., C, 1, 1]`` (added to or scaling NCHW values), else -1."""
        shape = self._parameter(name).shape
        return -3 if len(shape) >= 3 and shape[-2:] == (1, 1) else -1

    def walked(self, name: str) -> tuple:
        """What the walk of producer ``name`` found (see :meth:`_walk`), walked once."""
        if name not in self.walks:
            self.walks[name] = self._walk(name, *self.source(name))
        return self.walks[name]

    def _walk(self, name: str, layout: str, channels: int):
        """Follow ``name``'s output channels forward.

        The walk's state is ``(layout, offset, total)``: the channels sit at ``[offset, offset + channels)`` of a
        value with ``total`` channels (concatenations shift them). Returns ``(uses, reasons, bn, is_output, seen)``:
        ``(position, use, node feeding it)`` and ``(position, coupling reason, whether it is a join with joined
        layers' channels only)``, the BatchNorm applied directly to the layer's output, whether the channels reach
        the model output, and the state after each node reached (None where the walk stopped).
        """
        starts = self.produced.get(name, [])
        todo = [(node, (layout, 0, channels)) for node in starts]
        seen = {node: (layout, 0, channels) for node in starts}
        aligned = set(starts)  # nodes the channels reach through no concatenation (only PadShortcuts change widths)
        uses, reasons, bn, is_output = [], [], None, False
        while todo:
            src, state = todo.pop()
            for node in src.users:
                if node.op == "output":
                    is_output = True
                    continue
                nxt, use, reason = self._step(name, channels, src, node, state)
                if node in seen:
                    if nxt is not None and seen[node] is not None and seen[node] != nxt:
                        reasons.append((self.pos[node], f"output reaches node {node.name} at two channel offsets",
                                        False))
                    continue
                seen[node] = nxt
                if use is not None:
                    uses.append((self.pos[node], use, src))
                    if use.role == "bn" and src in starts and bn is None:
                        bn = use.module
                if reason is not None:
                    shared = (self.kinds[node][0] == "join" or node in self.internal) and not self.origins[node][1] \
                        and (state[2] == channels or src in aligned)
                    reasons.append((self.pos[node], reason, shared))
                if nxt is not None:
                    todo.append((node, nxt))
                    if src in aligned and self.kinds[node][0] != "cat":
                        aligned.add(node)
        return uses, reasons, bn, is_output, seen

    def carried(self, root: str) -> tuple[dict[fx.Node, Carried], list[tuple[int, str]]]:
        """What a removed channel of the layers joined under ``root`` is at each node it reaches
        (:func:`tpp.zeros.through`, from 0 at the layers), and every ``(position, reason)`` it cannot be exact."""
        if root not in self._carried:
            members = self.members(root)
            values = {node: ZERO for member in members for node in self.produced.get(member, [])}
            offsets: dict[fx.Node, int] = {}
            for member in members:
                for node, state in self.walked(member)[4].items():
                    if state is not None and node not in values:
                        offsets.setdefault(node, state[1])
            reasons = []
            for node in sorted(offsets, key=self.pos.get):
                inputs = {a: values[a] for a in node.all_input_nodes if a in values}
                if any(a in offsets and a not in values for a in node.all_input_nodes):
                    continue  # behind a refused node
                carried, reason = through(node, self.kinds[node][0], inputs, offsets[node],
                                          f"{self._describe(node)} (node {node.name})", self.modules)
                if carried is not None:
                    values[node] = carried
                elif reason is not None:
                    reasons.append((self.pos[node], reason))
            self._carried[root] = values, reasons
        return self._carried[root]

    def _step(self, name: str, channels: int, src: fx.Node, node: fx.Node, state: tuple[str, int, int]):
        """One step of ``name``'s channels (``state`` = layout, offset, total; carried by ``src``) into ``node``.

        Returns ``(state after node or None to stop, ChannelUse or None, coupling reason or None)``.
        """
        layout, offset, total = state
        kind, m = self.kinds[node]
        if kind == "meta":
            return None, None, None
        if kind == "join":
            return self._join(name, src, node, state, m)
        if kind == "cat":
            return self._cat(name, src, node, state)
        cannot = f"output reaches {self._describe(node)} (node {node.name}), which tpp cannot follow"
        if kind == "attention":
            return self._attention(src, node, state, m) or (None, None, cannot)
        if kind == "layernorm":
            return self._layernorm(src, node, state, m)
        if kind == "unknown" or node.args[:1] != (src,) or src in node.args[1:] or src in node.kwargs.values():
            return None, None, cannot
        if kind == "merge" and m is not None and layout == NCHW and m == total:
            attribute = self._size_attribute(node, total)
            if attribute is None:
                return None, None, f"{cannot}: it writes the channel count {total} as a constant that no single " \
                                   "int attribute of its module holds (removal could not update it)"
            return (NCL, offset, total), ChannelUse(attribute, "size"), None
        if kind in MOVES:
            after = moved(state, kind, m, self.ranks.get(src))
            return (after, None, None) if after else (None, None, f"{cannot} with its channels laid out as "
                                                                  f"'{layout}'")
        if node.op == "call_module" and kind in ("bn", "depthwise", "layer", "grouped") \
                and len(self.calls[node.target]) > 1:
            return None, None, f"output reaches {node.target}, which is called {len(self.calls[node.target])} times"
        if kind == "grouped":
            if layout == NCHW and m.in_channels == total == channels:
                return None, ChannelUse(node.target, "input", groups=m.groups), None
            return None, None, f"output is consumed by grouped conv {node.target} (groups={m.groups}) after a " \
                               "concatenation"
        if kind == "carry":
            return state, None, None
        if kind in ("pad", "channel_pad"):
            return self._pad(node, state, m)
        if kind == "softmax":  # e.g. a classifier's log_softmax: coupled, but followed to the model output
            return state, None, f"output reaches {self._describe(node)} (node {node.name}), which mixes channels"
        if kind == "spatial" and layout == NCHW:
            return state, None, None
        if kind == "flatten" and layout in (NCHW, FLAT):
            return (FLAT, offset, total), None, None
        if kind == "mean" and layout == NCHW:
            return ((NCHW if m else FLAT), offset, total), None, None
        if kind == "bn" and m.num_features == total:  # BatchNorm1d after a Linear: assumes [B, C], not [B, T, C]
            if (isinstance(m, nn.BatchNorm2d) and layout == NCHW) or (
                isinstance(m, nn.BatchNorm1d) and layout in (FLAT, LAST, NCL)
            ):
                return state, ChannelUse(node.target, "bn", offset=offset), None
        if kind == "depthwise" and layout == NCHW and m.in_channels == total:
            return state, ChannelUse(node.target, "depthwise", offset=offset), None
        if kind == "layer" and isinstance(m, nn.Conv2d) and layout == NCHW and m.in_channels == total:
            return None, ChannelUse(node.target, "input", offset=offset), None
        if kind == "layer" and isinstance(m, nn.Linear):
            if layout == LAST and m.in_features == total:
                return None, ChannelUse(node.target, "input", offset=offset), None
            if layout == FLAT and m.in_features % total == 0:
                return None, ChannelUse(node.target, "input", m.in_features // total, offset), None
        return None, None, f"{cannot} with its {channels} channels laid out as '{layout}'"

    def _attention(self, src: fx.Node, node: fx.Node, state: tuple[str, int, int], m: nn.Module):
        """``src`` is the query, key and value of a self-attention module (or the input of a packed-qkv one): its
        in-projection consumes the channels, when they fill its input's last dim. None otherwise."""
        layout, offset, total = state
        inputs = node.args[:3] if isinstance(m, nn.MultiheadAttention) else node.args[:1]
        if layout != LAST or offset or any(a is not src for a in inputs) or src in node.kwargs.values() \
                or len(self.calls[node.target]) != 1 or head_parameters(m) is None:
            return None
        consumer = _projections(node.target, m)[0]
        width = m.embed_dim if isinstance(m, nn.MultiheadAttention) else self.modules[consumer].in_features
        return (None, ChannelUse(consumer, "input"), None) if width == total else None

    def _layernorm(self, src: fx.Node, node: fx.Node, state: tuple[str, int, int], owner: str | None):
        """A LayerNorm over the channels: a carrier (role ``"ln"``) with ``allow_inexact``, else a refusal."""
        layout, offset, total = state
        norm = self.modules.get(owner)
        why = f"output is {NORMALIZED} {self._describe(node)} (node {node.name}) together with other channels: " \
              "zeroing a channel changes their mean and variance, so removal cannot be exact (tpp-method.md §12)"
        fits = node.args[:1] == (src,) and layout == LAST and isinstance(norm, nn.LayerNorm) \
            and tuple(norm.normalized_shape) == (total,) and norm.weight is not None and len(self.calls.get(
                owner, [node])) == 1
        if fits and self.allow_inexact:
            return state, ChannelUse(owner, "ln", offset=offset), None
        return None, None, why + ("; pass allow_inexact=True to prune them anyway (the output then changes: the "
                                  "deviation is measured)" if fits else "")

    def _size_attribute(self, node: fx.Node, size: int) -> str | None:
        """The int attribute of the module whose forward wrote ``size`` in ``node`` that holds it (e.g. a ViT's
        ``hidden_dim`` in ``x.reshape(n, self.hidden_dim, -1)``), as ``module.attribute``; None if none does (or
        several). An attribute equal to ``size`` holds it if changing it changes ``node``: the model is traced
        again with it set to ``size + 1``, then restored."""
        stack = node.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()))[0] if stack else ""
        module = self.modules[owner]
        found = [k for k, v in vars(module).items() if type(v) is int and v == size and not k.startswith("_")]
        found = [k for k in found if self._writes(node, module, k, size)]
        return (f"{owner}.{found[0]}" if owner else found[0]) if len(found) == 1 else None

    def _writes(self, node: fx.Node, module: nn.Module, attribute: str, size: int) -> bool:
        """Whether ``node`` reads ``module.attribute`` (= ``size``): traced again with it changed."""
        setattr(module, attribute, size + 1)
        try:
            graph = Tracer(self.leaves).trace(self.modules[""])
        except Exception:
            return False
        finally:
            setattr(module, attribute, size)
        twin = next((n for n in graph.nodes if n.name == node.name), None)
        return twin is not None and size + 1 in twin.args

    def _join(self, name: str, src: fx.Node, node: fx.Node, state: tuple[str, int, int], verb: str):
        """``src`` meets other values at an add/mul ``node``: coupled unless they only carry ``name``'s channels."""
        layers, values = set(), []
        for other in node.all_input_nodes:
            if other is not src:
                layers |= self.origins[other][0]
                values += self.origins[other][1]
        layers.discard(name)
        if not layers and not values:  # e.g. x * sigmoid(x), x + 3
            return state, None, None
        what = ", ".join(sorted(layers, key=self.index.get) + list(dict.fromkeys(values)))
        return state, None, f"output is {verb} {what} (node {node.name})"

    def _cat(self, name: str, src: fx.Node, node: fx.Node, state: tuple[str, int, int]):
        """``src`` is concatenated with other values: followed at its offset when every part's channels are known."""
        layout, offset, total = state
        parts = node.args[0] if node.args and isinstance(node.args[0], (list, tuple)) else ()
        others = [a for a in parts if a is not src]
        what = ", ".join(dict.fromkeys(
            n for a in others if isinstance(a, fx.Node) for n in (sorted(self.origins[a][0]) or [a.name])))
        reason = f"output is concatenated with {what or 'itself'} (node {node.name})"
        dim, rank = arg(node, 1, "dim", 0), self.ranks.get(node)
        channel = (rank - 1 if layout == LAST else 1) if rank is not None and layout != FLAT else None
        if channel is not None and isinstance(dim, int) and dim % rank != channel and list(parts).count(src) == 1:
            # along another dim (e.g. a class token before the patch tokens): the parts share their channels
            layers = set().union(*(self.origins[a][0] for a in others if isinstance(a, fx.Node)))
            self._union(layers | {name})
            self.internal.add(node)
            return state, None, reason if others else None
        if layout != NCHW or arg(node, 1, "dim", 0) not in (1, -3) or list(parts).count(src) != 1:
            return None, None, reason
        if node not in self.counts or src not in self.counts or self.counts[src] != total:
            return None, None, f"{reason}, whose channel counts tpp cannot tell"
        before = sum(self.counts[a] for a in parts[: list(parts).index(src)])
        return (NCHW, before + offset, self.counts[node]), None, None

    def _pad(self, node: fx.Node, state: tuple[str, int, int], m: nn.Module | None):
        """Channels into an option-A shortcut (``m``, a PadShortcut) sit at ``pad[0]`` of its ``out_channels``; an
        inline ``F.pad`` of the channels is refused."""
        layout, offset, total = state
        if m is None:
            return None, None, (f"output is zero-padded in channels by F.pad inline (node {node.name}): the padded "
                                "widths are constants of forward that cannot follow the pruned channel count; use "
                                "tpp.models.resnet_cifar.PadShortcut (a module tpp resizes) for the shortcut")
        if len(self.calls[node.target]) > 1:
            return None, None, f"output reaches {node.target}, which is called {len(self.calls[node.target])} times"
        if layout != NCHW or total != m.in_channels:
            return None, None, f"output reaches {self._describe(node)} (node {node.name}) laid out as '{layout}' " \
                               f"with {total} channels, not its in_channels={m.in_channels}"
        return (NCHW, offset + m.pad[0], m.out_channels), None, None

    def _value(self, node: fx.Node) -> str:
        if node.op == "placeholder":
            return f"the model input '{node.name}'"
        if node.op == "get_attr":
            return f"parameter '{node.target}'"
        return f"node '{node.name}'"

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self.modules[node.target]).__name__})"
        if node.op == "call_method":
            return f"Tensor.{node.target}"
        return getattr(node.target, "__name__", str(node.target))
