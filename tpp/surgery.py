"""Physical removal of pruned filters, heads and channels (tpp-method.md §6, §12).

``prune_model(model, pruned)`` follows each pruned layer's output channels with :mod:`tpp.graph` and shrinks, with
one index set per layer (or per coupled group):

* the layer itself: Conv2d/Linear output filters (weight rows, bias);
* every BatchNorm the channels pass through (weight, bias, running_mean, running_var, ``num_features``), at the
  channels' offset after a concatenation;
* depthwise convs carrying the channels on (filters and ``in_channels = out_channels = groups``);
* every consumer's input channels: Conv2d ``weight[:, kept]`` (a grouped conv: the kept positions within each
  group, ``groups`` unchanged), a Linear after flatten whole blocks of ``block`` consecutive in_features, shifted
  by the offset after a concatenation;
* option-A shortcuts (:class:`tpp.models.resnet_cifar.PadShortcut`) the channels pass: ``in_channels``,
  ``out_channels`` and ``pad`` = the kept channels before/after its input's span.

A coupled group (outputs joined by add/sub/mul/div, e.g. the convs feeding one residual stream) is pruned only as a
whole, every member with the same index set; channels feeding grouped convs only alike in every group. A group
joining streams of different widths through option-A shortcuts (``Unit.spans``) is pruned with one index set ``P``
of the widest stream's channels: each member listed with its own share ``P ∩ span − start``. Attention
heads (``pruned[attention module] = head indices``) are removed whole, ``head_dim`` kept: an
``nn.MultiheadAttention`` becomes a :class:`tpp.attention.PrunedMultiheadAttention`, a torchvision Swin window
attention a :class:`tpp.window_attention.PrunedShiftedWindowAttention` (or ``…V2``), a timm-style packed-qkv module
is shrunk in place.

Removal is exact: when the pruned W, b and the γ, β of the BatchNorms and the rows of the depthwise convs the
channels pass through are zero (the regularizer's zero-out; without BN a channel carries its bias: zero b[P] too),
the pruned model computes the same function in eval mode. A removed channel reaching a consumer as a constant ``c``
rather than 0 (after Sigmoid, Softplus, ``h + c``, a BatchNorm without affine, …: ``ChannelUse.constant``,
:mod:`tpp.zeros`) is folded into that consumer's bias: ``b' = b + W[:, P] c_P`` for a Linear (blocks after
flatten), summed over the kernel (within each group) for a Conv2d, which the graph accepts only without zero
padding; a consumer without a bias gets one. ``c`` is computed from the model's state at removal (running
statistics included). :func:`tpp.graph.analyze_model` refuses every layer whose removal cannot be made exact.

Saving and loading pruned models: :mod:`tpp.pruned_files`.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor, nn

from .attention import HeadParameters, PrunedMultiheadAttention, head_parameters, is_window_attention
from .graph import ModelGraph, Unit, analyze_model
from .models.resnet_cifar import PadShortcut
from .zeros import bias_delta, evaluate

__all__ = ["prune_model", "as_indices"]

_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)
PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------------------
# prune_model


def prune_model(model: nn.Module, pruned: Mapping[str, Tensor | Sequence[int]], *, inplace: bool = False,
                graph: ModelGraph | None = None, bn_map: Mapping[str, str | None] | None = None,
                allow_inexact: bool = False) -> nn.Module:
    """Remove the filters ``pruned[name]`` (1-D integer indices) of each named Conv2d/Linear from ``model``, and the
    heads ``pruned[name]`` of each named attention module (:func:`tpp.attention.head_parameters`).

    Returns a new module (a deep copy; ``model`` is not modified) or, with ``inplace=True``, ``model`` itself with
    the affected modules' parameters and sizes replaced (an optimizer built before still holds the old parameters).
    Module objects, types, dtypes, devices and ``requires_grad`` are kept, except that an ``nn.MultiheadAttention``
    or Swin window attention losing heads (or, an ``nn.MultiheadAttention``, embedding channels) is replaced by a
    :class:`tpp.attention.PrunedMultiheadAttention` or :class:`tpp.window_attention.PrunedShiftedWindowAttention`
    (``…V2``) (same parameter names). ``graph`` reuses an analysis of ``model`` (:func:`tpp.graph.analyze_model`);
    ``bn_map`` and ``allow_inexact`` are passed to it, but a graph built from a bn_map does not know the consumers,
    so it is refused. Units the graph marks ``inexact`` (LayerNorm-coupled channels, only in a graph built with
    ``allow_inexact=True``) are removed too, with their LayerNorms' γ, β and ``normalized_shape`` and the
    parameters producing their channels (``Unit.parameters``); the result then differs from the model (measure it
    with :func:`tpp.metrics.output_deviation`).

    Raises ``TypeError``/``ValueError`` naming the layer and the reason — unknown name, not a Conv2d/Linear, bad
    indices (not 1-D integer, out of range, duplicated), every filter of a layer, the model output layer, a layer
    in no prunable unit (with the graph's reason), part of a coupled group (all members with one index set are
    needed), channels not taken alike from every group of a grouped conv — and leaves ``model`` untouched on any
    error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_model expects an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    graph = analyze_model(model, bn_map=bn_map, allow_inexact=allow_inexact) if graph is None else graph
    plan, heads = _plan(model, graph, pruned)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    with torch.no_grad():  # build every replacement first: nothing below can fail half-way
        updates = {name: (modules[name], _shrunk(modules[name], keep.get("out"), keep.get("in"), keep.get("fold")))
                   for name, keep in plan.items() if name in modules}
        updates.update({name: _parameter_kept(target, name, keep["out"], keep["dim"])
                        for name, keep in plan.items() if "dim" in keep})
        updates.update({name: _attribute(target, name, keep["size"]) for name, keep in plan.items() if "size" in keep})
        rebuilt = {name for name in plan if isinstance(modules.get(name), nn.MultiheadAttention)}
        rebuilt |= {name for name in heads if _replaced(modules[name])}
        replaced = []
        for name in sorted(rebuilt):  # their forward fixes their widths: rebuilt from a copy holding the edits
            work = copy.deepcopy(modules[name])
            for part, module in work.named_modules():
                if (f"{name}.{part}" if part else name) in updates:
                    _assign(module, updates.pop(f"{name}.{part}" if part else name)[1])
            kept = heads.get(name, torch.arange(head_parameters(work).num_heads))
            replaced.append((name, _keeping(work, kept)))
        updates.update({name: (modules[name], {"num_heads": kept.numel(),
                                               "attn_dim": kept.numel() * modules[name].head_dim})
                        for name, kept in heads.items() if not _replaced(modules[name])})
    for module, new in updates.values():
        _assign(module, new)
    for name, new in replaced:
        parent, _, child = name.rpartition(".")
        setattr(target.get_submodule(parent) if parent else target, child, new)
    return target


def _plan(model: nn.Module, graph: ModelGraph, pruned) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Validate ``pruned``; return ``{module: {"out": kept outputs, "in": kept input columns, "fold": what the
    removed input columns add to its outputs (float64)}}`` (a parameter producing channels: ``{"out": kept,
    "dim": its channel dim}``) and ``{attention module: kept heads}``."""
    if not isinstance(pruned, Mapping):
        raise TypeError(f"pruned must map layer names to filter indices, got {type(pruned).__name__}")
    if not isinstance(graph, ModelGraph):
        raise TypeError(f"graph must be a tpp.graph.ModelGraph, got {type(graph).__name__}")
    modules = dict(model.named_modules())
    indices = {}
    for name, idx in pruned.items():
        info = graph.layers.get(name) if isinstance(name, str) else None
        unit = graph.units.get(name) if isinstance(name, str) else None
        if info is None and (unit is None or unit.kind != "heads"):
            found = modules.get(name) if isinstance(name, str) else None
            what = "no such module" if found is None else f"a {type(found).__name__}, not a Conv2d/Linear"
            if name in graph.refusals:
                raise ValueError(f"attention module {name!r}: its heads cannot be pruned: {graph.refusals[name]}")
            raise ValueError(f"pruned layer {name!r}: {what} in {type(model).__name__}")
        n, what = (info.out_channels, "filters") if info is not None else (unit.channels, "heads")
        idx = as_indices(idx, n, f"pruned indices of layer {name!r}")
        if idx.numel() == n:
            raise ValueError(f"layer {name!r}: all {n} {what} would be pruned; at least one must stay")
        if idx.numel():
            indices[name] = idx
    if indices and not graph.traced:
        raise ValueError("prune_model needs the consumers of each pruned layer, which only a traced graph knows; "
                         "this graph was built from a bn_map (layer -> BatchNorm only). Make the model traceable "
                         "by torch.fx to prune it physically.")

    removed: dict[tuple[str, str], dict[tuple[int, int], Tensor]] = {}  # (module, side) -> {(start, width): idx}
    folds: dict[str, dict[tuple[int, int], Tensor]] = {}  # consumer -> {(start, width): bias delta}
    heads: dict[str, Tensor] = {}
    dims: dict[str, int] = {}  # parameters producing channels: their channel dim
    sizes: dict[str, int] = {}  # int attributes holding a channel count: their new value
    done: set[str] = set()
    for name, idx in indices.items():
        if name in done:
            continue
        spanned = graph.unit_of(name)
        if spanned is not None and spanned.spans:
            done.update(spanned.members)
            _remove_spanned(removed, modules, graph, spanned, indices, name)
            continue
        unit = _unit(graph, name, indices)
        done.update(unit.members)
        if unit.kind == "heads":
            params = _expect_heads(modules, name, unit.channels)
            heads[name] = _complement(idx, unit.channels)
            if not _replaced(modules[name]):  # packed qkv Linear: shrunk where it is
                d = params.head_dim
                rows = _blocks(idx, d)
                _remove(removed, f"{name}.qkv", "out", 0, 3 * unit.channels * d,
                        torch.cat([rows + s * unit.channels * d for s in range(3)]), name)
                _remove(removed, f"{name}.proj", "in", 0, unit.channels * d, rows, name)
            continue
        channels = unit.channels
        for parameter, dim in unit.parameters:
            _remove(removed, parameter, "out", 0, channels, idx, name)
            dims[parameter] = dim
        for member in unit.members:
            _expect(modules, member, "layer", channels)
            _remove(removed, member, "out", 0, channels, idx, name)
            for use in graph.layers[member].uses:
                if use.role == "size":
                    sizes[use.module] = channels - idx.numel()
                    continue
                _expect(modules, use.module, use.role, channels + use.offset, use.block, use.groups)
                if use.role == "input":
                    block = use.block
                    columns = _blocks(idx + use.offset, block)
                    _remove(removed, use.module, "in", use.offset * block, channels * block, columns, name)
                    if use.constant:  # removed channels arrive as constants (tpp.zeros): fold them into the bias
                        constants = evaluate(use.constant, modules, channels)[idx].repeat_interleave(block)
                        folds.setdefault(use.module, {})[(use.offset * block, channels * block)] = bias_delta(
                            modules[use.module], columns, constants)
                else:
                    _remove(removed, use.module, "out", use.offset, channels, idx + use.offset, name)
        _remove_pads(removed, modules, unit, idx, name)
    edits: dict[str, dict[str, Tensor]] = {}
    for (module, side), parts in removed.items():
        drop = torch.cat(list(parts.values())).sort().values
        if module in dims:
            edits[module] = {"out": _complement(drop, model.get_parameter(module).shape[dims[module]]),
                             "dim": dims[module]}
            continue
        edits.setdefault(module, {})[side] = _complement(drop, _width(modules[module], side))
    for module, parts in folds.items():
        edits[module]["fold"] = sum(parts.values())
    for attribute, size in sizes.items():
        edits[attribute] = {"size": size}
    return edits, heads


def _replaced(module: nn.Module) -> bool:
    """Whether an attention module losing heads is replaced (its forward fixes its width: ``nn.MultiheadAttention``,
    Swin window attention) rather than shrunk in place (a timm-style packed-qkv module)."""
    return isinstance(module, nn.MultiheadAttention) or is_window_attention(module)


def _keeping(module: nn.Module, heads: Tensor) -> nn.Module:
    """The module replacing attention module ``module`` keeping heads ``heads``."""
    if isinstance(module, nn.MultiheadAttention):
        return PrunedMultiheadAttention.keeping(module, heads)
    from .window_attention import keeping  # imports torchvision, which a model holding Swin modules has loaded

    return keeping(module, heads)


def _remove_spanned(removed: dict, modules: dict[str, nn.Module], graph: ModelGraph, unit: Unit,
                    indices: Mapping[str, Tensor], source: str) -> None:
    """Record the removals of a group with ``spans`` (streams of different widths joined through option-A
    shortcuts): each member its own filters, each BatchNorm/consumer the union of the members' channels reaching it,
    each PadShortcut its share. The members' indices must be one index set ``P`` over the spans."""
    pruned = unit.from_members(indices)
    if pruned is None:
        raise ValueError(f"{unit.spans_error('the pruned filters of its members')}. {source!r} and the others are "
                         "not: a kept channel of one stream would receive a removed channel of another through the "
                         "shortcut")
    own = unit.member_indices(pruned)
    parts: dict[tuple[str, str], list[tuple[int, int, Tensor]]] = {}  # (module, side) -> [(start, width, drop)]
    for member in unit.members:
        width, drop = unit.span(member)[1], own.get(member, pruned[:0])
        _expect(modules, member, "layer", width)
        if drop.numel():
            _remove(removed, member, "out", 0, width, drop, source)
        for use in graph.layers[member].uses:
            _expect(modules, use.module, use.role, width + use.offset, use.block, use.groups)
            block = use.block if use.role == "input" else 1
            parts.setdefault((use.module, "in" if use.role == "input" else "out"), []).append(
                (use.offset * block, width * block, _blocks(drop + use.offset, block)))
    for (module, side), found in parts.items():
        low, high = min(p[0] for p in found), max(p[0] + p[1] for p in found)
        _remove(removed, module, side, low, high - low, torch.cat([p[2] for p in found]).unique(), source)
    _remove_pads(removed, modules, unit, pruned, source)


def _remove_pads(removed: dict, modules: dict[str, nn.Module], unit: Unit, channels: Tensor, source: str) -> None:
    """Record what each PadShortcut the unit's pruned ``channels`` pass drops: those among its outputs (unit
    channels ``[start, start + out_channels)``) and, of them, those among its inputs (after the ``pad[0]`` zeros)."""
    for name, start in unit.pads:
        m = modules.get(name)
        if not isinstance(m, PadShortcut):
            found = "no such module" if m is None else repr(m)
            raise ValueError(f"the graph does not describe this model: {name!r} should be a PadShortcut, found "
                             f"{found}. Was the graph built for another model, or was it changed since?")
        out = channels[(channels >= start) & (channels < start + m.out_channels)] - start
        _remove(removed, name, "out", 0, m.out_channels, out, source)
        _remove(removed, name, "in", 0, m.in_channels, out[(out >= m.pad[0]) & (out < m.pad[0] + m.in_channels)]
                - m.pad[0], source)


def as_indices(idx, n: int | None, where: str) -> Tensor:
    """``idx`` (1-D integer tensor or sequence of ints) as sorted int64 CPU indices, distinct, >= 0 and < ``n``."""
    if isinstance(idx, Sequence) and not isinstance(idx, str):
        try:
            idx = torch.as_tensor(idx) if len(idx) else torch.empty(0, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{where}: expected a 1-D sequence of ints, got {idx!r}") from err
    if not isinstance(idx, Tensor) or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        found = idx.dtype if isinstance(idx, Tensor) else type(idx).__name__
        raise TypeError(f"{where}: expected a 1-D integer tensor or sequence of filter indices, got {found}")
    if idx.dim() != 1:
        raise ValueError(f"{where}: expected a 1-D tensor of filter indices, got shape {tuple(idx.shape)}")
    idx = idx.to("cpu", torch.int64).sort().values
    if idx.numel() and (idx[0] < 0 or (n is not None and idx[-1] >= n)):
        bound = f"[0, {n})" if n is not None else ">= 0"
        raise ValueError(f"{where}: filter indices must lie in {bound}, got min {int(idx[0])} and max {int(idx[-1])}")
    if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
        dup = int(idx[1:][idx[1:] == idx[:-1]][0])
        raise ValueError(f"{where}: filter indices must be distinct, got {dup} more than once")
    return idx


def _unit(graph: ModelGraph, name: str, indices: Mapping[str, Tensor]) -> Unit:
    """The unit of ``name`` (:class:`tpp.graph.Unit`), checked: every member given the same indices, alike in every
    group of a grouped conv."""
    info = graph.layers.get(name)
    unit = graph.unit_of(name)
    if unit is None:
        if info.is_output:
            raise ValueError(f"layer {name!r} produces the model output; pruning it would change the output shape")
        if len(info.group) > 1 and info.group_coupling is not None:
            raise ValueError(f"layer {name!r} is coupled with other layers ({info.coupling}), and its group "
                             f"[{', '.join(info.group)}] cannot be pruned with one shared index set: "
                             f"{info.group_coupling}")
        raise ValueError(f"layer {name!r} cannot be pruned: {graph.refusals.get(name, info.coupling)}")
    group = ", ".join(unit.members)
    missing = [m for m in unit.members if m not in indices]
    if missing:
        raise ValueError(f"layer {name!r} is coupled with other layers ({info.coupling}): prune its whole group "
                         f"[{group}] with one shared index set; missing: {', '.join(missing)}")
    for member in unit.members:
        if not torch.equal(indices[member], indices[name]):
            raise ValueError(f"coupled group [{group}]: layers {name!r} and {member!r} are given different filter "
                             f"indices; every member must be pruned with the same index set")
    if unit.segments > 1 and unit.unit_indices(indices[name]) is None:
        raise ValueError(f"layer {name!r}: its channels form {unit.segments} groups of {unit.size} (grouped convs); "
                         f"prune the same channels in each of its {unit.segments} groups, i.e. channels "
                         f"k·{unit.size} + j for every k")
    return unit


def _complement(idx: Tensor, n: int) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    return keep.nonzero().flatten()


def _blocks(kept: Tensor, block: int) -> Tensor:
    """In_features of a Linear after flatten: each channel ``c`` is ``c*block … c*block + block - 1``."""
    return (kept[:, None] * block + torch.arange(block)).flatten()


def _expect(modules: dict[str, nn.Module], name: str, role: str, channels: int, block: int = 1,
            groups: int = 1) -> None:
    """Check that module ``name`` is what the graph says it is, with at least ``channels`` (× ``block``) channels."""
    m = modules.get(name)
    conv = isinstance(m, nn.Conv2d)
    if role == "bn":
        ok = isinstance(m, _BNS) and m.num_features >= channels
    elif role == "ln":
        ok = isinstance(m, nn.LayerNorm) and m.normalized_shape[0] >= channels
    elif isinstance(m, nn.MultiheadAttention):
        ok = role == "input" and m.embed_dim >= channels
    elif role == "depthwise":
        ok = conv and m.groups == m.in_channels == m.out_channels >= channels
    elif role == "layer":
        ok = (conv and m.out_channels == channels) or (isinstance(m, nn.Linear) and m.out_features == channels)
    else:
        ok = (conv and m.groups == groups and m.in_channels >= channels) or (
            isinstance(m, nn.Linear) and m.in_features >= channels * block)
    if not ok:
        found = "no such module" if m is None else repr(m)
        raise ValueError(f"the graph does not describe this model: {name!r} should be a {role} with {channels} "
                         f"channels, found {found}. Was the graph built for another model, or was it changed since?")


def _expect_heads(modules: dict[str, nn.Module], name: str, heads: int) -> HeadParameters:
    m = modules.get(name)
    params = head_parameters(m) if m is not None else None
    if params is None or params.num_heads != heads:
        found = "no such module" if m is None else repr(m)
        raise ValueError(f"the graph does not describe this model: {name!r} should be an attention module with "
                         f"{heads} heads, found {found}. Was the graph built for another model?")
    return params


def _remove(removed: dict, name: str, side: str, start: int, width: int, idx: Tensor, source: str) -> None:
    """Record that ``name`` drops ``idx`` (its own coordinates) of the range ``[start, start + width)`` on ``side``."""
    parts = removed.setdefault((name, side), {})
    previous = parts.setdefault((start, width), idx)
    overlap = any(s < start + width and start < s + w for s, w in parts if (s, w) != (start, width))
    if overlap or not torch.equal(previous, idx):
        raise ValueError(f"module {name!r} would drop two different sets of {side}put channels (one from pruning "
                         f"{source!r}); its inputs are not aligned with one pruned layer or group")


def _width(module: nn.Module, side: str) -> int:
    if isinstance(module, _BNS):
        return module.num_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    if isinstance(module, nn.Linear):
        return module.out_features if side == "out" else module.in_features
    return module.out_channels if side == "out" else module.in_channels


def _shrunk(module: nn.Module, out: Tensor | None, inp: Tensor | None, fold: Tensor | None) -> dict[str, object]:
    """New tensors and sizes for ``module`` keeping output channels ``out`` and input columns ``inp``, ``fold``
    added to its bias (a bias is created if it has none)."""
    def select(t: Tensor, dim: int, idx: Tensor) -> Tensor:
        return t.index_select(dim, idx.to(t.device))

    if isinstance(module, PadShortcut):  # kept outputs: zeros before, the kept inputs, zeros after
        before = int((out < module.pad[0]).sum())
        return {"in_channels": inp.numel(), "out_channels": out.numel(),
                "pad": (before, out.numel() - inp.numel() - before)}
    if isinstance(module, _BNS):
        new = {k: select(getattr(module, k), 0, out) for k in ("weight", "bias", "running_mean", "running_var")
               if getattr(module, k) is not None}
        return {**new, "num_features": out.numel()}
    if isinstance(module, nn.LayerNorm):
        new = {k: select(getattr(module, k), 0, out) for k in ("weight", "bias") if getattr(module, k) is not None}
        return {**new, "normalized_shape": (out.numel(),)}
    if isinstance(module, nn.MultiheadAttention):  # its embedding columns; rebuilt by prune_model afterwards
        n = inp.numel()
        return {"in_proj_weight": select(module.in_proj_weight, 1, inp), "embed_dim": n, "kdim": n, "vdim": n}
    new = {}
    weight, bias = module.weight, module.bias
    if fold is not None:
        base = bias.to(torch.float64) if bias is not None else torch.zeros((), dtype=torch.float64,
                                                                         device=weight.device)
        bias = (base + fold.to(base.device)).to(weight.dtype)
        new["bias"] = bias
    if out is not None:
        weight = select(weight, 0, out)
        if bias is not None:
            new["bias"] = select(bias, 0, out)
    if isinstance(module, nn.Linear):
        weight = weight if inp is None else select(weight, 1, inp)
        return {**new, "weight": weight, "out_features": weight.shape[0], "in_features": weight.shape[1]}
    if module.groups == module.in_channels == module.out_channels > 1:  # depthwise: one filter per channel
        n = weight.shape[0]
        return {**new, "weight": weight, "out_channels": n, "in_channels": n, "groups": n}
    if inp is not None:  # grouped: the kept input channels are alike in every group (checked by _unit)
        per_group = module.in_channels // module.groups
        inp = inp[inp < per_group]
        weight = select(weight, 1, inp)
    return {**new, "weight": weight, "out_channels": weight.shape[0], "in_channels": weight.shape[1] * module.groups}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding attribute ``name`` (a qualified name) and the attribute's own name."""
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def _parameter_kept(model: nn.Module, name: str, kept: Tensor, dim: int) -> tuple[nn.Module, dict[str, Tensor]]:
    """The owner of parameter ``name`` and its new value keeping channels ``kept`` of dim ``dim``."""
    module, attr = _owner(model, name)
    value = getattr(module, attr)
    return module, {attr: value.index_select(dim, kept.to(value.device))}


def _attribute(model: nn.Module, name: str, size: int) -> tuple[nn.Module, dict[str, int]]:
    """The owner of int attribute ``name`` (a channel count the forward reads) and its new value."""
    module, attr = _owner(model, name)
    return module, {attr: size}


def _assign(module: nn.Module, new: dict[str, object]) -> None:
    for key, value in new.items():
        if key in module._parameters:
            like = module._parameters[key] if module._parameters[key] is not None else module.weight
            setattr(module, key, nn.Parameter(value, requires_grad=like.requires_grad))
        elif key in module._buffers:
            module._buffers[key] = value
        else:
            setattr(module, key, value)
