"""What a removed channel becomes through each op: the exactness contract of removal (tpp-method.md §6, §12).

After the zero-out a pruned channel leaves its producer as exact zeros (its weight rows and bias are 0). Removal
(:func:`tpp.prune_model`) is exact in eval mode iff every consumer of the channel can do without it, i.e. it
arrives there as 0, or as a constant the consumer's bias can absorb. The ops :mod:`tpp.walk` follows map the
channel's value ``c`` (0 at the producer) as follows; ``evaluate`` computes it with the ops themselves, in float64:

=====================================================================  ==========================================
op (module, ``F.*``/``torch.*`` function or ``Tensor`` method)          a removed channel's value ``c`` becomes
=====================================================================  ==========================================
ReLU, ReLU6, GELU, SiLU, Hardswish, Tanh, LeakyReLU, ELU, SELU, CELU,   ``f(c)``; 0 stays 0 (zero-preserving)
Mish, PReLU (one parameter)
Sigmoid, Hardsigmoid (f(0) = 1/2), Softplus (log 2 / β),                ``f(c)``: a constant (constant-carrying;
Hardtanh (clamp(0, min_val, max_val))                                   Hardtanh keeps 0 with its defaults)
Identity, Dropout(1d/2d), AlphaDropout, stochastic depth, contiguous,   ``c`` (eval mode)
clone; flatten/reshape, permute/transpose, indexing, expand, spatial
mean, concatenation, option-A shortcut (PadShortcut: subsampled, at
offset ``pad[0]``)
max pool, adaptive avg/max pool, upsampling                             ``c`` (a constant plane stays constant)
avg pool counting zero padding, or with ``divisor_override``            0 stays 0; a constant is refused
``h + k``, ``h − k``, ``k − h``, ``h·k``, ``h / k`` (a number ``k``)    ``c + k`` …: ``h + k`` and ``k − h`` carry
                                                                        ``k`` from 0
``h · g`` (both the unit's channels, e.g. ``h · sigmoid(h)``)           0 if either is 0
``h ± g`` (both the unit's channels, e.g. a residual stream)            ``c_h ± c_g``; refused if both are non-zero
``k / h``, ``g / h`` (a removed channel as divisor)                     refused (0/0)
BatchNorm with affine (γ, β zeroed with the unit)                       0, whatever comes in
BatchNorm ``affine=False`` with running statistics                      ``(c − μ)/√(σ² + ε)`` per channel, from
                                                                        the running statistics at removal
BatchNorm ``affine=False`` without running statistics                   0 stays 0; a constant is refused
depthwise conv carrying the channels (rows and bias zeroed)             0, whatever comes in
LayerNorm with γ (zeroed with the unit; ``allow_inexact`` only)         0, but the kept channels' statistics change
softmax, GroupNorm, joins with other values, anything else              not followed: refused by :mod:`tpp.graph`
=====================================================================  ==========================================

A consumer receiving 0 needs nothing. One receiving a constant ``c`` absorbs it into its bias at removal
(:func:`bias_delta`, a bias is added when it has none): a Linear ``b' = b + W[:, P] c_P`` (after flatten, each
channel's block of in_features); a Conv2d without zero padding (padding 0, or padding_mode reflect/replicate/
circular) ``b' = b + Σ_{kh,kw} W[:, P, kh, kw] c_P``, within each group of a grouped conv. A zero-padded conv
cannot: its border outputs see fewer copies of ``c`` than its inner ones — the layer is refused
(:func:`cannot_absorb`), as is every op above marked refused, with the node and the op named.

The value along a path is a :data:`Carried` chain of :class:`Step` s, ``()`` (:data:`ZERO`) when the channel is
exactly 0; a chain is computed at removal, so running statistics are those of the model being pruned.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["Step", "Carried", "ZERO", "through", "evaluate", "refusal", "cannot_absorb", "bias_delta", "describe",
           "ELEMENTWISE_MODULES", "ELEMENTWISE_FUNCTIONS", "ELEMENTWISE_METHODS"]

# --- the elementwise ops :mod:`tpp.fxnodes` classifies as "carry", by what they do to a removed channel ----------
# and nn.PReLU, which fxnodes.classify accepts with one parameter only
ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
)  # fmt: skip
VALUED_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.Hardtanh)  # f(0) computed by the module itself
SAME_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)  # identity in eval mode
ZERO_PRESERVING_FUNCTIONS = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, torch.tanh, F.leaky_relu, F.elu,
    F.selu, F.celu, F.mish,
})  # fmt: skip
VALUED_FUNCTIONS = frozenset({torch.sigmoid, F.hardsigmoid, F.softplus, F.hardtanh})
SAME_FUNCTIONS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout})  # and stochastic depth
ZERO_PRESERVING_METHODS = frozenset({"relu", "relu_", "tanh", "tanh_"})
VALUED_METHODS = frozenset({"sigmoid", "sigmoid_"})
SAME_METHODS = frozenset({"contiguous", "clone"})

ELEMENTWISE_MODULES = ZERO_PRESERVING_MODULES + VALUED_MODULES + SAME_MODULES
ELEMENTWISE_FUNCTIONS = ZERO_PRESERVING_FUNCTIONS | VALUED_FUNCTIONS | SAME_FUNCTIONS
ELEMENTWISE_METHODS = ZERO_PRESERVING_METHODS | VALUED_METHODS | SAME_METHODS

_MULTIPLY = frozenset({operator.mul, operator.imul, torch.mul, "mul", "mul_"})
_DIVIDE = frozenset({operator.truediv, operator.itruediv, torch.div, "div", "div_"})


class _Marker:
    """A placeholder in :attr:`Step.args`; one object, kept by copy and pickle (``is`` tells it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> str:
        return self.name


CHANNEL, ZEROS = _Marker("CHANNEL"), _Marker("ZEROS")  # in Step.args: the value so far / a unit channel that is 0


@dataclass(frozen=True)
class Step:
    """One op on a removed channel's value: ``op`` is ``"module"`` (``target``: the module's qualified name),
    ``"bn"`` (``target``: a BatchNorm without affine, its statistics at ``offset``), ``"function"`` or ``"method"``
    (``target`` called with ``args``/``kwargs``, :data:`CHANNEL` standing for the value so far and :data:`ZEROS`
    for another of the unit's channels, which is 0 there). ``where`` names the node and the op for messages."""

    op: str
    target: object
    where: str
    args: tuple = ()
    kwargs: tuple = ()  # (name, value) pairs
    offset: int = 0

    def __call__(self, v: Tensor, modules: Mapping[str, nn.Module]) -> Tensor:
        if self.op == "bn":
            bn = modules[self.target]
            span = slice(self.offset, self.offset + v.numel())
            stats = [getattr(bn, k)[span].detach().to("cpu", torch.float64) for k in ("running_mean", "running_var")]
            return F.batch_norm(v[None], *stats, None, None, False, 0.0, bn.eps)[0]
        if self.op == "module":
            return copy.deepcopy(modules[self.target]).to("cpu", torch.float64).eval()(v.clone())
        args = [v.clone() if a is CHANNEL else torch.zeros_like(v) if a is ZEROS else a for a in self.args]
        if self.op == "method":
            return getattr(args[0], self.target)(*args[1:], **dict(self.kwargs))
        return self.target(*args, **dict(self.kwargs))

    def effect(self, modules: Mapping[str, nn.Module]) -> str:
        """What this step maps a removed channel (0) to, in words."""
        if self.op == "bn":
            return "(0 − running_mean)/√(running_var + eps) per channel"
        return describe(evaluate((self,), modules, 1))


Carried = tuple  # tuple[Step, ...]: the ops a removed channel's value went through since it was last exactly 0
ZERO: Carried = ()


def evaluate(carried: Carried, modules: Mapping[str, nn.Module], channels: int) -> Tensor:
    """The float64 value of ``channels`` removed channels after the steps ``carried`` (zeros for :data:`ZERO`)."""
    v = torch.zeros(channels, dtype=torch.float64)
    with torch.no_grad():
        for step in carried:
            v = step(v, modules).to(torch.float64).reshape(channels)
    return v


def describe(v: Tensor) -> str:
    """A value of removed channels in words: the number if they share it."""
    if v.numel() and bool((v == v[0]).all()):
        return f"{float(v[0]):.6g}"
    return f"a per-channel constant ({', '.join(f'{float(x):.4g}' for x in v[:3])}{', …' if v.numel() > 3 else ''})"


def through(node: fx.Node, kind: str, inputs: Mapping[fx.Node, Carried], offset: int, where: str,
            modules: Mapping[str, nn.Module]) -> tuple[Carried | None, str | None]:
    """The value of the removed channels after ``node`` (of :func:`tpp.fxnodes.classify` kind ``kind``), from that
    of its inputs carrying them (``inputs``); ``offset``: where they sit in its channels. Returns ``(value, None)``,
    ``(None, why removal cannot be exact)`` naming the node and op by ``where``, or ``(None, None)`` for a join
    with a value the walk does not follow (which refuses it itself)."""
    module = modules.get(node.target) if node.op == "call_module" else None
    carried = list(inputs.values())
    first = carried[0] if carried else ZERO
    if kind in ("flatten", "mean", "cat", "softmax", "permute", "merge", "index", "expand", "pad"):
        return first, None  # softmax mixes channels: refused by the walk already
    if kind in ("depthwise", "layernorm") or (kind == "bn" and module.affine):  # zeroed rows/bias, zeroed γ and β
        return ZERO, None
    if kind == "bn":
        if module.running_mean is not None:
            return first + (Step("bn", node.target, where, offset=offset),), None
        return (ZERO, None) if first == ZERO else (None, f"{where} normalizes a removed channel, which carries a "
                                                         "constant here, with batch statistics")
    if kind == "spatial":
        if first == ZERO or _keeps_constants(node, module):
            return first, None
        return None, f"{where} averages a removed channel, which carries a constant here, with zero padding or a " \
                     "divisor_override: its border outputs differ from its inner ones"
    if kind == "carry":
        if _is(node, module, SAME_MODULES, SAME_FUNCTIONS, SAME_METHODS) or node.op == "call_function" \
                and node.target not in ELEMENTWISE_FUNCTIONS:  # stochastic depth
            return first, None
        if first == ZERO and _is(node, module, ZERO_PRESERVING_MODULES + (nn.PReLU,), ZERO_PRESERVING_FUNCTIONS,
                                 ZERO_PRESERVING_METHODS):
            return ZERO, None
    return _evaluated(node, inputs, first, where, modules)


def _evaluated(node: fx.Node, inputs: Mapping[fx.Node, Carried], first: Carried, where: str,
               modules: Mapping[str, nn.Module]) -> tuple[Carried | None, str | None]:
    """An elementwise op or join, as a :class:`Step` evaluated on the value so far."""
    if node.op == "call_module":
        step = Step("module", node.target, where)
    else:
        nonzero = [a for a, c in inputs.items() if c != ZERO]
        if len(nonzero) > 1:
            return None, f"{where} joins two values that both carry a constant for a removed channel; tpp folds " \
                         "one constant per path only"
        if node.target in _DIVIDE and any(a in inputs for a in node.args[1:2]):
            return None, f"{where} divides by a removed channel (0/0)"
        if node.target in _MULTIPLY and len(inputs) > 1 and len(nonzero) < len(inputs):
            return ZERO, None  # 0 · a finite constant
        lead = nonzero[0] if nonzero else next(iter(inputs), None)
        try:
            args = tuple(_marked(a, lead, inputs) for a in node.args)
            kwargs = tuple((k, _marked(a, lead, inputs)) for k, a in node.kwargs.items())
        except ValueError:  # a join with a value the walk does not follow: refused by the walk already
            return None, None
        step = Step("method" if node.op == "call_method" else "function", node.target, where, args, kwargs)
        first = inputs[lead] if lead is not None else ZERO
    if first == ZERO:
        at_zero = evaluate((step,), modules, 1)
        if not bool(torch.isfinite(at_zero).all()):
            return None, f"{where} maps a removed channel to {describe(at_zero)}"
        if not bool(at_zero.any()):
            return ZERO, None
    return first + (step,), None


def _marked(a, lead: fx.Node | None, inputs: Mapping[fx.Node, Carried]):
    """Argument ``a`` of a :class:`Step`; ValueError for a node not carrying the unit's channels."""
    if isinstance(a, fx.Node):
        if a not in inputs:
            raise ValueError(a.name)
        return CHANNEL if a is lead else ZEROS
    nested: list[fx.Node] = []
    fx.node.map_arg(a, nested.append)
    if nested:
        raise ValueError(nested[0].name)
    return a


def _is(node: fx.Node, module, modules: tuple, functions: frozenset, methods: frozenset) -> bool:
    if node.op == "call_module":
        return isinstance(module, modules) if module is not None else False
    return node.target in (functions if node.op == "call_function" else methods)


def _keeps_constants(node: fx.Node, module: nn.Module | None) -> bool:
    """A spatial op maps a constant plane to the same constant: all but zero-padded or rescaled average pooling."""
    if isinstance(module, nn.AvgPool2d):
        padding, counted, divisor = module.padding, module.count_include_pad, module.divisor_override
    elif node.op == "call_function" and node.target is F.avg_pool2d:
        def arg(i: int, name: str, default=None):
            return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

        padding, counted, divisor = arg(3, "padding", 0), arg(5, "count_include_pad", True), arg(6, "divisor_override")
    else:
        return True
    padded = any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
    return divisor is None and not (padded and counted)


def refusal(carried: Carried, consumer: str, modules: Mapping[str, nn.Module], channels: int) -> str | None:
    """Why removal cannot be exact when ``channels`` removed channels reach ``consumer`` (a Linear/Conv2d) as
    ``carried``; None when they arrive as 0 or the consumer absorbs them."""
    why = cannot_absorb(modules[consumer]) if carried else None
    if why is None:
        return None
    start = carried[0]
    arrives = describe(evaluate(carried, modules, channels))
    path = "" if len(carried) == 1 and start.op != "bn" else f" (it reaches {consumer} as {arrives})"
    return (f"{start.where} maps a removed channel to {start.effect(modules)}, not 0{path}; its consumer {consumer} "
            f"({type(modules[consumer]).__name__}) cannot absorb that constant into its bias: {why}")


def cannot_absorb(module: nn.Module) -> str | None:
    """Why consumer ``module`` cannot absorb a constant input channel into its bias; None if it can."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"it is a {type(module).__name__}, not a Linear or Conv2d"
    padding = module.padding
    if padding == "same":
        padding = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    elif padding == "valid":
        padding = (0, 0)
    if module.padding_mode != "zeros" or not any(padding):
        return None
    return f"it pads with zeros (padding={module.padding}), so its border outputs see fewer copies of the constant " \
           "than its inner ones"


def bias_delta(module: nn.Module, columns: Tensor, constants: Tensor) -> Tensor:
    """What input ``columns`` of a Linear (in_features) or Conv2d (input channels) holding ``constants`` add to its
    outputs, float64 on the CPU: ``W[:, columns] @ constants``, summed over the kernel within each conv group."""
    weight = module.weight.detach().to("cpu", torch.float64)
    columns, constants = columns.to("cpu", torch.int64), constants.to(torch.float64)
    if isinstance(module, nn.Linear):
        return weight[:, columns] @ constants
    weight = weight.sum((2, 3))  # [out, in // groups]
    per_in, per_out = module.in_channels // module.groups, module.out_channels // module.groups
    delta = torch.zeros(module.out_channels, dtype=torch.float64)
    for group in (columns // per_in).unique().tolist():
        chosen = columns // per_in == group
        rows = slice(group * per_out, (group + 1) * per_out)
        delta[rows] += weight[rows][:, columns[chosen] % per_in] @ constants[chosen]
    return delta
