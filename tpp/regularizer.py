"""``TPPRegularizer``: the TPP penalty of a model, its gradients, its schedule and its zero-out.

Per layer with pruned filters ``P`` (tpp-method.md §3), at strength ``r``:

    E − L_cls = Σ_layers  r·c·L_gram  +  (r/2)(‖W_P‖² + ‖b_P‖²)  +  (r/2) Σ_{j∈P} (γ_j² + β_j²)

with ``L_gram`` from :mod:`tpp.reference` (``reduction="mean"`` divides it by N²), ``c = gram_weight``, the L2 part
only with ``weight_l2=True`` and the BN part only with ``bn=True``. The BN part covers every affine BatchNorm
carrying the pruned channels: the one right after the layer (the paper's) and, past a depthwise conv, the carrier's
own; the depthwise conv's rows join the L2 part. The layer-wise zero-out clears all of these, so that removal
(:func:`tpp.prune_model`) is exact on MobileNet-style blocks too; on plain conv→BN chains this is the paper's term.
The defaults are what the paper's code runs; the paper's eq. 6, ``L_cls + λ/2 (L_gram + L_bn)`` with sums, is
``gram_weight=0.5, reduction="sum", weight_l2=False`` with ``λ = r``.
"""
from __future__ import annotations

import logging
import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from . import reference
from .attention import head_parameters
from .backends import resolve_backend
from .graph import ModelGraph, analyze_model
from .metrics import output_deviation
from .schedule import GrowingSchedule
from .selection import RatioSpec, SpeedupSearch, search_speedup, select_filters

__all__ = ["TPPRegularizer", "Slot"]

STATE_VERSION = 1

_log = logging.getLogger(__name__)


ROLES = ("gram", "l2", "bn", "zero")


@dataclass(frozen=True)
class Slot:
    """A parameter read as ``[segments, units, length]`` in memory order: unit ``i`` owns ``[:, i, :]``.

    ``role``: ``"gram"`` (gram term and L2 term), ``"l2"`` (L2 term: biases, depthwise carriers), ``"bn"`` (BN γ/β
    term) or ``"zero"`` (only cleared by the zero-out, e.g. an out-projection's input columns). A Conv2d/Linear
    weight is one segment of length D (its rows, whatever its memory format); a bias or BN vector one segment of
    length 1; the q, k, v rows of attention head ``i`` of a packed ``[3E, E]`` projection three segments of
    length ``d_h·E``.
    """

    param: nn.Parameter
    role: str
    segments: int = 1
    segment_length: int = 0  # length of one unit's segment; 0: a whole row (one segment)

    @property
    def units(self) -> int:
        return self.param.shape[0] if not self.segment_length else self.param.numel() // (self.segments * self.length)

    @property
    def length(self) -> int:
        return self.segment_length or self.param.numel() // self.param.shape[0]

    def indexed(self, t: Tensor) -> tuple[Tensor, int]:
        """``t`` (the parameter or its gradient) as a tensor whose dim ``dim`` indexes units: ``(t, 0)`` for one
        segment, else the contiguous ``t`` viewed ``[segments, units, length]`` and 1."""
        return (t, 0) if not self.segment_length else (t.view(self.segments, -1, self.length), 1)


@dataclass(frozen=True)
class _Unit:
    """What one pruned index set applies to: ``names`` (listed in ``reg.pruned``), zero-out slot ``index``
    (execution order), the sorted pruned unit indices and every parameter slot they index."""

    names: tuple[str, ...]
    index: int
    pruned: Tensor                   # sorted int64 indices on the parameters' device
    slots: tuple[Slot, ...]

    def of_role(self, *roles: str) -> list[Slot]:
        return [s for s in self.slots if s.role in roles]


class _ZeroPenalty:
    """The plan of a regularizer whose terms are all off."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def penalty(self, strength: Tensor) -> Tensor:
        return torch.zeros((), dtype=self.dtype, device=self.device)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP/DataParallel (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _parameter_paths(model: nn.Module, params: list[Tensor]) -> list[tuple[dict, str, object, str]]:
    """``(container, key, object, path)`` for every step from ``model`` down to each of ``params``: the child
    modules (``parent._modules[key]``) and the parameters (``module._parameters[key]``), each step once. While
    ``container.get(key) is object`` holds for all of them, no module or parameter the regularizer binds was
    replaced. A parameter not registered in ``model`` (e.g. behind a parametrization) gets no steps."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    steps: dict[tuple[int, str], tuple[dict, str, object, str]] = {}
    for param in params:
        name = names.get(id(param))
        if name is None:
            continue
        *path, leaf = name.split(".")
        module = model
        for i, part in enumerate(path):
            child = module._modules[part]
            steps.setdefault((id(module._modules), part), (module._modules, part, child, ".".join(path[:i + 1])))
            module = child
        steps.setdefault((id(module._parameters), leaf), (module._parameters, leaf, param, name))
    return list(steps.values())


class TPPRegularizer:
    """Trainability Preserving Pruning regularizer for ``model``.

    Filters are chosen once, at construction, by :func:`tpp.select_filters` (L1, smallest first) and kept in
    ``self.pruned``. Use it in an ordinary training loop, one ``step()`` per optimizer step::

        loss = criterion(model(x), y) + reg.penalty()        # autograd path, or:
        loss.backward(); reg.apply_gradients()               # in-place path (same gradients, no graph)
        optimizer.step(); reg.step()                         # schedule + layer-wise zero-out

    Use either ``penalty()`` in the loss or ``apply_gradients()`` after ``backward()``, not both.

    Guards: frozen parameters (``requires_grad=False``) have no term, so neither path gives them a gradient; the
    zero-out still clears their pruned entries (``prune()`` removes them either way). A module or parameter of a
    pruned unit replaced after construction (or one whose shape changed) is refused at the next call with a
    ``RuntimeError`` naming it; ``prune()`` also refuses any replaced module its graph describes. ``self.pruned``
    is a copy: editing it changes nothing here.

    AMP: ``penalty()`` is computed in float32 and may be added to the loss inside ``autocast``; with a
    ``GradScaler`` call ``apply_gradients()`` after ``scaler.unscale_(optimizer)`` (the gradients it adds are
    unscaled) and before ``scaler.step(optimizer)``.

    DDP: construct it on the wrapped or the bare model (wrappers are unwrapped) on every rank; selection is
    deterministic, so every rank picks the same filters from the same weights (broadcast ``state_dict()`` from
    rank 0 when weights may differ). ``apply_gradients()`` after ``backward()`` acts on the already all-reduced
    gradients and adds identical values on every rank; ``penalty()`` in the loss is all-reduced like the loss.

    Args:
        model: the network; Conv2d/Linear layers and their BatchNorms are found with :mod:`tpp.graph`.
        pruning_ratio: float, ``"pattern:ratio,..."`` or ``{pattern: ratio}`` (see :mod:`tpp.selection`).
        skip: patterns forced to ratio 0.
        variant: ``"decorrelate"`` (paper eq. 3) or ``"diagonal"`` (paper Fig. 2b).
        gram_weight: c, the gram term's weight (1000 in the reference run).
        reduction: ``"mean"`` (gram term ÷ N², reference run) or ``"sum"`` (paper eq. 3).
        bn: include the BN γ/β term.  weight_l2: include ½‖W_P‖² (+ bias).
        schedule: a :class:`GrowingSchedule` (default: the reference CIFAR run).
        backend: ``"auto" | "torch" | "triton" | "cuda"``; ``$TPP_BACKEND`` overrides it.
        bn_map: ``{layer: bn or None}`` for models torch.fx cannot trace (see :func:`tpp.graph.analyze_model`).
        leaf_modules: submodules torch.fx should not trace into (opaque; see :func:`tpp.graph.analyze_model`).
        target_speedup: instead of ``pruning_ratio``, a FLOPs speedup (> 1) to reach within 2% by
            :func:`tpp.count_flops` on ``example_input``; the ratios are found by :func:`tpp.selection.
            search_speedup` (``speedup_mode`` ``"uniform"`` or ``"global"``), logged at INFO and kept in
            ``self.speedup_search`` (``.ratios``, ``.speedup``, ``.describe()``).
        graph: an existing :func:`tpp.graph.analyze_model` of ``model`` (not traced again).
        allow_inexact: also prune channels a LayerNorm normalizes with kept ones (a ViT's embedding dimension:
            tpp-method.md §12), whose removal changes the output; needs ``example_input``: :meth:`prune` measures
            the change on it (:func:`tpp.metrics.output_deviation`, against the zeroed model), logs it as a
            warning and keeps it in ``self.removal_deviation``.
    """

    def __init__(self, model: nn.Module, pruning_ratio: RatioSpec | None = None, skip: str | Iterable[str] = (),
                 variant: str = "decorrelate", gram_weight: float = 1000.0, reduction: str = "mean",
                 bn: bool = True, weight_l2: bool = True, schedule: GrowingSchedule | None = None,
                 backend: str = "auto", *, bn_map: Mapping[str, str | None] | None = None,
                 graph: ModelGraph | None = None, target_speedup: float | None = None, example_input=None,
                 speedup_mode: str = "uniform", leaf_modules: Iterable[str] = (), allow_inexact: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if (pruning_ratio is None) == (target_speedup is None):
            raise ValueError("give exactly one of pruning_ratio and target_speedup")
        if target_speedup is not None and example_input is None:
            raise ValueError("target_speedup needs example_input (FLOPs are counted on it, e.g. one image)")
        if variant not in reference.VARIANTS:
            raise ValueError(f"variant must be one of {reference.VARIANTS}, got {variant!r}")
        if reduction not in reference.REDUCTIONS:
            raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
        if isinstance(gram_weight, bool) or not isinstance(gram_weight, (int, float)) \
                or not math.isfinite(gram_weight) or gram_weight < 0:
            raise ValueError(f"gram_weight must be a finite number >= 0, got {gram_weight!r}")
        for flag, value in (("bn", bn), ("weight_l2", weight_l2)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {value!r}")
        schedule = GrowingSchedule() if schedule is None else schedule
        if not isinstance(schedule, GrowingSchedule):
            raise TypeError(f"schedule must be a GrowingSchedule, got {type(schedule).__name__}")

        self.model = unwrap_model(model)
        self.variant, self.gram_weight, self.reduction = variant, float(gram_weight), reduction
        self.bn, self.weight_l2, self.schedule = bn, weight_l2, schedule
        self.graph = analyze_model(self.model, bn_map=bn_map, leaf_modules=leaf_modules,
                                   allow_inexact=allow_inexact) if graph is None else graph
        self.example_input, self.removal_deviation = example_input, None
        params = list(self.model.parameters())
        if not params:
            raise ValueError("model has no parameters to regularize")
        self.backend = resolve_backend(backend, params[0].device)
        self.iteration = 0
        self._strength_override: float | None = None
        self._strength_t: Tensor | None = None  # r on the device, read by the plan's kernels
        self._modules_at_build = dict(self.model.named_modules())  # what self.graph describes
        self.speedup_search: SpeedupSearch | None = None
        if target_speedup is not None:
            self.speedup_search = search_speedup(self.model, target_speedup, example_input, mode=speedup_mode,
                                                 skip=skip, graph=self.graph)
            _log.info("%s", self.speedup_search.describe())
            pruned = self.speedup_search.pruned
        else:
            pruned = select_filters(self.model, pruning_ratio, skip, graph=self.graph)
        self._bind(pruned)
        if self.inexact and example_input is None:
            raise ValueError(f"units {', '.join(self.inexact)} cannot be removed exactly ({self.inexact[0]}: "
                             f"{self.graph.units[self.inexact[0]].inexact}); pass example_input so that prune() "
                             "can measure how much the output changes")

    # ------------------------------------------------------------------- units
    def _bind(self, pruned: Mapping[str, Tensor]) -> None:
        """Attach pruned index sets to the model's parameters, one ``_Unit`` per graph unit (zero-out order), and
        space the zero-out over the stabilize phase (:meth:`GrowingSchedule.spaced_for`).

        A layer or group binds every producer's weight (``"gram"``), biases and depthwise carriers (``"l2"``) and
        affine BatchNorms (``"bn"``); BatchNorms and carriers that see the channels at an offset (after a
        concatenation) get a nameless ``_Unit`` of their own with the shifted indices, zeroed with the unit. Heads
        bind the packed in-projection (``"gram"``, 3 segments of ``d_h·E``), its bias (``"l2"``) and the
        out-projection's input columns (``"zero"``)."""
        modules = dict(self.model.named_modules())
        given = {}
        for name, idx in pruned.items():
            info = self.graph.layers.get(name)
            unit = self.graph.unit_of(name)
            if info is None and (unit is None or unit.kind != "heads"):
                raise ValueError(f"pruned layer {name!r} is not a Conv2d/Linear layer or attention module of this "
                                 "model")
            n = info.out_channels if info is not None else unit.channels
            reference.check_pruned_indices(idx, n, f"pruned indices of layer {name!r}")
            if idx.numel() == 0:
                continue
            if unit is None:
                raise ValueError(f"layer {name!r} cannot be pruned on its own: "
                                 f"{self.graph.refusals.get(name, info.coupling)}")
            given[name] = idx.to("cpu", torch.int64).sort().values
        units, pruned_sets = [], {}
        for unit in self.graph.units.values():
            if unit.spans:
                units += self._bound_spans(unit, given, pruned_sets, modules)
                continue
            present = [m for m in unit.members if m in given]
            if not present:
                continue
            idx = given[present[0]]
            for member in unit.members:
                if member not in given or not torch.equal(given[member], idx):
                    raise ValueError(f"coupled group [{', '.join(unit.members)}]: every member must be pruned with "
                                     f"the same index set ({member!r} differs from {present[0]!r})")
            indices = unit.unit_indices(idx)
            if indices is None:
                raise ValueError(f"layer {present[0]!r}: its channels form {unit.segments} groups of {unit.size} "
                                 "(grouped convs); prune the same channels in every group")
            pruned_sets.update({m: idx for m in unit.members})
            units += self._bound(unit, indices, idx, modules)
        self._pruned = pruned_sets
        self._units = units
        self._params = list({id(slot.param): slot.param for unit in units for slot in unit.slots}.values())
        self._shapes = [p.shape for p in self._params]
        self._guards = _parameter_paths(self.model, self._params)
        self._guard_columns = tuple(zip(*self._guards)) or ((), (), (), ())
        self._plan_ptrs: list[int] | None = None
        if units:
            self.schedule = self.schedule.spaced_for(units[-1].index + 1)
            self._plan()

    def _bound(self, unit, indices: Tensor, channels: Tensor, modules: dict[str, nn.Module]) -> list[_Unit]:
        """The ``_Unit``s of one graph unit: its own (``unit.members`` as names), then one per offset carrier."""
        if unit.kind == "heads":
            p = head_parameters(modules[unit.name])
            slots = [Slot(p.packed_weight, "gram", 3, p.head_dim * p.packed_weight.shape[1])]
            if p.packed_bias is not None:
                slots.append(Slot(p.packed_bias, "l2", 3, p.head_dim))
            slots.append(Slot(p.out_weight, "zero", p.out_weight.shape[0], p.head_dim))
            return [_Unit(unit.members, unit.index, indices.to(p.packed_weight.device), tuple(slots))]

        def slot(param: Tensor, role: str) -> Slot:
            if unit.segments == 1:
                return Slot(param, role)
            return Slot(param, role, unit.segments, param.numel() // param.shape[0])

        layers = [modules[m] for m in unit.members]
        uses = list(dict.fromkeys(u for m in unit.members for u in self.graph.layers[m].uses
                                  if u.role in ("bn", "depthwise", "ln")))
        own = [u for u in uses if u.offset == 0 and (unit.segments == 1 or self._width(modules[u.module])
                                                      == unit.channels)]
        carried = [modules[u.module] for u in own]
        depthwise = [m for m in carried if isinstance(m, nn.Conv2d)]
        bns = [m for m in carried if not isinstance(m, nn.Conv2d) and m.weight is not None]
        slots = [slot(m.weight, "gram") for m in layers]
        slots += [slot(p, "l2") for m in layers if m.bias is not None for p in (m.bias,)]
        slots += [slot(p, "l2") for m in depthwise for p in (m.weight, m.bias) if p is not None]
        slots += [slot(p, "bn") for bn in bns for p in (bn.weight, bn.bias) if p is not None]
        slots += [_channel_slot(self.model.get_parameter(name), dim) for name, dim in unit.parameters]
        device = layers[0].weight.device
        bound = [_Unit(unit.members, unit.index, indices.to(device), tuple(slots))]
        for use in uses:
            if use in own:
                continue
            m = modules[use.module]
            role = "l2" if isinstance(m, nn.Conv2d) else "bn"
            params = tuple(Slot(p, role) for p in (m.weight, m.bias) if p is not None)
            if params:
                bound.append(_Unit((), unit.index, (channels + use.offset).to(device), params))
        return bound

    def _bound_spans(self, unit, given: Mapping[str, Tensor], pruned_sets: dict[str, Tensor],
                     modules: dict[str, nn.Module]) -> list[_Unit]:
        """The ``_Unit``s of a group with ``spans`` (streams of different widths, tpp-method.md §12): one per member
        with pruned rows of its own (weight ``"gram"``, bias ``"l2"``, its own BatchNorm ``"bn"``), then one per other
        carrier with the union of the members' channels there; all in the unit's one zero-out slot. Fills
        ``pruned_sets`` with every member's own indices."""
        if not any(m in given for m in unit.members):
            return []
        indices = unit.from_members(given)
        if indices is None:
            raise ValueError(unit.spans_error("its members' pruned channels"))
        own = unit.member_indices(indices)
        pruned_sets.update(own)
        reached: dict[str, list[tuple[str, Tensor]]] = {}  # carrier -> (member, its channels there)
        for member in own:
            for use in self.graph.layers[member].uses:
                if use.role in ("bn", "depthwise"):
                    reached.setdefault(use.module, []).append((member, own[member] + use.offset))
        bound, carriers = [], []
        for member in own:
            layer = modules[member]
            slots = [Slot(layer.weight, "gram")] + ([Slot(layer.bias, "l2")] if layer.bias is not None else [])
            for name, parts in reached.items():
                m = modules[name]
                if [p[0] for p in parts] == [member] and self._width(m) == layer.weight.shape[0] \
                        and torch.equal(parts[0][1], own[member]):
                    role = "l2" if isinstance(m, nn.Conv2d) else "bn"
                    slots += [Slot(p, role) for p in (m.weight, m.bias) if p is not None]
                    carriers.append(name)
            bound.append(_Unit((member,), unit.index, own[member].to(layer.weight.device), tuple(slots)))
        for name, parts in reached.items():
            m = modules[name]
            params = tuple(Slot(p, "l2" if isinstance(m, nn.Conv2d) else "bn") for p in (m.weight, m.bias)
                           if p is not None)
            if name not in carriers and params:
                channels = torch.cat([p[1] for p in parts]).unique()
                bound.append(_Unit((), unit.index, channels.to(params[0].param.device), params))
        return bound

    @staticmethod
    def _width(module: nn.Module) -> int:
        if isinstance(module, nn.LayerNorm):
            return module.normalized_shape[0]
        return module.out_channels if isinstance(module, nn.Conv2d) else module.num_features

    @property
    def inexact(self) -> list[str]:
        """The pruned units whose removal changes the output (``allow_inexact``), by unit name."""
        return self.graph.inexact_in(self._pruned)

    def slots(self, name: str) -> list[Slot]:
        """The parameter slots the pruned set of layer ``name`` indexes: what the penalty and the zero-out touch."""
        for unit in self._units:
            if name in unit.names:
                return list(unit.slots)
        raise KeyError(f"{name!r} has no pruned units; pruned layers: {sorted(self._pruned)}")

    @property
    def pruned(self) -> dict[str, Tensor]:
        """``{layer: sorted int64 pruned filter indices}`` (CPU): a copy — editing it changes nothing here."""
        return {name: idx.clone() for name, idx in self._pruned.items()}

    # ------------------------------------------------------------------ guards
    def _check_model(self) -> None:
        """Refuse a model whose bound modules or parameters were replaced since the regularizer was built (the
        penalty, zero-out and removal would act on the old ones): identity checks, no device work."""
        containers, keys, objects, _ = self._guard_columns
        if all(map(operator.is_, map(dict.get, containers, keys), objects)):  # C-level loop: ~5 µs for 200 steps
            return
        for container, key, obj, path in self._guards:
            if container.get(key) is not obj:
                what = "parameter" if isinstance(obj, Tensor) else "module"
                raise RuntimeError(f"{what} model.{path} was replaced after the TPPRegularizer was built; the "
                                   "regularizer would penalize, zero and remove the old one: build a new "
                                   "TPPRegularizer for the changed model")

    def _plan(self):
        """The backend's penalty plan for the bound units (``None`` if no term is on), after :meth:`_check_model`;
        rebuilt when a parameter moved (device, dtype or storage) or was frozen or unfrozen: one comparison of data
        pointers and one of ``requires_grad`` flags per call."""
        self._check_model()
        ptrs = [p.data_ptr() for p in self._params]
        trainable = [p.requires_grad for p in self._params]
        if ptrs != self._plan_ptrs or trainable != self._plan_trainable:
            self._build_plan()
            self._plan_ptrs, self._plan_trainable = ptrs, trainable
        return self._penalty_plan

    def _compiled_plan(self):
        """The current plan, checked without reading data pointers (they cannot be traced)."""
        param, plan = self._params[0], self._penalty_plan
        if plan is None:
            return _ZeroPenalty(param.device, reference.accumulation_dtype(param.dtype))
        if self._strength_t.device != param.device or self._plan_dtypes != [p.dtype for p in self._params] \
                or self._plan_trainable != [p.requires_grad for p in self._params]:
            raise RuntimeError("the model's parameters moved or were frozen since the TPPRegularizer last ran: "
                               "call reg.penalty() once outside torch.compile to rebuild its plan")
        return plan

    def _build_plan(self) -> None:
        """The plan over the trainable parameters: a frozen one (``requires_grad=False``) has no term, so neither
        path gives it a gradient (its terms are constants); the zero-out still clears it."""
        for param, shape in zip(self._params, self._shapes):
            if param.shape != shape:
                path = next((g[3] for g in self._guards if g[2] is param), "of a pruned layer")
                raise RuntimeError(f"parameter model.{path} changed shape from {tuple(shape)} to "
                                   f"{tuple(param.shape)} after the TPPRegularizer was built: build a new "
                                   "TPPRegularizer for the changed model")
        device = self._params[0].device
        self.backend = resolve_backend(self.backend.name, device)
        self._units = [replace(unit, pruned=unit.pruned.to(device)) for unit in self._units]
        terms = {role: [(s.param, u.pruned, s.segments, s.segment_length) for u in self._units
                        for s in u.of_role(role) if s.param.requires_grad] for role in ROLES}
        grams = terms["gram"] if self.gram_weight else []
        squares = terms["gram"] * (self.weight_l2 and not self.gram_weight) + terms["l2"] * self.weight_l2 \
            + terms["bn"] * self.bn
        self._strength_t = torch.tensor(self.strength, dtype=torch.float64, device=device)
        self._strength_written = self.strength
        self._plan_dtypes = [p.dtype for p in self._params]
        self._plan_trainable = [p.requires_grad for p in self._params]
        self._zeroed_versions: list[int] | None = None
        self._plan_params = list({id(t[0]): t[0] for t in grams + squares}.values())
        self._penalty_plan = self.backend.plan(
            grams, squares, gram_weight=self.gram_weight, l2_weight=float(self.weight_l2),
            mean=self.reduction == "mean", variant=self.variant) if grams or squares else None

    # ---------------------------------------------------------------- schedule
    @property
    def strength(self) -> float:
        """r(t) of the schedule at iteration t = number of ``step()`` calls, unless set by hand."""
        if self._strength_override is not None:
            return self._strength_override
        return self.schedule.strength(self.iteration)

    @strength.setter
    def strength(self, value: float | None) -> None:
        """Pin r to ``value`` from now on (kept in ``state_dict``); ``None`` returns to the schedule."""
        _check_strength(value)
        self._strength_override = None if value is None else float(value)
        self._sync_strength()

    def _sync_strength(self) -> None:
        """Write r into the device scalar the plan reads (outside any captured region: step(), the setter)."""
        if self._strength_t is not None and self._strength_written != self.strength:
            self._strength_t.fill_(self.strength)
            self._strength_written = self.strength

    @property
    def phase(self) -> str:
        """``"grow"`` | ``"stabilize"`` | ``"done"`` at the current iteration."""
        return self.schedule.phase(self.iteration)

    # ------------------------------------------------------------------- terms
    def _skip(self) -> bool:
        """Whether this call adds nothing: no units, r = 0 or every pruned entry provably 0 (:meth:`_zeroed`),
        outside CUDA-graph capture (a captured step must contain the launches: its replays read later states)."""
        if not self._units:
            return True
        return (self.strength == 0 or self._zeroed()) \
            and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())

    def _zeroed(self) -> bool:
        """Whether every pruned entry of the plan is exactly 0: the zero-out of every unit ran at the last
        ``step()`` (or ``zero_pruned()``) and no parameter was written since (same storage — else the plan was
        rebuilt — and same autograd version counters). Then ``R = W_P Wᵀ = 0`` and every term and gradient is
        exactly 0, for finite weights. Writes that bypass the version counter (``.data``, NumPy,
        ``inference_mode``) between ``step()`` and the next call are not seen."""
        versions = self._zeroed_versions
        return versions is not None and versions == [p._version for p in self._params]

    def _mark_zeroed(self) -> None:
        self._zeroed_versions = [p._version for p in self._params]

    def penalty(self) -> Tensor:
        """``E − L_cls`` (module docstring) at the current strength: a differentiable scalar. Frozen parameters
        (``requires_grad=False``) have no term.

        Under ``torch.compile`` the plan built by the last eager call (or at construction) is used as it is and
        the strength is read from its device scalar, so the compiled code depends on neither (no recompilation as
        r grows); after moving the model, call ``penalty()`` or ``apply_gradients()`` once eagerly."""
        if self._units and torch.compiler.is_compiling():
            return self._compiled_plan().penalty(self._strength_t)
        plan = self._plan() if self._units else None
        if plan is None or self._skip():
            params = self._params or list(self.model.parameters())
            return torch.zeros((), dtype=reference.accumulation_dtype(params[0].dtype), device=params[0].device)
        return plan.penalty(self._strength_t)

    @torch.no_grad()
    def apply_gradients(self) -> None:
        """Add ∂penalty()/∂θ into ``.grad`` in place (creating zero grads where missing), without autograd; frozen
        parameters (``requires_grad=False``) get none.

        With the Triton backend, two launches per weight dtype; none once every pruned entry is provably 0 (all
        units zeroed by the last ``step()``, no parameter written since). Capturable in a CUDA graph after one eager
        call (keep ``.grad`` allocated: ``zero_grad(set_to_none=False)``; the strength is read on the device, so
        the replays follow ``step()``)."""
        plan = self._plan() if self._units else None
        if plan is None:
            return
        if not self._skip():
            plan.add_grads_(self._strength_t)
        elif self.strength != 0:  # provably zero: the grads it would have created, and nothing else
            for p in self._plan_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    @torch.no_grad()
    def _zero(self, unit: _Unit) -> None:
        for slot in unit.slots:
            view, dim = slot.indexed(slot.param)
            view.index_fill_(dim, unit.pruned, 0)

    @torch.no_grad()
    def zero_pruned(self) -> float:
        """Set every pruned W, b, γ, β (and carrier rows) to 0 now, as the zero-out does — frozen parameters too:
        their pruned entries are removed by :meth:`prune` either way; returns the largest magnitude that was cleared
        (0.0 when the schedule's zero-out had already done it)."""
        cleared = 0.0
        if not self._units:
            return cleared
        self._plan()  # indices on the parameters' device
        for unit in self._units:
            for slot in unit.slots:
                view, dim = slot.indexed(slot.param)
                rows = view.index_select(dim, unit.pruned)
                if rows.numel():
                    cleared = max(cleared, float(rows.abs().max()))
            self._zero(unit)
        self._mark_zeroed()
        return cleared

    @torch.no_grad()
    def step(self) -> None:
        """Mark one training iteration done: zero the pruned W, b, γ, β of every unit whose zero-out is due
        (see :class:`GrowingSchedule`; frozen parameters too), then advance the schedule."""
        t = self.iteration
        if self._units and t < self.schedule.stabilize_start:
            self._check_model()
        elif self._units:
            self._plan()  # checks the model; indices on the parameters' device
            due = [self.schedule.zero_out_due(t, unit.index) for unit in self._units]
            for unit, zero in zip(self._units, due):
                if zero:
                    self._zero(unit)
            if all(due):
                self._mark_zeroed()
        self.iteration = t + 1
        self._sync_strength()

    def prune(self) -> nn.Module:
        """The model with the pruned filters physically removed: a new module, ``self.model`` is not modified.

        Same as ``prune_model(self.model, self.pruned, graph=self.graph)`` (:mod:`tpp.surgery`). Zeroing the pruned
        W, b, γ, β first would change nothing: every one of those entries is removed. Refused when a module of the
        model was replaced since the regularizer was built (its graph would describe another model).
        """
        from .surgery import prune_model

        self._check_model()
        now = dict(self.model.named_modules())
        for name, module in self._modules_at_build.items():
            if now.get(name) is not module:
                raise RuntimeError(f"module model.{name} was replaced or removed after the TPPRegularizer was "
                                   "built: its graph describes the old model; build a new TPPRegularizer for the "
                                   "changed model")
        small = prune_model(self.model, self.pruned, graph=self.graph)
        inexact = self.inexact
        if inexact:
            device = self._params[0].device  # the input given at construction may live elsewhere
            x = tuple(a.to(device) if isinstance(a, Tensor) else a for a in self.example_input) \
                if isinstance(self.example_input, tuple) else self.example_input.to(device)
            with self._zeroed_now():
                self.removal_deviation = output_deviation(self.model, small, x)
            _log.warning("removing %s (%s) changes the model's output on example_input: max |Δ| %.4g, %.3g of "
                         "max |output|", ", ".join(inexact), self.graph.unit_of(inexact[0]).inexact,
                         self.removal_deviation["max_abs"], self.removal_deviation["relative"])
        return small

    @contextmanager
    def _zeroed_now(self):
        """The model with every pruned entry zeroed (as after the zero-out), restored afterwards."""
        with torch.no_grad():
            saved = [(view, dim, unit.pruned, view.index_select(dim, unit.pruned))
                     for unit in self._units for view, dim in (s.indexed(s.param) for s in unit.slots)]
            for unit in self._units:
                self._zero(unit)
        try:
            yield
        finally:
            with torch.no_grad():
                for view, dim, rows, values in saved:
                    view.index_copy_(dim, rows, values)

    # ------------------------------------------------------------------- state
    def _config(self) -> dict:
        return {"variant": self.variant, "gram_weight": self.gram_weight, "reduction": self.reduction,
                "bn": self.bn, "weight_l2": self.weight_l2}

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: iteration, pruned sets, hand-set strength, schedule and config."""
        return {"version": STATE_VERSION, "iteration": self.iteration, "strength_override": self._strength_override,
                "pruned": self.pruned, "schedule": self.schedule.state_dict(), "config": self._config()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict()``; the schedule and configuration must match this regularizer's. All or
        nothing: on any error the regularizer is left as it was."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a TPPRegularizer state_dict (a mapping), got {type(state).__name__}")
        missing = {"version", "iteration", "strength_override", "pruned", "schedule", "config"} - set(state)
        if missing:
            raise ValueError(f"not a TPPRegularizer state_dict: missing {sorted(missing)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"unsupported TPPRegularizer state version {state['version']} (expected {STATE_VERSION})")
        for what, mine in (("schedule", self.schedule.state_dict()), ("config", self._config())):
            saved = state[what]
            if not isinstance(saved, Mapping):
                raise ValueError(f"state_dict {what} must be a mapping, got {type(saved).__name__}")
            diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
            if diff:
                raise ValueError(f"state_dict {what} differs from this regularizer's (saved, current): {diff}")
        iteration = state["iteration"]
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"state_dict iteration must be an integer >= 0, got {iteration!r}")
        _check_strength(state["strength_override"], "state_dict strength_override")
        pruned = state["pruned"]
        if not isinstance(pruned, Mapping) or not all(isinstance(i, Tensor) for i in pruned.values()):
            raise ValueError("state_dict pruned must map layer names to index tensors")
        before = dict(vars(self))
        try:
            self._bind(pruned)
            self.iteration = iteration
            self.strength = state["strength_override"]
        except BaseException:
            vars(self).clear()
            vars(self).update(before)
            raise


def _channel_slot(param: nn.Parameter, dim: int) -> Slot:
    """A parameter producing channels in dim ``dim`` (``Unit.parameters``: a class token, a position embedding, a
    layer scale) as an ``"l2"`` slot, like a bias."""
    shape = param.shape
    dim %= len(shape)
    return Slot(param, "l2") if dim == 0 else Slot(param, "l2", math.prod(shape[:dim]), math.prod(shape[dim + 1:]))


def _check_strength(value, what: str = "strength") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value < 0):
        raise ValueError(f"{what} must be a finite number >= 0 or None, got {value!r}")
