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

import math
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from . import reference
from .backends import resolve_backend
from .graph import ModelGraph, analyze_model
from .schedule import GrowingSchedule
from .selection import RatioSpec, select_filters

__all__ = ["TPPRegularizer"]

STATE_VERSION = 1


@dataclass(frozen=True)
class _Layer:
    name: str
    index: int                       # execution order among all Conv2d/Linear layers (zero-out timing)
    module: nn.Module                # the Conv2d/Linear
    depthwise: tuple[nn.Module, ...]  # depthwise convs carrying its output channels on (MobileNet-style)
    bns: tuple[nn.Module, ...]       # affine BatchNorms normalizing those channels: its own, then the carriers'
    pruned: Tensor                   # sorted int64 indices on the module's device

    def own_params(self) -> list[Tensor]:
        """Weights and biases of the pruned filters (and their depthwise carriers): the L2 term's parameters."""
        return [p for m in (self.module, *self.depthwise) for p in (m.weight, m.bias) if p is not None]

    def all_params(self) -> list[Tensor]:
        """Everything indexed by the pruned channels, zeroed by the zero-out: own params, then BN γ and β."""
        return self.own_params() + [p for bn in self.bns for p in (bn.weight, bn.bias) if p is not None]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP/DataParallel (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _grad_of(param: Tensor) -> Tensor:
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


class TPPRegularizer:
    """Trainability Preserving Pruning regularizer for ``model``.

    Filters are chosen once, at construction, by :func:`tpp.select_filters` (L1, smallest first) and kept in
    ``self.pruned``. Use it in an ordinary training loop, one ``step()`` per optimizer step::

        loss = criterion(model(x), y) + reg.penalty()        # autograd path, or:
        loss.backward(); reg.apply_gradients()               # in-place path (same gradients, no graph)
        optimizer.step(); reg.step()                         # schedule + layer-wise zero-out

    Use either ``penalty()`` in the loss or ``apply_gradients()`` after ``backward()``, not both.

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
        graph: an existing :func:`tpp.graph.analyze_model` of ``model`` (not traced again).
    """

    def __init__(self, model: nn.Module, pruning_ratio: RatioSpec, skip: str | Iterable[str] = (),
                 variant: str = "decorrelate", gram_weight: float = 1000.0, reduction: str = "mean",
                 bn: bool = True, weight_l2: bool = True, schedule: GrowingSchedule | None = None,
                 backend: str = "auto", *, bn_map: Mapping[str, str | None] | None = None,
                 graph: ModelGraph | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
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
        self.graph = analyze_model(self.model, bn_map=bn_map) if graph is None else graph
        params = list(self.model.parameters())
        if not params:
            raise ValueError("model has no parameters to regularize")
        self.backend = resolve_backend(backend, params[0].device)
        self.iteration = 0
        self._strength_override: float | None = None
        self._bind(select_filters(self.model, pruning_ratio, skip, graph=self.graph))

    # ------------------------------------------------------------------ layers
    def _bind(self, pruned: Mapping[str, Tensor]) -> None:
        """Attach pruned index sets to the model's modules (execution order) and check the zero-out timing."""
        modules = dict(self.model.named_modules())
        layers = []
        for name, idx in pruned.items():
            info = self.graph.layers.get(name)
            if info is None:
                raise ValueError(f"pruned layer {name!r} is not a Conv2d/Linear layer of this model")
            module = modules[name]
            reference.check_pruned_indices(idx, module.weight.shape[0], f"pruned indices of layer {name!r}")
            if idx.numel() == 0:
                continue
            if not info.independent:
                raise ValueError(f"layer {name!r} cannot be pruned on its own: {info.coupling}")
            carried = [modules[use.module] for use in info.uses if use.role in ("bn", "depthwise")]
            depthwise = tuple(m for m in carried if isinstance(m, nn.Conv2d))
            bns = tuple(m for m in carried if not isinstance(m, nn.Conv2d) and m.weight is not None)
            idx = idx.to(torch.int64).sort().values
            layers.append(_Layer(name, info.index, module, depthwise, bns, idx.to(module.weight.device)))
        layers.sort(key=lambda layer: layer.index)
        self.pruned = {layer.name: layer.pruned.cpu() for layer in layers}
        self._layers = layers
        if layers:
            needed = self.schedule.zero_out_interval * (layers[-1].index + 1)
            if self.schedule.stabilize_iters < needed:
                raise ValueError(
                    f"schedule.stabilize_iters ({self.schedule.stabilize_iters}) is shorter than the layer-wise "
                    f"zero-out needs: zero_out_interval × (execution index of the last pruned layer "
                    f"{layers[-1].name!r} + 1) = {needed}. Lengthen stabilize_iters or shorten zero_out_interval.")

    def _indices(self) -> list[Tensor]:
        """Pruned index tensors, following the parameters if the model was moved to another device."""
        moved = False
        for i, layer in enumerate(self._layers):
            if layer.pruned.device != layer.module.weight.device:
                self._layers[i] = replace(layer, pruned=layer.pruned.to(layer.module.weight.device))
                moved = True
        if moved:
            self.backend = resolve_backend(self.backend.name, self._layers[0].module.weight.device)
        return [layer.pruned for layer in self._layers]

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
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"strength must be a finite number >= 0 or None, got {value!r}")
        self._strength_override = None if value is None else float(value)

    @property
    def phase(self) -> str:
        """``"grow"`` | ``"stabilize"`` | ``"done"`` at the current iteration."""
        return self.schedule.phase(self.iteration)

    # ------------------------------------------------------------------- terms
    def penalty(self) -> Tensor:
        """``E − L_cls`` (module docstring) at the current strength: a differentiable scalar."""
        r = self.strength
        if not self._layers:
            return torch.zeros((), device=next(self.model.parameters()).device)
        idx = self._indices()
        weights = [layer.module.weight for layer in self._layers]
        total = torch.zeros((), dtype=reference.accumulation_dtype(weights[0].dtype), device=weights[0].device)
        if r == 0:
            return total
        if self.gram_weight:
            gram = self.backend.gram_penalty(weights, idx, self.variant, self.reduction)
            total = total + (r * self.gram_weight) * gram
        if self.weight_l2:
            squares = [self._rows(p, i).square().sum() for layer, i in zip(self._layers, idx)
                       for p in layer.own_params()]
            total = total + (r / 2) * torch.stack(squares).sum()
        gammas, betas, bn_idx = self._bn_lists(idx)
        if self.bn and gammas:
            total = total + (r / 2) * self.backend.bn_penalty(gammas, betas, bn_idx)
        return total

    def _bn_lists(self, idx: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """γ, β and pruned indices of every affine BatchNorm carrying pruned channels."""
        pairs = [(bn, i) for layer, i in zip(self._layers, idx) for bn in layer.bns]
        return [bn.weight for bn, _ in pairs], [bn.bias for bn, _ in pairs], [i for _, i in pairs]

    @staticmethod
    def _rows(param: Tensor, idx: Tensor) -> Tensor:
        rows = param.index_select(0, idx)
        return rows.to(reference.accumulation_dtype(rows.dtype))

    @torch.no_grad()
    def apply_gradients(self) -> None:
        """Add ∂penalty()/∂θ into ``.grad`` in place (creating zero grads where missing), without autograd."""
        r = self.strength
        if r == 0 or not self._layers:
            return
        idx = self._indices()
        weights = [layer.module.weight for layer in self._layers]
        if self.gram_weight:
            self.backend.add_gram_grad_(weights, [_grad_of(w) for w in weights], idx, r * self.gram_weight,
                                        self.variant, self.reduction)
        if self.weight_l2:
            for layer, i in zip(self._layers, idx):
                for p in layer.own_params():
                    _grad_of(p).index_add_(0, i, (self._rows(p, i) * r).to(p.dtype))
        gammas, betas, bn_idx = self._bn_lists(idx)
        if self.bn and gammas:
            self.backend.add_bn_grad_(gammas, betas, [_grad_of(g) for g in gammas], [_grad_of(b) for b in betas],
                                      bn_idx, r / 2)

    @torch.no_grad()
    def zero_pruned(self) -> float:
        """Set every pruned W, b, γ, β (and carrier rows) to 0 now, as the zero-out does; returns the largest
        magnitude that was cleared (0.0 when the schedule's zero-out had already done it)."""
        cleared = 0.0
        for layer, i in zip(self._layers, self._indices()):
            for p in layer.all_params():
                rows = p.index_select(0, i)
                if rows.numel():
                    cleared = max(cleared, float(rows.abs().max()))
                p.index_fill_(0, i, 0)
        return cleared

    @torch.no_grad()
    def step(self) -> None:
        """Mark one training iteration done: zero the pruned W, b, γ, β of every layer whose zero-out is due
        (see :class:`GrowingSchedule`), then advance the schedule."""
        t = self.iteration
        for layer, i in zip(self._layers, self._indices()):
            if self.schedule.zero_out_due(t, layer.index):
                for p in layer.all_params():
                    p.index_fill_(0, i, 0)
        self.iteration = t + 1

    def prune(self) -> nn.Module:
        """The model with the pruned filters physically removed: a new module, ``self.model`` is not modified.

        Same as ``prune_model(self.model, self.pruned, graph=self.graph)`` (:mod:`tpp.surgery`). Zeroing the pruned
        W, b, γ, β first would change nothing: every one of those entries is removed.
        """
        from .surgery import prune_model

        return prune_model(self.model, self.pruned, graph=self.graph)

    # ------------------------------------------------------------------- state
    def _config(self) -> dict:
        return {"variant": self.variant, "gram_weight": self.gram_weight, "reduction": self.reduction,
                "bn": self.bn, "weight_l2": self.weight_l2}

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: iteration, pruned sets, hand-set strength, schedule and config."""
        return {"version": STATE_VERSION, "iteration": self.iteration, "strength_override": self._strength_override,
                "pruned": {n: i.clone() for n, i in self.pruned.items()},
                "schedule": self.schedule.state_dict(), "config": self._config()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict()``; the schedule and configuration must match this regularizer's."""
        missing = {"version", "iteration", "strength_override", "pruned", "schedule", "config"} - set(state)
        if missing:
            raise ValueError(f"not a TPPRegularizer state_dict: missing {sorted(missing)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"unsupported TPPRegularizer state version {state['version']} (expected {STATE_VERSION})")
        for what, mine in (("schedule", self.schedule.state_dict()), ("config", self._config())):
            diff = {k: (state[what].get(k), v) for k, v in mine.items() if state[what].get(k) != v}
            if diff:
                raise ValueError(f"state_dict {what} differs from this regularizer's (saved, current): {diff}")
        iteration = state["iteration"]
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"state_dict iteration must be an integer >= 0, got {iteration!r}")
        self._bind(state["pruned"])
        self.strength = state["strength_override"]
        self.iteration = iteration
