"""torch.fx analysis of a model: the units TPP prunes (tpp-method.md §12) — private layers, coupled groups, heads.

``analyze_model(model)`` traces the model symbolically (no example input; parameters, buffers and modules are left as
they are) and, for every Conv2d/Linear, follows its output channels forward through steps that keep them aligned:

* elementwise activations (modules, ``F.*``, ``torch.*`` and ``Tensor.*`` forms), dropout, identity;
* pooling (incl. adaptive), upsampling, mean over the spatial dims;
* BatchNorm (role ``"bn"``) and depthwise convs (role ``"depthwise"``), which carry the channels on;
* flatten (``nn.Flatten``, ``torch.flatten(x, 1)``, ``x.flatten(1)``, ``x.view(x.size(0), -1)``, ``reshape``) into a
  Linear, where each channel becomes ``in_features // C`` consecutive features;
* concatenations along the channels (``torch.cat(..., 1)``), at an offset (``ChannelUse.offset``) when every
  part's channel count follows from the layers producing it (DenseNet);
* stochastic depth (torchvision's ``stochastic_depth``), which drops whole samples;
* option-A shortcuts (:class:`tpp.models.resnet_cifar.PadShortcut`: spatial subsampling, channels zero-padded),
  after which the channels sit at offset ``pad[0]`` of ``out_channels``. A residual stream joined through one with
  a wider stream forms one group whose members span parts of the widest stream's channels (``Unit.spans``); an
  ``F.pad`` of the channels written inline is refused (its widths are constants that cannot follow the pruning).

The walk stops at a Conv2d/Linear consuming the channels (role ``"input"``; a grouped conv with ``groups``). A
layer is *independently prunable* (``LayerInfo.coupling is None``) only if every path ends that way. Anything else
gives a human-readable reason: a join with another branch (add/sub/mul/div), the model output, a LayerNorm/GroupNorm
(zeroing a channel changes the others' statistics: never exact), a shared module, or an op the walk does not
understand (conservative: unknown means not prunable). Joins are followed further (``uses`` then lists the consumers
of the joined tensor too) and put the joined layers into one ``group``; a group whose only reasons are joins of its
own members' channels is a coupled-group :class:`Unit` (residual streams, squeeze-excite scales). Softmax/log_softmax
mix the channels (coupled) but are followed to find the model output, so a classifier under ``log_softmax`` is
still ``is_output``. Each attention module called once with a packed q/k/v projection is a heads unit
(``nn.MultiheadAttention``, timm-style ``Attention``: :func:`tpp.attention.head_parameters`; kept opaque by fx).
``ModelGraph.units`` lists the units, ``ModelGraph.refusals`` every other layer with its reason.

Exactness (:mod:`tpp.zeros`): every unit is accepted only if removing it after the zero-out is exact in eval mode.
The analysis follows what a removed channel *is* along its paths: exactly 0 after its zeroed producer, through
zero-preserving ops (ReLU family, pooling, dropout, flatten), zeroed affine BatchNorms and depthwise carriers; a
constant after an op with f(0) ≠ 0 (Sigmoid, Hardsigmoid, Softplus, ``h + c``, ``1 − h``, BatchNorm without
affine). A Linear, or a Conv2d without zero padding, receiving a constant has it in ``ChannelUse.constant`` and
removal folds it into its bias; any other constant (a zero-padded conv, a zero-padded average pool, batch
statistics, two constants joined, a removed channel as divisor) refuses the layer, naming the node and the op.

If fx cannot trace the model, ``analyze_model`` raises ``ValueError`` naming the submodule that failed; pass
``leaf_modules`` to keep that submodule opaque, or ``bn_map`` to describe the layers by hand instead. When
``bn_map`` is given it is always used and no tracing happens (an explicit description beats a guess), see
``analyze_model``.

Size: the result types, then one ``_Analysis`` whose walk steps (origins, channel counts, joins, concatenation
offsets, heads, the value a removed channel carries) share its state — about 625 lines; what a node means is
:mod:`tpp.fxnodes`, what it does to a removed channel :mod:`tpp.zeros`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, fx, nn

from .attention import head_parameters
from .fxnodes import BNS, FLAT, LAST, LAYERS, MOVES, NCHW, NCL, NORMALIZED, UNARY, Tracer, arg, classify, listing, \
    out_channels
from .zeros import ZERO, Carried, refusal, through

__all__ = ["ChannelUse", "LayerInfo", "ModelGraph", "Unit", "analyze_model"]


@dataclass(frozen=True)
class ChannelUse:
    """Something whose channels follow a layer's output channels.

    ``role``: ``"bn"`` (a BatchNorm normalizing them), ``"depthwise"`` (a depthwise conv carrying them on),
    ``"input"`` (a Conv2d/Linear consuming them; an ``nn.MultiheadAttention``: its in-projection), ``"ln"`` (a
    LayerNorm normalizing them with others: ``allow_inexact`` only) or ``"size"`` (``module`` is then
    ``"path.attribute"``: an int attribute the forward reads as their count, e.g. a ViT's ``hidden_dim``). ``block``: for a Linear after flatten, each channel is ``block``
    consecutive in_features. ``offset``: the channels sit at ``[offset, offset + C)`` of the module's channels
    (after a concatenation). ``groups``: an ``"input"`` of a grouped conv with that many groups (the channels must
    then be pruned alike in every group). ``constant``: for an ``"input"``, the ops (:mod:`tpp.zeros`) that make a
    removed channel arrive as a constant instead of 0, which removal folds into the consumer's bias; ``()`` if it
    arrives as 0 (not compared: one consumer is reached one way).
    """

    module: str
    role: str
    block: int = 1
    offset: int = 0
    groups: int = 1
    constant: Carried = field(default=ZERO, compare=False)


@dataclass(frozen=True)
class LayerInfo:
    """One Conv2d/Linear of the model; ``coupling is None`` iff it can be pruned on its own."""

    name: str
    kind: str  # "conv" | "linear"
    index: int  # execution order among all Conv2d/Linear modules (0-based)
    out_channels: int
    bn: str | None  # the BatchNorm directly normalizing this layer's output
    uses: tuple[ChannelUse, ...]  # BNs, depthwise carriers and input consumers, in execution order
    coupling: str | None  # why it is not independently prunable; None if it is
    group: tuple[str, ...]  # layers whose outputs are joined with this one's (incl. itself), by index
    is_output: bool  # its output reaches the model output
    # why ``group`` cannot be pruned with one shared index set (None: it can; joins by add/sub/mul/div of the
    # group's own channels are fine, a cat, another value, an op the walk cannot follow or the model output are not)
    group_coupling: str | None = None

    @property
    def independent(self) -> bool:
        return self.coupling is None


@dataclass(frozen=True)
class Unit:
    """What one pruned index set applies to (tpp-method.md §12).

    ``kind``: ``"layer"`` (a Conv2d/Linear with private output channels: the paper's case), ``"group"`` (Conv2d/Linear
    producers whose output channels are joined by add/sub/mul/div — residual streams, squeeze-excite scales — pruned
    with one shared index set) or ``"heads"`` (the attention heads of one ``nn.MultiheadAttention``). ``name``: the
    first member in execution order (heads: the attention module). Pruned dicts (``reg.pruned``, ``prune_model``)
    list every member under its own name with the same channel indices (with ``spans``: its own share, see
    :meth:`member_indices`); heads under the attention module's name.
    ``channels``: output channels of each member (heads: the number of heads). ``segments``: with grouped convs the
    channels form ``segments`` equal groups and unit ``j`` is channel ``j`` of every group (channels
    ``k·size + j``), so that every group keeps the same width; 1 otherwise. ``index``: the zero-out slot (execution
    index of the first member among all Conv2d/Linear; heads: of the next Conv2d/Linear called).

    ``spans``: for a group joining streams of different widths through option-A shortcuts
    (:class:`tpp.models.resnet_cifar.PadShortcut`), each member's ``(start, width)`` in the unit's ``channels``
    (the widest stream's): unit channel ``start + j`` is the member's channel ``j``; a unit index set ``P`` prunes
    ``P ∩ [start, start + width) − start`` of each member (:meth:`member_indices`). ``()``: every member spans all
    ``channels``. ``pads``: every PadShortcut the unit's channels pass, with the unit channel its output channel 0
    is (negative where its padding lies before the unit's channels); surgery resizes them.
    """

    name: str
    kind: str  # "layer" | "group" | "heads"
    members: tuple[str, ...]
    channels: int
    segments: int
    index: int
    parameters: tuple[tuple[str, int], ...] = ()  # (qualified name, channel dim) of parameters producing channels
    inexact: str | None = None  # why removal changes the output (allow_inexact), None: removal is exact
    spans: tuple[tuple[int, int], ...] = ()
    pads: tuple[tuple[str, int], ...] = ()

    @property
    def size(self) -> int:
        """The number of prunable units: ``channels // segments``."""
        return self.channels // self.segments

    def channel_indices(self, units: Tensor) -> Tensor:
        """Sorted channel indices of the given unit indices (every group's copy when ``segments > 1``)."""
        units = units.to(torch.int64)
        if self.segments == 1:
            return units.sort().values
        return (torch.arange(self.segments)[:, None] * self.size + units[None, :]).flatten().sort().values

    def unit_indices(self, channels: Tensor) -> Tensor | None:
        """The unit indices whose :meth:`channel_indices` are exactly ``channels``; None if there are none."""
        channels = channels.to("cpu", torch.int64).sort().values
        units = channels[channels < self.size]
        return units if torch.equal(self.channel_indices(units), channels) else None

    def span(self, member: str) -> tuple[int, int]:
        """``(start, width)`` of ``member``'s channels among the unit's ``channels``."""
        return self.spans[self.members.index(member)] if self.spans else (0, self.channels)

    def member_indices(self, units: Tensor) -> dict[str, Tensor]:
        """``{member: sorted indices of its own pruned channels}`` for the given unit indices: what pruned dicts
        list. A member of a spanned group whose span holds none of them is left out (it prunes nothing)."""
        channels = self.channel_indices(units)
        found = {}
        for member in self.members:
            start, width = self.span(member)
            own = channels[(channels >= start) & (channels < start + width)] - start
            if own.numel() or not self.spans:
                found[member] = own
        return found

    def from_members(self, indices: Mapping[str, Tensor]) -> Tensor | None:
        """The unit indices whose :meth:`member_indices` are exactly ``indices`` (a member missing from it counts
        as pruning nothing); None if there are none."""
        given = {m: indices[m].to("cpu", torch.int64).sort().values for m in self.members if m in indices}
        channels = torch.cat([idx + self.span(m)[0] for m, idx in given.items()] + [torch.empty(0, dtype=torch.int64)])
        units = self.unit_indices(channels.unique())
        if units is None:
            return None
        expected = self.member_indices(units)
        nothing = torch.empty(0, dtype=torch.int64)
        same = all(torch.equal(given.get(m, nothing), expected.get(m, nothing)) for m in self.members)
        return units if same else None


@dataclass(frozen=True)
class ModelGraph:
    """Every Conv2d/Linear of a model, in execution order; ``traced`` is False when built from ``bn_map``.

    ``units``: the prunable units by name, in zero-out order; ``refusals``: every Conv2d/Linear (and attention
    module) that is in no unit, with the reason (the classifier, depthwise carriers and layers tpp cannot follow).
    """

    layers: dict[str, LayerInfo]
    traced: bool
    units: dict[str, Unit] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)

    def unit_of(self, name: str) -> Unit | None:
        """The unit that layer (or attention module) ``name`` belongs to, None if it is in none."""
        for unit in self.units.values():
            if name in unit.members:
                return unit
        return None

    def independent(self) -> list[str]:
        """Names of the independently prunable layers, in execution order."""
        return [name for name, info in self.layers.items() if info.independent]

    def classifier(self) -> str | None:
        """The (last, in execution order) layer whose output is the model output, None if none."""
        outputs = [name for name, info in self.layers.items() if info.is_output]
        return outputs[-1] if outputs else None


def analyze_model(model: nn.Module, bn_map: Mapping[str, str | None] | None = None,
                  leaf_modules: Iterable[str] = (), allow_inexact: bool = False) -> ModelGraph:
    """Analyse ``model`` with torch.fx (``traced=True``), or describe it from ``bn_map`` (``traced=False``).

    ``leaf_modules``: qualified names of submodules fx should not trace into (e.g. one with data-dependent control
    flow); each is then an opaque op — layers feeding it are refused, layers inside it are never called — and the
    rest of the model is analysed as usual. ``bn_map`` maps Conv2d/Linear names to the BatchNorm normalizing their
    output (or None). When given, fx is not used: the listed layers are independent with that BN and no other known
    use (consumers unknown), the others are coupled with reason ``"not in bn_map"``, and ``index`` is the
    registration order. ``allow_inexact=True`` accepts channels normalized by a LayerNorm together with kept ones
    (a ViT's embedding dimension, ConvNeXt's residual stream): the LayerNorm is then a carrier whose γ, β are
    pruned with them, and the unit's ``inexact`` says why removal changes the output (tpp-method.md §12; measure it
    with :func:`tpp.metrics.output_deviation`). Raises ``TypeError`` for a non-module, ``ValueError`` for a bad
    ``bn_map`` or ``leaf_modules`` entry or a model fx cannot trace (naming the submodule and these two ways out).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze_model expects an nn.Module, got {type(model).__name__}")
    if not isinstance(allow_inexact, bool):
        raise TypeError(f"allow_inexact must be a bool, got {allow_inexact!r}")
    if bn_map is not None:
        return _from_bn_map(model, bn_map)
    leaves = [leaf_modules] if isinstance(leaf_modules, str) else list(leaf_modules)
    modules = dict(model.named_modules())
    for name in leaves:
        if not isinstance(name, str) or not name or name not in modules:
            raise ValueError(f"leaf_modules entry {name!r} is not the qualified name of a submodule of "
                             f"{type(model).__name__}")
    packed = [n for n, m in modules.items() if not isinstance(m, nn.MultiheadAttention) and head_parameters(m)]
    tracer = Tracer(leaves + packed)
    try:
        graph = tracer.trace(model)
    except Exception as err:
        failed = tracer.failed_in[1] if tracer.failed_in and tracer.failed_in[0] is err else None
        where = (
            f"module '{failed}' ({type(model.get_submodule(failed)).__name__})"
            if failed
            else f"the forward of {type(model).__name__} itself"
        )
        leaf = f"leaf_modules=[{failed!r}]" if failed else "leaf_modules=['<the submodule>']"
        raise ValueError(
            f"torch.fx cannot trace {type(model).__name__}: tracing failed in {where}: {type(err).__name__}: {err}. "
            f"Ways out: make that code traceable; or keep it opaque with {leaf} (tpp then prunes around it); or "
            "pass the layer -> BatchNorm mapping explicitly, e.g. analyze_model(model, bn_map={'conv1': 'bn1', "
            "'fc': None}); the layers listed there are then treated as independently prunable."
        ) from err
    return _Analysis(model, graph, allow_inexact, tracer.leaves).model_graph()


# ---------------------------------------------------------------------------------------------------------------
# Analysis of a traced graph


_OWNERS = LAYERS + BNS + (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)  # whose parameters are not producers


def _projections(name: str, module: nn.Module) -> tuple[str, str]:
    """The attention module's in-projection (the consumer of its input's channels) and out-projection (the producer
    of its output's channels): ``nn.MultiheadAttention`` itself (``in_proj_weight``) and ``out_proj``, else the
    packed-qkv layout's ``qkv`` and ``proj`` Linears."""
    if isinstance(module, nn.MultiheadAttention):
        return name, f"{name}.out_proj"
    return f"{name}.qkv", f"{name}.proj"


class _Analysis:
    """Per-node classification, value origins and join groups of one traced graph."""

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
        self.ranks = self._ranks()
        self.internal: set[fx.Node] = set()  # concatenations along a non-channel dim (tokens): joins of a group
        self.counts = self._channel_counts()
        self.blocking: dict[str, str | None] = {}  # per layer: a reason its group cannot share one index set
        self.carried: dict[str, tuple] = {}  # per join group (by root): what _carried found
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
            self._walked(name)

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

    def _ranks(self) -> dict[fx.Node, int]:
        """The number of dims of each tensor value whose rank follows from the graph (absent where unknown)."""
        ranks: dict[fx.Node, int] = {}
        for node in self.nodes:
            kind, detail = self.kinds[node]
            first = ranks.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if node.op == "get_attr" and node.target in self.produced:
                rank = len(self._parameter(node.target).shape)
            elif kind in ("layer", "grouped", "depthwise"):
                rank = 4 if isinstance(detail, nn.Conv2d) else first
            elif kind in ("spatial", "mean", "merge", "flatten"):
                rank = {"spatial": 4, "mean": 4 if detail else 2, "merge": 3, "flatten": 2}[kind]
            elif kind == "permute":
                rank = len(detail[1]) if detail[0] == "dims" else first
            elif kind == "expand":
                rank = len(detail)
            elif kind == "index":
                rank = None if first is None else first - sum(isinstance(p, int) for p in detail)
            elif kind == "attention-output":
                rank = ranks.get(node.args[0].args[0]) if detail == 0 else None
            elif kind in ("cat", "join"):
                parts = node.args[0] if kind == "cat" and node.args else node.all_input_nodes
                rank = max((ranks[a] for a in parts if isinstance(a, fx.Node) and a in ranks), default=None)
            else:
                rank = first if kind in ("carry", "bn", "layernorm", "attention", "softmax") else None
            if rank is not None:
                ranks[node] = rank
        return ranks

    def _parameter(self, name: str) -> Tensor:
        owner, _, attr = name.rpartition(".")
        return getattr(self.modules[owner], attr)

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

    def _root(self, name: str) -> str:
        while self.parent[name] != name:
            name = self.parent[name]
        return name

    def _union(self, names: Iterable[str]) -> None:
        """Join the groups of ``names`` (producers), under the first in execution order."""
        names = sorted(names, key=self.index.get)
        for name in names[1:]:
            self.parent[self._root(name)] = self._root(names[0])

    def model_graph(self) -> ModelGraph:
        layers = [self._layer(name) for name in self.order]  # fills self.blocking for every layer first
        for name in self.produced:
            if name not in self.modules:
                self._parameter_blocking(name)
        layers = {info.name: replace(info, group_coupling=self._group_coupling(self._members(info.name)))
                  for info in layers}
        units, refusals = {}, {}
        for info in layers.values():
            parameters = tuple(p for p in self._members(info.name) if p not in self.modules)
            inexact = self._inexact(info.group, layers)
            if info.independent:
                units[info.name] = Unit(info.name, "layer", (info.name,), info.out_channels,
                                        self._segments((info.name,), layers), info.index, inexact=inexact)
            elif len(info.group) + len(parameters) > 1 and info.group_coupling is None \
                    and info.name == info.group[0]:
                sizes = {self._source(m)[1] for m in info.group + parameters}
                if len(sizes) == 1:
                    dims = tuple((p, self._channel_dim(p)) for p in parameters)
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
            m = self.modules[member]
            segments = math.lcm(segments, m.groups if isinstance(m, nn.Conv2d) else 1)
            for use in layers[member].uses:
                segments = math.lcm(segments, use.groups)
        return segments

    def _heads(self) -> dict[str, tuple[Unit | None, str | None]]:
        """Every attention module (:func:`tpp.attention.head_parameters`): its heads unit, or why its heads cannot
        be pruned."""
        found = {}
        for name, m in self.modules.items():
            params = head_parameters(m)
            if not isinstance(m, nn.MultiheadAttention) and params is None:
                continue
            calls = self.calls.get(name, [])
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
            at = self.pos[calls[0]]
            index = sum(1 for layer in self.order if self.calls.get(layer) and self.pos[self.calls[layer][0]] < at)
            found[name] = (Unit(name, "heads", (name,), params.num_heads, 1, index), None)
        return found

    def _members(self, name: str) -> tuple[str, ...]:
        """The producers joined with ``name`` (incl. itself): layers, then parameters, each in execution order."""
        root = self._root(name)
        return tuple(n for n in self.index if self._root(n) == root)

    def _group_coupling(self, group: tuple[str, ...]) -> str | None:
        """The first member's reason the group cannot be pruned with one shared index set, None if it can."""
        for member in group:
            reason = self.blocking[member]
            if reason is not None:
                return reason if len(group) == 1 else f"{member}: {reason}"
        states: dict[fx.Node, tuple] = {}
        widths = len({self._source(m)[1] for m in group})  # streams of different widths meet at offsets: _spanned
        for member in group:  # joined producers must meet with their channels in the same place
            for node, state in self._walked(member)[4].items():
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
        _, reasons, _, is_output, _ = self._walked(name)
        _, inexact = self._carried(self._root(name))
        blocking = [r for _, r, shared in sorted(reasons, key=lambda t: t[0]) if not shared]
        blocking += [r for _, r in sorted(inexact)]
        self.blocking[name] = "output is the model output" if is_output else (blocking or [None])[0]

    def _source(self, name: str) -> tuple[str, int]:
        """The layout and number of channels a producer emits: a Conv2d NCHW, a Linear (or out-projection) in the
        last dim, a parameter per :meth:`_channel_dim`."""
        m = self.modules.get(name)
        if m is not None:
            return (NCHW if isinstance(m, nn.Conv2d) else LAST), out_channels(m)
        dim = self._channel_dim(name)
        return (NCHW if dim == -3 else LAST), self._parameter(name).shape[dim]

    def _channel_dim(self, name: str) -> int:
        """A parameter's channel dim: -3 for ``[..., C, 1, 1]`` (added to or scaling NCHW values), else -1."""
        shape = self._parameter(name).shape
        return -3 if len(shape) >= 3 and shape[-2:] == (1, 1) else -1

    def _layer(self, name: str) -> LayerInfo:
        m = self.modules[name]
        channels = out_channels(m)
        uses, reasons, bn, is_output, _ = self._walked(name)
        values, inexact = self._carried(self._root(name))
        uses, reasons = list(uses), list(reasons) + [(pos, reason, False) for pos, reason in inexact]
        for i, (pos, use, src) in enumerate(uses):
            carried = values.get(src, ZERO) if use.role == "input" else ZERO
            why = refusal(carried, use.module, self.modules, channels)
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
        group = tuple(sorted((n for n in self.order if self._root(n) == self._root(name)), key=self.index.get))
        return LayerInfo(
            name=name,
            kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            index=self.index[name],
            out_channels=channels,
            bn=bn,
            uses=uses,
            coupling=coupling,
            group=group,
            is_output=is_output,
        )

    def _structural(self, name: str, m: nn.Module) -> str | None:
        """A reason not to prune ``name`` that does not depend on its consumers."""
        calls = self.produced.get(name, [])
        for node in self.nodes:
            if node.op == "get_attr" and node.target.rpartition(".")[0] == name:
                return f"its parameter {node.target} is read directly in forward (node {node.name})"
        if not calls:
            return "never called as a module in forward"
        if len(calls) > 1:
            return f"module is called {len(calls)} times in forward (shared module)"
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1:
            return "depthwise conv: its channels follow the layer feeding it"
        own = {id(p) for p in m.parameters()}
        for other, mod in self.modules.items():
            if other != name and mod is not m and any(id(p) in own for p in mod.parameters(recurse=False)):
                return f"shares parameters with {other}"
        return None

    def _walked(self, name: str) -> tuple:
        if name not in self.walks:
            self.walks[name] = self._walk(name, *self._source(name))
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

    def _carried(self, root: str) -> tuple[dict[fx.Node, Carried], list[tuple[int, str]]]:
        """What a removed channel of the layers joined under ``root`` is at each node it reaches
        (:func:`tpp.zeros.through`, from 0 at the layers), and every ``(position, reason)`` it cannot be exact."""
        if root not in self.carried:
            members = self._members(root)
            values = {node: ZERO for member in members for node in self.produced.get(member, [])}
            offsets: dict[fx.Node, int] = {}
            for member in members:
                for node, state in self._walked(member)[4].items():
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
            self.carried[root] = values, reasons
        return self.carried[root]

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
            moved = self._moved(src, node, state)
            return (moved, None, None) if moved else (None, None, f"{cannot} with its channels laid out as "
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

    def _moved(self, src: fx.Node, node: fx.Node, state: tuple[str, int, int]) -> tuple[str, int, int] | None:
        """The channels' layout after a permute/transpose, a merge of the spatial dims, an index or an expand; None
        where they do not stay whole in one dim (or the walk cannot tell)."""
        layout, offset, total = state
        kind, detail = self.kinds[node]
        rank = self.ranks.get(src)
        if layout == FLAT or rank is None and layout == LAST and kind in ("permute", "index"):
            return None
        rank = rank if rank is not None else (4 if layout == NCHW else 3)
        channel = rank - 1 if layout == LAST else 1
        if kind == "merge":
            return (NCL, offset, total) if layout == NCHW and detail in (None, total) else None
        if kind == "expand":
            size = detail[channel - rank] if len(detail) >= rank - channel else None
            return state if size in (-1, total) else None
        if kind == "index":
            if layout != LAST and (len(detail) > 1 and detail[1] != slice(None) or any(
                    isinstance(p, int) for p in detail)):
                return None
            return state if layout != LAST or len(detail) < rank or detail[-1] == slice(None) else None
        how, dims = detail
        if how == "swap":
            if not all(isinstance(d, int) and -rank <= d < rank for d in dims):
                return None
            a, b = (d % rank for d in dims)
            order = list(range(rank))
            order[a], order[b] = b, a
        elif len(dims) == rank and all(isinstance(d, int) for d in dims):
            order = [d % rank for d in dims]
        else:
            return None
        now = order.index(channel)
        if now == rank - 1:
            return LAST, offset, total
        return ({4: NCHW, 3: NCL}.get(rank), offset, total) if now == 1 and rank in (3, 4) else None

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

    def _spanned(self, unit: Unit, layers: dict[str, LayerInfo]) -> tuple[Unit | None, str | None]:
        """``unit`` (a layer or a group, possibly of different widths) with its ``spans`` and ``pads`` set, or why
        its members cannot share one channel space.

        Member ``m`` starts at ``s_m`` of the unit's channels; a node reached by ``m`` with its channels at offset
        ``o`` holds unit channels from ``s_m − o`` on, which must agree over every member reaching it."""
        walks = {m: {n: st for n, st in self._walked(m)[4].items() if st is not None} for m in unit.members}
        widths = {m: self._source(m)[1] for m in unit.members}
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
        pads = tuple(sorted({(n.target, at - low) for n, at in base.items() if self.kinds[n][0] == "pad"},
                            key=lambda p: self.pos[self.calls[p[0]][0]]))
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


# ---------------------------------------------------------------------------------------------------------------
# Without fx


def _from_bn_map(model: nn.Module, bn_map: Mapping[str, str | None]) -> ModelGraph:
    """The ``traced=False`` graph of ``analyze_model``: layers in ``bn_map`` independent, the rest not."""
    if not isinstance(bn_map, Mapping):
        raise TypeError(f"bn_map must map layer names to BatchNorm names (or None), got {type(bn_map).__name__}")
    modules = dict(model.named_modules())
    for key, bn in bn_map.items():
        layer = modules.get(key) if isinstance(key, str) else None
        if not isinstance(layer, LAYERS):
            found = "no such module" if layer is None else type(layer).__name__
            raise ValueError(f"bn_map key {key!r}: expected the name of a Conv2d/Linear of the model, got {found}")
        if isinstance(layer, nn.Conv2d) and layer.groups > 1:
            raise ValueError(f"bn_map key {key!r}: a grouped conv (groups={layer.groups}) cannot be pruned on its own")
        if bn is None:
            continue
        norm = modules.get(bn) if isinstance(bn, str) else None
        if not isinstance(norm, BNS):
            found = "no such module" if norm is None else type(norm).__name__
            raise ValueError(f"bn_map[{key!r}] = {bn!r}: expected None or the name of a BatchNorm1d/2d, got {found}")
        if norm.num_features != out_channels(layer):
            raise ValueError(
                f"bn_map[{key!r}] = {bn!r}: BatchNorm has {norm.num_features} features, "
                f"layer has {out_channels(layer)} output channels"
            )
    names = [name for name, m in modules.items() if isinstance(m, LAYERS)]
    layers = {}
    for index, name in enumerate(names):
        m = modules[name]
        listed = name in bn_map
        bn = bn_map.get(name)
        layers[name] = LayerInfo(
            name=name,
            kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            index=index,
            out_channels=out_channels(m),
            bn=bn,
            uses=(ChannelUse(bn, "bn"),) if bn is not None else (),
            coupling=None if listed else "not in bn_map",
            group=(name,),
            is_output=False,
            group_coupling=None if listed else "not in bn_map",
        )
    units = {n: Unit(n, "layer", (n,), info.out_channels, 1, info.index) for n, info in layers.items() if n in bn_map}
    refusals = {n: "not in bn_map" for n in layers if n not in bn_map}
    return ModelGraph(layers=layers, traced=False, units=units, refusals=refusals)
