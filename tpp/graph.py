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

Layout: the result types are :mod:`tpp.units` (re-exported here), the walk of each producer's channels is
:class:`tpp.walk.ChannelWalk` (with :mod:`tpp.layouts` for where the channels sit among a value's dims), and the units
are built from the walks by :mod:`tpp.unitbuild`; what a node means is :mod:`tpp.fxnodes`, what it does to a
removed channel :mod:`tpp.zeros`. This module holds ``analyze_model`` and the ``bn_map`` description.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from .attention import head_parameters
from .fxnodes import BNS, LAYERS, Tracer, out_channels
from .unitbuild import model_graph
from .units import ChannelUse, LayerInfo, ModelGraph, Unit
from .walk import ChannelWalk

__all__ = ["ChannelUse", "LayerInfo", "ModelGraph", "Unit", "analyze_model"]


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
    return model_graph(ChannelWalk(model, graph, allow_inexact, tracer.leaves))


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
