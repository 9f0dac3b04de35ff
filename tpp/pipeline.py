"""The pruning flow shared by the ``tpp`` command and the demo (tpp-method.md §4):

    measure → regularize (iteration-based) → stabilize and zero-out → remove → (transform) → finetune → measure

``run_pruning(model, train_loader, test_loader, method, ratio, ...)`` runs one method of :data:`tpp.baselines.METHODS`
on a (pretrained) model and returns a :class:`PruneResult`: the pruned, finetuned model, the pruned filter sets,
and the measurements — test accuracy of the model given, right before removal, right after removal (and after the
method's post-removal transform), after finetuning; mean Jacobian singular value (JSV, :mod:`tpp.metrics`) at the
same points; parameters and FLOPs before/after; strength, penalty and loss over the regularization iterations;
per-epoch finetuning accuracy; wall time per phase.

Phases:

1. **regularize** — methods with a regularizer run ``reg_iters`` iterations of SGD (lr ``reg_lr``, momentum, weight
   decay on all parameters; the reference run's pruning-phase optimizer) with ``apply_gradients()`` after each
   backward and ``step()`` after each optimizer step. For the growing-schedule methods ``reg_iters`` is
   ``schedule.total_iters`` (growth, then the stabilize phase with the layer-wise zero-out).
2. **zero-out** — growing-schedule methods set the pruned W, b, γ, β to exactly 0 once more (a no-op when the
   schedule's zero-out already did it; ``metrics["max_abs_pruned_before_zero"]`` records what was left), so that
   removal does not change the function.
3. **remove** — :func:`tpp.prune_model` on the filters chosen by L1 (at the start, or after regularization for
   KernOrth/OrthConv + L1), then the method's transform (OrthP, re-initialization for scratch).
4. **finetune** — a fresh SGD optimizer (lr ``finetune_lr``, momentum, weight decay), ×``lr_gamma`` at each epoch
   in ``lr_milestones``, no TPP regularizer (L1 + KernOrth/OrthConv add theirs here).

Guarded: every step's loss and gradients are watched on the device (:class:`tpp.guard.FiniteGuard`, no host sync per
step) and checked at each log record, checkpoint and epoch end, together with the weights: a non-finite loss,
penalty, gradient or weight raises :class:`tpp.guard.NonFiniteError` naming the first bad iteration and the last
good checkpoint, before anything computed from it is saved (the last good checkpoint is never replaced by it).

The settings of a run are one typed, frozen :class:`RunConfig` (``RunConfig.from_recipe`` for a
:class:`tpp.recipes.Recipe`); the model is traced with torch.fx once per run (``graph=``, or here) and the ratio spec
resolved to per-layer ratios once, then handed to the regularizer, the selection and the removal. The loop itself is
:mod:`tpp.loop`; recipes are :mod:`tpp.recipes`; the checkpoint identity is :mod:`tpp.identity`.

(About 520 lines: the run's stages and the checkpointed state they resume from are one class, kept together.)

Every device-, process- and precision-specific action of the loops goes through a :class:`TrainHooks` object
(``hooks=`` of :func:`run_pruning` and :func:`train`): placing and wrapping the model, the data order of each pass,
one optimization step, evaluation, agreement checks and checkpoint files. The default hooks are plain
single-process training; :mod:`tpp.train` supplies DDP, AMP, channels_last, distributed samplers and managed
checkpoints through the same loops.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .baselines import Method, OrthRegularizer, get_method, make_regularizer, orthogonalize_, reinitialize_
from .graph import ModelGraph, analyze_model
from .guard import FiniteGuard
from .identity import RUN_CHECKPOINT_VERSION, RunIdentity, model_signature, skip_patterns
from .loop import (
    DEFAULT_HOOKS,
    LR_SCHEDULES,
    Progress,
    TrainHooks,
    device_of,
    evaluate,
    first_samples,
    make_lr_scheduler,
    sgd,
    train,
)
from .metrics import count_flops, count_params, jacobian_singular_values, jsv_summary, measure_latency, output_deviation
from .recipes import RECIPES, Recipe, default_recipe
from .schedule import GrowingSchedule
from .selection import RatioSpec, layer_ratios, select_filters

_log = logging.getLogger(__name__)

__all__ = ["RunConfig", "PruneResult", "run_pruning", "Recipe", "RECIPES", "default_recipe", "train", "evaluate",
           "model_signature", "RUN_CHECKPOINT_VERSION", "TrainHooks", "LR_SCHEDULES"]


# ------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RunConfig:
    """Every setting of one :func:`run_pruning` call, checked at construction (``ValueError``/``TypeError``).

    ``reg_iters`` is resolved here: ``schedule.total_iters`` for the growing-schedule methods (any other value is
    refused), the same by default for KernOrth/OrthConv + L1, 0 for the methods without a regularizer.
    ``arch``/``num_classes`` name the model in the run's identity (checked on resume), ``caller_settings`` the
    caller's settings outside this config that change the result (the command's global batch, dataset, image size,
    AMP, label smoothing), compared on resume with the result-changing fields here
    (:func:`tpp.identity.run_settings`); ``latency`` measures the forward time of the unpruned and the pruned model
    (batch of ``latency_batch`` test samples).
    """

    method: str
    ratio: RatioSpec
    skip: tuple[str, ...] = ()
    schedule: GrowingSchedule = field(default_factory=GrowingSchedule)
    reg_iters: Optional[int] = None
    reg_lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    finetune_epochs: int = 120
    finetune_lr: float = 1e-2
    lr_milestones: tuple[int, ...] = (60, 90)
    lr_gamma: float = 0.1
    lr_schedule: str = "step"
    orth_weight: Optional[float] = None
    jsv_samples: int = 64
    log_every: Optional[int] = None
    seed: Optional[int] = None
    backend: str = "auto"
    bn_map: Optional[Mapping[str, Optional[str]]] = None
    allow_inexact: bool = False
    checkpoint_every: Optional[int] = None
    finetune_checkpoint_every: Optional[int] = None
    arch: Optional[str] = None
    num_classes: Optional[int] = None
    caller_settings: Mapping[str, Any] = field(default_factory=dict)
    latency: bool = True
    latency_batch: int = 1

    def __post_init__(self):
        method = get_method(self.method)
        set_ = object.__setattr__
        set_(self, "method", method.name)
        set_(self, "skip", skip_patterns(self.skip))
        set_(self, "lr_milestones", tuple(self.lr_milestones))
        if not isinstance(self.schedule, GrowingSchedule):
            raise TypeError(f"schedule must be a GrowingSchedule, got {type(self.schedule).__name__}")
        total = self.schedule.total_iters
        if method.regularizer == "tpp":
            if self.reg_iters is not None and self.reg_iters != total:
                raise ValueError(f"method {method.name!r} regularizes for schedule.total_iters = {total} "
                                 f"iterations; got reg_iters={self.reg_iters} (change the schedule instead)")
            set_(self, "reg_iters", total)
        elif method.regularizer is not None:
            set_(self, "reg_iters", total if self.reg_iters is None else self.reg_iters)
        else:
            set_(self, "reg_iters", 0)
        for name in ("reg_iters", "finetune_epochs", "jsv_samples", "latency_batch"):
            _check_count(getattr(self, name), name)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        for name in ("reg_lr", "finetune_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        set_(self, "log_every", self.log_every or max(1, self.reg_iters // 200))

    @classmethod
    def from_recipe(cls, recipe: Recipe, **overrides) -> "RunConfig":
        """The run settings of ``recipe`` (method, ratio, skip, schedule, optimization), ``overrides`` on top."""
        values = {"method": recipe.method, "ratio": recipe.ratio, "skip": recipe.skip, "arch": recipe.model or None,
                  **recipe.run_kwargs(), **overrides}
        return cls(**values)

    @property
    def method_spec(self) -> Method:
        return get_method(self.method)

    def to_dict(self) -> dict:
        """The JSON-serializable record of the settings (``PruneResult.config``)."""
        method = self.method_spec
        ratio = self.ratio
        return {
            "method": method.name, "method_description": method.description,
            "ratio": dict(ratio) if isinstance(ratio, Mapping) else ratio, "skip": list(self.skip),
            "schedule": self.schedule.state_dict(), "reg_iters": self.reg_iters, "reg_lr": self.reg_lr,
            "momentum": self.momentum, "weight_decay": self.weight_decay, "finetune_epochs": self.finetune_epochs,
            "finetune_lr": self.finetune_lr, "lr_milestones": list(self.lr_milestones), "lr_gamma": self.lr_gamma,
            "orth_weight": self.orth_weight, "jsv_samples": self.jsv_samples, "seed": self.seed,
            "backend": self.backend, "lr_schedule": self.lr_schedule, "allow_inexact": self.allow_inexact,
        }


def _check_count(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


# ------------------------------------------------------------------------------------------------- results
@dataclass
class PruneResult:
    """What :func:`run_pruning` returns. ``to_dict()`` is the JSON-serializable part (no model)."""

    method: str
    model: nn.Module
    pruned: dict[str, Tensor]
    metrics: dict
    history: dict
    config: dict

    def to_dict(self) -> dict:
        return {"method": self.method, "config": self.config, "metrics": self.metrics, "history": self.history,
                "pruned": {name: idx.tolist() for name, idx in self.pruned.items()}}


# ------------------------------------------------------------------------------------------------ pipeline
def run_pruning(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    method: Union[str, Method, None] = None,
    ratio: Optional[RatioSpec] = None,
    *,
    config: Optional[RunConfig] = None,
    device: Union[str, torch.device, None] = None,
    progress: Optional[Progress] = None,
    inplace: bool = False,
    checkpoint: Union[str, os.PathLike, None] = None,
    resume: Union[str, os.PathLike, Mapping, None] = None,
    hooks: Optional[TrainHooks] = None,
    graph: Optional[ModelGraph] = None,
    **settings: Any,
) -> PruneResult:
    """Prune ``model`` with ``method`` at ``ratio`` (a float, ``"pattern:ratio,..."`` or dict) and finetune it.

    The settings are a :class:`RunConfig`: pass ``config=``, or ``method``, ``ratio`` and its other fields as
    keyword arguments (``skip``, ``schedule``, ``reg_iters``, ``reg_lr``, ``momentum``, ``weight_decay``,
    ``finetune_epochs``, ``finetune_lr``, ``lr_milestones``, ``lr_gamma``, ``lr_schedule``, ``orth_weight``,
    ``jsv_samples``, ``log_every``, ``seed``, ``backend``, ``bn_map``, ``allow_inexact``, ``checkpoint_every``,
    ``finetune_checkpoint_every``, ...); unknown keywords raise ``TypeError``.

    Args:
        model: the network to prune, normally pretrained; copied unless ``inplace``.
        train_loader, test_loader: iterables of ``(inputs, labels)`` batches.
        device: where to run (default: the model's device).
        progress: ``progress(phase, done, total, info)``, called every iteration of "regularize", "finetune".
        checkpoint: where the hooks write a resumable checkpoint — after the base measurements, every
            ``checkpoint_every`` regularization iterations (default: 10 per run), after removal and after every
            finetuning epoch (atomically, replacing the previous one).
        resume: such a checkpoint (path or loaded dict) to continue from; ``model`` must be the same architecture
            (unpruned), and method/ratio/skip and the settings that change the result the same
            (:class:`tpp.identity.RunIdentity`). The data position is
            restored: the interrupted pass continues without the batches it had already used.
        hooks: a :class:`TrainHooks` doing the device/process-specific steps (default: single process, as is).
        graph: :func:`tpp.analyze_model` of ``model``, when the caller has it (traced here otherwise, once).

    Returns a :class:`PruneResult`. Raises ``ValueError`` for an unknown method, a bad ratio spec, or a checkpoint
    that does not match or is corrupted; :class:`tpp.guard.NonFiniteError` when training produces a non-finite
    loss, penalty, gradient or weight.
    """
    if config is None:
        config = RunConfig(method=method, ratio=ratio, **settings)
    elif method is not None or ratio is not None or settings:
        raise TypeError("run_pruning: pass either config= or method, ratio and settings, not both")
    return _Run(config, model, train_loader, test_loader, device=device, progress=progress, inplace=inplace,
                checkpoint=checkpoint, resume=resume, hooks=hooks, graph=graph).run()


def _jsv(model: nn.Module, inputs: Optional[Tensor]) -> Optional[dict]:
    if inputs is None:
        return None
    return jsv_summary(jacobian_singular_values(model, inputs))


class _Run:
    """State of one run_pruning call: stages "base" → "regularize" → "remove" → "finetune" → "done"."""

    def __init__(self, cfg: RunConfig, model: nn.Module, train_loader: Iterable, test_loader: Iterable, *, device,
                 progress: Optional[Progress], inplace: bool, checkpoint, resume, hooks: Optional[TrainHooks],
                 graph: Optional[ModelGraph]):
        self.cfg, self.method = cfg, cfg.method_spec
        self.train_loader, self.test_loader = train_loader, test_loader
        self.checkpoint, self.resume = checkpoint, resume
        self.hooks: TrainHooks = hooks or DEFAULT_HOOKS
        # traced once per run: the regularizer, the selection and the removal all use this graph
        self.graph = graph if graph is not None else analyze_model(model, bn_map=cfg.bn_map,
                                                                   allow_inexact=cfg.allow_inexact)
        self.ratios = layer_ratios(self.graph, cfg.ratio, cfg.skip)      # the spec, parsed once
        self.identity = RunIdentity.of_config(model, cfg)
        self.model = model if inplace else copy.deepcopy(model)
        self.device = torch.device(device) if device is not None else device_of(self.model)
        self.model = self.hooks.place(self.model, self.device)
        self.net = self.model                       # what the training steps run on (hooks.wrap(model))
        self.progress = progress
        self.stage, self.iteration, self.epoch = "base", 0, 0
        self.data_epoch, self.data_batch = 0, 0     # regularization: pass over the training data, batches used in it
        self.ft_batch, self.ft_running = 0, None    # finetuning: batches done in the current epoch, their loss sum
        self.window, self.window_seen = None, 0     # regularization: loss sum and count since the last history entry
        self.pruned: Optional[dict[str, Tensor]] = None
        self.reg = None
        self.optimizer, self.scheduler, self.ft_reg = None, None, None
        self.history: dict = {"regularize": [], "finetune": []}
        self.metrics: dict = {"accuracy": {}, "top5": {}, "loss": {}, "jsv_mean": {}, "jsv": {}, "time_s": {}}
        self.config = {**cfg.to_dict(), "device": str(self.device)}
        self.guard = FiniteGuard(self.device)       # non-finite loss/gradients: checked where the host reads anyway
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        self.jsv_inputs = self._samples(cfg.jsv_samples) if cfg.jsv_samples else None
        self.example = self._samples(1)

    def _samples(self, n: int) -> Tensor:
        """The first ``n`` test inputs as the model takes them (``hooks.inputs``: device, normalization, format)."""
        return self.hooks.inputs(first_samples(self.test_loader, n), torch.zeros(0, dtype=torch.long), self.device)[0]

    # ------------------------------------------------------------------ checkpoints
    def _save(self, event: str) -> None:
        """Write the run state (after checking it is finite: a non-finite run never replaces the last good file)."""
        path = self.checkpoint
        if path is None:
            return
        self.hooks.sync(self.model)
        self._check_finite()
        running = self.ft_running or {}
        state = {
            "version": RUN_CHECKPOINT_VERSION, "stage": self.stage, "iteration": self.iteration, "epoch": self.epoch,
            **self.identity.to_state(), "model": self.model.state_dict(),
            "pruned": self.pruned, "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "regularizer": self.reg.state_dict() if self.reg is not None else None,
            "history": self.history, "metrics": self.metrics, "rng": torch.get_rng_state(),
            "data": {"epoch": self.data_epoch, "batch": self.data_batch},
            "loss_window": {"sum": float(self.hooks.mean(self.window)) if self.window is not None else 0.0,
                            "seen": self.window_seen},
            "finetune_position": {"batch": self.ft_batch, "loss_sum": float(running.get("loss_sum", 0.0)),
                                  "seen": int(running.get("seen", 0))},
            "hooks": self.hooks.state_dict(),
        }
        written = self.hooks.save(state, Path(path), event)
        position = f"iteration {self.iteration}" if self.stage == "regularize" else \
            f"epoch {self.epoch}" + (f", batch {self.ft_batch}" if self.ft_batch else "")
        self.guard.last_good = f"{written or path} (stage {self.stage}, {position})"

    def _check_finite(self) -> None:
        self.guard.check(self.stage, self.hooks, self.model, self.iteration if self.stage == "regularize" else None)

    def _restore(self, state) -> None:
        if not isinstance(state, Mapping):
            path = Path(state)
            if not path.is_file():
                raise FileNotFoundError(f"resume checkpoint {path} does not exist")
            state = self.hooks.load(path)
        self.identity.check(state, "the resume checkpoint")
        self.stage, self.iteration, self.epoch = state["stage"], state["iteration"], state["epoch"]
        self.history, self.metrics = state["history"], state["metrics"]
        self.metrics.setdefault("top5", {})
        data = state.get("data") or {}
        self.data_epoch, self.data_batch = int(data.get("epoch", 0)), int(data.get("batch", 0))
        window = state.get("loss_window") or {}
        self.window_seen = int(window.get("seen", 0))
        self.window = torch.tensor(float(window.get("sum", 0.0)), dtype=torch.float64, device=self.device) \
            if self.window_seen else None
        position = state.get("finetune_position") or {}
        self.ft_batch = int(position.get("batch", 0))
        self.ft_running = {"loss_sum": position.get("loss_sum", 0.0), "seen": position.get("seen", 0)} \
            if self.ft_batch else None
        torch.set_rng_state(state["rng"])
        if state["pruned"] is not None:
            from .surgery import prune_model

            self.pruned = {k: v for k, v in state["pruned"].items()}
            self.model = prune_model(self.model, self.pruned, graph=self.graph)
        self.model.load_state_dict(state["model"])
        self.model = self.hooks.place(self.model, self.device)
        self.net = self.model
        if self.stage == "regularize":
            self._make_reg_optimizer()
            if state["regularizer"] is not None:
                self.reg.load_state_dict(state["regularizer"])
            self.optimizer.load_state_dict(state["optimizer"])
        elif self.stage == "finetune":
            self._make_finetune_optimizer()
            if state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
        self.hooks.load_state_dict(state.get("hooks") or {})

    # ----------------------------------------------------------------------- stages
    def run(self) -> PruneResult:
        start = time.perf_counter()
        if self.resume is not None:
            self._restore(self.resume)
        if self.stage == "base":
            self._measure("base", self.model)
            self.metrics["params"] = {"base": count_params(self.model)}
            self.metrics["flops"] = {"base": count_flops(self.model, self.example)}
            self._latency("base")
            self.stage = "regularize"
            self._make_reg_optimizer()
            self._save("start")
        if self.stage == "regularize":
            t0 = time.perf_counter()
            self._regularize()
            self._add_time("regularize", time.perf_counter() - t0)
            self.stage = "remove"
        if self.stage == "remove":
            t0 = time.perf_counter()
            self._remove()
            self._add_time("remove", time.perf_counter() - t0)
            self.stage = "finetune"
            self._make_finetune_optimizer()
            self._save("removed")
        if self.stage == "finetune":
            t0 = time.perf_counter()
            self._finetune()
            self._add_time("finetune", time.perf_counter() - t0)
            self.stage = "done"
            self._measure("final", self.model)
            accs = [r["test_acc"] for r in self.history["finetune"] if "test_acc" in r]
            self.metrics["accuracy"]["best"] = max(accs) if accs else self.metrics["accuracy"]["final"]
            self._save("done")
        self._add_time("total", time.perf_counter() - start)
        return PruneResult(self.method.name, self.model, self.pruned or {}, self.metrics, self.history, self.config)

    def _add_time(self, key: str, seconds: float) -> None:
        self.metrics["time_s"][key] = self.metrics["time_s"].get(key, 0.0) + seconds

    def _measure(self, when: str, model: nn.Module) -> None:
        result = self.hooks.evaluate(model, self.test_loader, self.device)
        self.metrics["accuracy"][when], self.metrics["loss"][when] = result["acc"], result["loss"]
        self.metrics["top5"][when] = result["top5"]
        summary = _jsv(model, self.jsv_inputs)
        self.metrics["jsv"][when] = summary
        self.metrics["jsv_mean"][when] = summary["mean"] if summary else None

    def _latency(self, when: str) -> None:
        """Median forward time of the model now (eval mode, ``latency_batch`` test samples, the run's autocast) on
        the run's device."""
        if not self.cfg.latency:
            return
        x = self._samples(self.cfg.latency_batch)
        latency = self.metrics.setdefault("latency_s", {"batch": int(x.shape[0]), "device": str(self.device)})
        with self.hooks.autocast():                 # as the run computes: AMP when it trains with AMP
            latency[when] = measure_latency(self.model, x, warmup=3, iters=20)
        if "base" in latency and "pruned" in latency:
            latency["speedup"] = latency["base"] / max(latency["pruned"], 1e-12)

    def _make_reg_optimizer(self) -> None:
        cfg = self.cfg
        if self.method.regularizer is None:
            self.reg, self.optimizer = None, None
            return
        tpp_options = {"backend": cfg.backend, "graph": self.graph, "example_input": self.example} \
            if self.method.regularizer == "tpp" else {}
        self.reg = make_regularizer(self.method, self.model, self.ratios, (), schedule=cfg.schedule,
                                    orth_weight=cfg.orth_weight, bn_map=cfg.bn_map, **tpp_options)
        self.hooks.agree("the filters selected for pruning", self.reg.pruned)
        self.net = self.hooks.wrap(self.model)
        self.optimizer = sgd(self.model, cfg.reg_lr, cfg.momentum, cfg.weight_decay)

    def _training_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless regularization batches; every pass over the loader is a new data epoch. ``data_epoch`` and
        ``data_batch`` (batches used in the current pass) always describe what has been handed out."""
        loader = self.train_loader
        while True:
            for batch in self.hooks.batches(loader, "regularize", self.data_epoch, self.data_batch):
                self.data_batch += 1
                yield batch
            if self.data_batch == 0:
                raise ValueError("the training loader yields no batches")
            self.data_epoch, self.data_batch = self.data_epoch + 1, 0

    def _regularize(self) -> None:
        cfg, hooks = self.cfg, self.hooks
        total, reg = cfg.reg_iters, self.reg
        if reg is None or self.iteration >= total:
            return
        every = cfg.checkpoint_every or max(1, total // 10)
        self.net.train()
        batches = self._training_batches()
        while self.iteration < total:
            x, y = hooks.inputs(*next(batches), self.device)
            strength = reg.strength
            loss = hooks.train_step(self.net, self.optimizer, x, y, reg)
            self.guard.watch(self.iteration + 1, loss, hooks.gradients(self.optimizer))
            reg.step()
            self.iteration += 1
            self.window = loss.double() if self.window is None else self.window + loss.double()
            self.window_seen += 1
            if self.iteration % cfg.log_every == 0 or self.iteration == total:
                self._check_finite()
                with torch.no_grad():
                    penalty = float(reg.penalty())
                if not math.isfinite(penalty):
                    raise self.guard.error("the penalty", f"after iteration {self.iteration}", "regularize",
                                           self.iteration)
                self.history["regularize"].append({
                    "iteration": self.iteration, "strength": strength, "penalty": penalty,
                    "loss": float(hooks.mean(self.window)) / self.window_seen, "phase": reg.phase})
                self.window, self.window_seen = None, 0
            if self.progress is not None:
                self.progress("regularize", self.iteration, total,
                              {"strength": strength, "loss": loss.item() if hooks.sync_loss else loss,
                               "phase": reg.phase})
            due = hooks.checkpoint_due()
            if (due or self.iteration % every == 0) and self.iteration < total:
                self._save("iteration")

    @torch.no_grad()
    def _remove(self) -> None:
        from .surgery import prune_model

        reg = self.reg
        self.hooks.sync(self.model)
        if self.method.regularizer == "tpp":
            self.pruned = dict(reg.pruned)
        else:
            self.pruned = select_filters(self.model, self.ratios, graph=self.graph)
        # no rank removes on its own: the filters and the weights they are removed from must agree everywhere
        self.hooks.agree("the pruned filters and the weights before removal",
                         {"pruned": self.pruned, "state": self.model.state_dict()})
        if self.method.zero_out:
            self.metrics["max_abs_pruned_before_zero"] = reg.zero_pruned()
        if self.method.regularizes:
            self._measure("before_removal", self.model)
        else:  # nothing changed since the base measurement
            for key in ("accuracy", "top5", "loss", "jsv", "jsv_mean"):
                if "base" in self.metrics[key]:
                    self.metrics[key]["before_removal"] = self.metrics[key]["base"]
        inexact = self.graph.inexact_in(self.pruned)
        before = copy.deepcopy(self.model) if inexact else None
        self.model = prune_model(self.model, self.pruned, inplace=True, graph=self.graph)
        self.model = self.hooks.place(self.model, self.device)
        if before is not None:  # LayerNorm-coupled channels (allow_inexact): what removal changed, on test images
            images = self._samples(8)
            self.metrics["removal_deviation"] = output_deviation(before, self.model, images)
            _log.warning("removal of %s (allow_inexact) changed the output on %d test images: max |Δ| %.4g, %.3g "
                         "of max |output|", ", ".join(inexact), images.shape[0],
                         self.metrics["removal_deviation"]["max_abs"], self.metrics["removal_deviation"]["relative"])
        if self.method.post_removal is not None:
            self._measure("removed_untransformed", self.model)
        if self.method.post_removal == "orthp":
            orthogonalize_(self.model)
        elif self.method.post_removal == "reinit":
            reinitialize_(self.model)
        self._measure("after_removal", self.model)
        self.metrics["params"]["pruned"] = count_params(self.model)
        self.metrics["flops"]["pruned"] = count_flops(self.model, self.example)
        self.metrics["params"]["ratio"] = self.metrics["params"]["pruned"] / self.metrics["params"]["base"]
        self.metrics["flops"]["speedup"] = self.metrics["flops"]["base"] / max(self.metrics["flops"]["pruned"], 1)
        self.metrics["params"]["reduction"] = self.metrics["params"]["base"] / max(self.metrics["params"]["pruned"], 1)
        self.metrics["pruned_filters"] = {name: int(idx.numel()) for name, idx in self.pruned.items()}
        self._latency("pruned")
        self.reg, self.optimizer, self.net = None, None, self.model

    def _make_finetune_optimizer(self) -> None:
        cfg = self.cfg
        self.net = self.hooks.wrap(self.model)
        self.optimizer = sgd(self.model, cfg.finetune_lr, cfg.momentum, cfg.weight_decay)
        self.scheduler = make_lr_scheduler(self.optimizer, cfg.lr_schedule, cfg.finetune_epochs, cfg.lr_milestones,
                                           cfg.lr_gamma)
        self.ft_reg = (OrthRegularizer(self.model, self.method.finetune_regularizer, cfg.orth_weight)
                       if self.method.finetune_regularizer else None)

    def _finetune(self) -> None:
        cfg = self.cfg
        every = cfg.finetune_checkpoint_every

        def on_iteration_end(epoch: int, batches: int, running: dict) -> None:
            due = self.hooks.checkpoint_due()
            if due or (every and batches % every == 0):
                self.ft_batch, self.ft_running = batches, running
                self._save("iteration")

        def on_epoch_end(epoch: int, history: list) -> None:
            self.epoch, self.ft_batch, self.ft_running = epoch, 0, None
            self._save("epoch")

        start_batch, running = self.ft_batch, self.ft_running
        train(self.model, self.train_loader, cfg.finetune_epochs, cfg.finetune_lr, test_loader=self.test_loader,
              device=self.device, progress=self.progress, phase="finetune", regularizer=self.ft_reg,
              optimizer=self.optimizer, scheduler=self.scheduler, start_epoch=self.epoch,
              on_epoch_end=on_epoch_end, history=self.history["finetune"], hooks=self.hooks, net=self.net,
              start_batch=start_batch, running=running, on_iteration_end=on_iteration_end, guard=self.guard)
