"""The result types of :func:`tpp.graph.analyze_model`: what a layer's channels reach, each Conv2d/Linear, the
prunable units (tpp-method.md §12) and the whole graph.

:class:`ChannelUse` is one module whose channels follow a layer's output channels; :class:`LayerInfo` one
Conv2d/Linear with its uses and why it is not independently prunable; :class:`Unit` one pruned index set (a private
layer, a coupled group, the heads of an attention module) and how it maps to its members' channels;
:class:`ModelGraph` all of them, with the refusals. Built by :mod:`tpp.unitbuild` (traced) or
:func:`tpp.graph.analyze_model` from a ``bn_map``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .zeros import ZERO, Carried

__all__ = ["ChannelUse", "LayerInfo", "ModelGraph", "Unit"]


@dataclass(frozen=True)
class ChannelUse:
    """Something whose channels follow a layer's output channels.

    ``role``: ``"bn"`` (a BatchNorm normalizing them), ``"depthwise"`` (a depthwise conv carrying them on),
    ``"input"`` (a Conv2d/Linear consuming them; an ``nn.MultiheadAttention``: its in-projection), ``"ln"`` (a
    LayerNorm normalizing them with others: ``allow_inexact`` only) or ``"size"`` (``module`` is then
    ``"path.attribute"``: an int attribute the forward reads as their count, e.g. a ViT's ``hidden_dim``).
    ``block``: for a Linear after flatten, each channel is ``block`` consecutive in_features. ``offset``: the
    channels sit at ``[offset, offset + C)`` of the module's channels (after a concatenation). ``groups``: an
    ``"input"`` of a grouped conv with that many groups (the channels must then be pruned alike in every group).
    ``constant``: for an ``"input"``, the ops (:mod:`tpp.zeros`) that make a removed channel arrive as a constant
    instead of 0, which removal folds into the consumer's bias; ``()`` if it arrives as 0 (not compared: one
    consumer is reached one way).
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

    def spans_error(self, what: str) -> str:
        """Why the members' index sets (``what``: whose) fit no :meth:`from_members`: the rule, with the spans."""
        spans = ", ".join(f"{m}: [{s}, {s + w})" for m, (s, w) in zip(self.members, self.spans))
        return (f"coupled group [{', '.join(self.members)}] joins streams of different widths through option-A "
                f"shortcuts: {what} must be one index set P of its {self.channels} channels, each member pruning "
                f"P ∩ its span − span start ({spans}); a member missing prunes nothing")


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

    def inexact_in(self, pruned: Mapping[str, object]) -> list[str]:
        """The units with an ``inexact`` reason that ``pruned`` (``{layer or attention module: indices}``) prunes."""
        return [name for name, unit in self.units.items() if unit.inexact and any(m in pruned for m in unit.members)]

    def classifier(self) -> str | None:
        """The (last, in execution order) layer whose output is the model output, None if none."""
        outputs = [name for name, info in self.layers.items() if info.is_output]
        return outputs[-1] if outputs else None
