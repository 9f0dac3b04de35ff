"""How the torch.fx walk (:mod:`tpp.walk`) reads a model: the tracer and the classification of each node.

:class:`Tracer` keeps Conv2d/Linear/BatchNorm/MultiheadAttention (and ``leaf_modules``) opaque and records the
innermost module a tracing failure came from. :func:`classify` names what a node does to the channels it receives —
a layer consuming them, a carrier (BatchNorm, depthwise conv), an elementwise or spatial step that keeps them
aligned, a flatten, a join (add/mul/cat), a normalization over them, or something unknown — from the tables below
and the elementwise ops of :mod:`tpp.zeros` (which also says what each op does to a removed channel).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .attention import head_parameters
from .models.resnet_cifar import PadShortcut
from .zeros import ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, ELEMENTWISE_MODULES

__all__ = ["Tracer", "classify", "arg", "listing", "out_channels", "LAYERS", "BNS", "NORMALIZED", "NCHW", "NCL",
           "FLAT", "LAST", "UNARY", "MOVES"]


class Tracer(fx.Tracer):
    """fx tracer keeping Conv2d/Linear/BatchNorm/MultiheadAttention/PadShortcut (and subclasses) as leaves; records
    the innermost module a failure came from."""

    def __init__(self, leaves: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaves = frozenset(leaves)
        self.stack: list[str] = []  # qualified names of the modules being traced, outermost first
        self.failed_in: tuple[BaseException, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LAYERS + BNS + (nn.MultiheadAttention, PadShortcut)) \
            or module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            if self.failed_in is None or self.failed_in[0] is not err:  # the innermost module sees it first
                self.failed_in = (err, self.stack[-1])
            raise
        finally:
            self.stack.pop()


# ---------------------------------------------------------------------------------------------------------------
# What the walk understands

LAYERS = (nn.Conv2d, nn.Linear)
BNS = (nn.BatchNorm1d, nn.BatchNorm2d)

NORMALIZED = "normalized by"
# channels in dim 1 of a 4-D tensor / in dim 1 of a 3-D one / flattened blocks / in the last dim
NCHW, NCL, FLAT, LAST = "nchw", "ncl", "flat", "last"

_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax)
_SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
_SPATIAL_FUNCTIONS = frozenset(
    {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate}
)
_SOFTMAX_FUNCTIONS = frozenset({F.softmax, F.log_softmax, torch.softmax, torch.log_softmax})
_SOFTMAX_METHODS = frozenset({"softmax", "log_softmax"})
_ADD, _MUL = "added to", "multiplied with"
_JOIN_FUNCTIONS = {
    operator.add: _ADD, operator.iadd: _ADD, operator.sub: _ADD, operator.isub: _ADD, torch.add: _ADD,
    torch.sub: _ADD, operator.mul: _MUL, operator.imul: _MUL, operator.truediv: _MUL, operator.itruediv: _MUL,
    torch.mul: _MUL, torch.div: _MUL,
}  # fmt: skip
_JOIN_METHODS = {
    "add": _ADD, "add_": _ADD, "sub": _ADD, "sub_": _ADD, "mul": _MUL, "mul_": _MUL, "div": _MUL, "div_": _MUL,
}  # fmt: skip
_CAT_FUNCTIONS = frozenset({torch.cat, torch.concat, torch.concatenate})
_META_METHODS = frozenset({"size", "dim", "numel"})
_META_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})


def arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _is_batch_size(a) -> bool:
    """``x.size(0)`` or ``x.shape[0]``."""
    if not isinstance(a, fx.Node):
        return False
    if a.op == "call_method" and a.target == "size":
        return arg(a, 1, "dim") == 0
    return (
        a.op == "call_function"
        and a.target is operator.getitem
        and a.args[1] == 0
        and isinstance(a.args[0], fx.Node)
        and a.args[0].target is getattr
        and a.args[0].args[1] == "shape"
    )


def _is_stochastic_depth(target) -> bool:
    """torchvision's ``stochastic_depth`` (wrapped for fx): drops whole samples, so it carries every channel."""
    return getattr(target, "__module__", None) == "torchvision.ops.stochastic_depth" \
        and getattr(target, "__name__", None) == "stochastic_depth"


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, object]:
    """What ``node`` does to channels, as ``(kind, detail)``.

    kinds: layer/depthwise/grouped/bn (detail: the module), carry (elementwise, stochastic depth), spatial (NCHW
    only), flatten, mean (detail: keepdim), softmax (mixes channels: followed only to find the model output), join
    (detail: verb), cat, layernorm (LayerNorm/GroupNorm: normalizes channels together; detail: the module owning
    its γ/β, None if none), attention (a module with heads or an ``nn.MultiheadAttention``; detail: the module),
    attention-output (``attn(...)[i]``; detail: ``i``), and the steps that move dims: permute (detail:
    ``("dims", order)``, or ``("swap", (a, b))`` for a transpose), merge (``x.flatten(2)``, ``x.reshape(n, C,
    -1)``: NCHW's spatial dims into one; detail: C or None), index (``x[...]`` with ints and slices; detail: the
    index tuple), expand (``x.expand(...)``; detail: the sizes); meta (shape queries), unknown. Also pad (an
    option-A shortcut, :class:`tpp.models.resnet_cifar.PadShortcut`; detail: the module) and channel_pad (``F.pad``
    of dim 1 written inline).
    """
    op, target = node.op, node.target
    if op == "call_module":
        m = modules[target]
        if head_parameters(m) is not None or isinstance(m, nn.MultiheadAttention):
            return "attention", m
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            return ("depthwise" if m.groups == m.in_channels == m.out_channels else "grouped"), m
        if isinstance(m, LAYERS):
            return "layer", m
        if isinstance(m, BNS):
            return "bn", m
        if isinstance(m, PadShortcut):
            return "pad", m
        if isinstance(m, ELEMENTWISE_MODULES) or (isinstance(m, nn.PReLU) and m.num_parameters == 1):
            return "carry", None
        if isinstance(m, _SPATIAL_MODULES):
            return "spatial", None
        if isinstance(m, _SOFTMAX_MODULES):
            return "softmax", None
        if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) == (1, -1):
            return "flatten", None
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            return "layernorm", target
    elif op == "call_function":
        if target in ELEMENTWISE_FUNCTIONS or _is_stochastic_depth(target):
            return "carry", None
        if target in (F.layer_norm, F.group_norm):
            weight = arg(node, 2, "weight")
            owner = weight.target.rpartition(".")[0] if isinstance(weight, fx.Node) and weight.op == "get_attr" \
                else None
            return "layernorm", owner if isinstance(modules.get(owner), (nn.LayerNorm, nn.GroupNorm)) else None
        if target is torch.permute:
            return "permute", ("dims", tuple(arg(node, 1, "dims", ())))
        if target is torch.transpose:
            return "permute", ("swap", (arg(node, 1, "dim0"), arg(node, 2, "dim1")))
        if target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_module" \
                and classify(node.args[0], modules)[0] == "attention":
            return "attention-output", node.args[1]
        if target is torch.flatten and arg(node, 1, "start_dim", 0) == 2 and arg(node, 2, "end_dim", -1) == -1:
            return "merge", None
        if target is operator.getitem and _is_index(node.args[1]):
            return "index", node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if target in _SPATIAL_FUNCTIONS:
            return "spatial", None
        if target in _SOFTMAX_FUNCTIONS:
            return "softmax", None
        if target in _JOIN_FUNCTIONS:
            return "join", _JOIN_FUNCTIONS[target]
        if target in _CAT_FUNCTIONS:
            return "cat", None
        if target is F.pad and _pads_channels(node):
            return "channel_pad", None
        if target is torch.flatten and arg(node, 1, "start_dim", 0) == 1 and arg(node, 2, "end_dim", -1) == -1:
            return "flatten", None
        if target is getattr and node.args[1] in _META_ATTRIBUTES:
            return "meta", None
    elif op == "call_method":
        if target in ELEMENTWISE_METHODS:
            return "carry", None
        if target in _JOIN_METHODS:
            return "join", _JOIN_METHODS[target]
        if target in _SOFTMAX_METHODS:
            return "softmax", None
        if target in _META_METHODS:
            return "meta", None
        if target == "flatten" and arg(node, 1, "start_dim", 0) == 1 and arg(node, 2, "end_dim", -1) == -1:
            return "flatten", None
        if target == "flatten" and arg(node, 1, "start_dim", 0) == 2 and arg(node, 2, "end_dim", -1) == -1:
            return "merge", None
        if target in ("view", "reshape"):
            shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            if len(shape) == 2 and _is_batch_size(shape[0]) and shape[1] == -1:
                return "flatten", None
            if len(shape) == 3 and _is_batch_size(shape[0]) and isinstance(shape[1], int) and shape[1] > 0:
                return "merge", shape[1]
        if target == "permute":
            dims = node.args[1:]
            return "permute", ("dims", tuple(dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list))
                                             else dims))
        if target == "transpose":
            return "permute", ("swap", (arg(node, 1, "dim0"), arg(node, 2, "dim1")))
        if target == "expand":
            sizes = node.args[1:]
            return "expand", tuple(sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes)
        if target == "mean":
            dims = arg(node, 1, "dim")
            spatial = isinstance(dims, (tuple, list)) and all(isinstance(d, int) for d in dims)
            if spatial and sorted(d % 4 for d in dims) == [2, 3]:
                return "mean", bool(arg(node, 2, "keepdim", False))
    return "unknown", None


UNARY = frozenset({"layer", "depthwise", "grouped", "bn", "carry", "spatial", "flatten", "mean", "pad"})
MOVES = frozenset({"permute", "merge", "index", "expand"})  # steps that move dims but keep the channels


def _is_index(index) -> bool:
    """An index of ints and full-or-strided slices (no tensors, ``None`` or ``...``), as ``x[:, 0]`` or
    ``x[:, :, ::2]``."""
    parts = index if isinstance(index, tuple) else (index,)
    return bool(parts) and all(
        (isinstance(p, int) and not isinstance(p, bool))
        or (isinstance(p, slice) and all(v is None or isinstance(v, int) for v in (p.start, p.stop, p.step)))
        for p in parts)


def _pads_channels(node: fx.Node) -> bool:
    """``F.pad(x, pad)`` padding dim 1 of a 4-D tensor (``pad[4:6]``), or with a ``pad`` tpp cannot read."""
    pad = arg(node, 1, "pad")
    return not isinstance(pad, (tuple, list)) or any(not isinstance(p, int) or (4 <= i < 6 and p)
                                                      for i, p in enumerate(pad))


def listing(names: tuple[str, ...]) -> str:
    """``[a, b, c]``, or ``[first, second, … (n layers), last]`` for long groups."""
    if len(names) <= 4:
        return f"[{', '.join(names)}]"
    return f"[{names[0]}, {names[1]}, … ({len(names)} layers), {names[-1]}]"


def out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
