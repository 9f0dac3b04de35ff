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

``RECIPES`` holds the paper's settings (tpp-method.md §10) and the scaled-down demo recipe.

Every device-, process- and precision-specific action of the loops goes through a :class:`TrainHooks` object
(``hooks=`` of :func:`run_pruning` and :func:`train`): placing and wrapping the model, the data order of each pass,
one optimization step, evaluation, agreement checks and checkpoint files. The default hooks are plain
single-process training; :mod:`tpp.train` supplies DDP, AMP, channels_last, distributed samplers and managed
checkpoints through the same loops.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .baselines import Method, OrthRegularizer, get_method, make_regularizer, orthogonalize_, reinitialize_
from .files import atomic_save
from .metrics import count_flops, count_params, jacobian_singular_values, jsv_summary
from .schedule import GrowingSchedule
from .selection import RatioSpec, select_filters

__all__ = ["Recipe", "RECIPES", "default_recipe", "PruneResult", "run_pruning", "train", "evaluate",
           "model_signature", "CHECKPOINT_VERSION", "TrainHooks", "LR_SCHEDULES"]

Progress = Callable[[str, int, int, dict], None]
CHECKPOINT_VERSION = 1


# ------------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """Settings of one pruning run (and of the pretraining the demo/CLI do when no weights are given)."""

    name: str
    schedule: GrowingSchedule = field(default_factory=GrowingSchedule)
    reg_lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    finetune_epochs: int = 120
    finetune_lr: float = 1e-2
    lr_milestones: tuple[int, ...] = (60, 90)
    lr_gamma: float = 0.1
    pretrain_epochs: int = 0
    pretrain_lr: float = 0.1
    pretrain_milestones: tuple[int, ...] = ()
    description: str = ""

    def run_kwargs(self) -> dict:
        """The keyword arguments of :func:`run_pruning` this recipe sets."""
        return {"schedule": self.schedule, "reg_lr": self.reg_lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "finetune_epochs": self.finetune_epochs,
                "finetune_lr": self.finetune_lr, "lr_milestones": self.lr_milestones, "lr_gamma": self.lr_gamma}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.state_dict()
        return d


RECIPES: dict[str, Recipe] = {
    "cifar": Recipe(
        "cifar", GrowingSchedule(), weight_decay=5e-4, batch_size=128, finetune_epochs=120, lr_milestones=(60, 90),
        pretrain_lr=0.1, pretrain_milestones=(80, 120),
        description="paper, ResNet56/VGG19 on CIFAR: Δ=1e-4 every 10 iterations to 1, 10k stabilize iterations, "
                    "SGD lr 1e-3 momentum 0.9 wd 5e-4 bs 128 (VGG19: 256); finetune lr 1e-2 ×0.1 at 60, 90, 120 "
                    "epochs"),
    "imagenet": Recipe(
        "imagenet", GrowingSchedule.imagenet(), weight_decay=1e-4, batch_size=256, finetune_epochs=90,
        lr_milestones=(30, 60, 75), pretrain_lr=0.1, pretrain_milestones=(30, 60),
        description="paper, ResNet34/50 on ImageNet: Δ=1e-4 every 5 iterations to 1, 40k stabilize iterations, "
                    "SGD lr 1e-3 momentum 0.9 wd 1e-4 bs 256; finetune lr 1e-2 ×0.1 at 30, 60, 75, 90 epochs"),
    "demo": Recipe(
        "demo", GrowingSchedule(delta=0.0025, interval=1, ceiling=1.0, stabilize_iters=200, zero_out_interval=20),
        reg_lr=1e-2, weight_decay=5e-4, batch_size=64, finetune_epochs=10, finetune_lr=1e-2, lr_milestones=(5, 8),
        pretrain_epochs=30, pretrain_lr=0.05, pretrain_milestones=(20,),
        description="scaled down for the 8×8 digits on a CPU: Δ=0.0025 every iteration to 1 (400 iterations), "
                    "200 stabilize iterations (layers zeroed 20 apart), pruning-phase SGD lr 1e-2 (10× the paper, "
                    "for ~180× fewer iterations) momentum 0.9 wd 5e-4 bs 64; finetune 10 epochs lr 1e-2 ×0.1 at "
                    "5, 8; pretraining 30 epochs lr 0.05 ×0.1 at 20"),
}


def default_recipe(dataset: str, model: str = "") -> Recipe:
    """The recipe a dataset's runs default to: digits → demo, imagefolder → imagenet, the rest → cifar
    (batch 256 for VGG19, as in the paper)."""
    if dataset == "digits":
        return RECIPES["demo"]
    if dataset == "imagefolder":
        return RECIPES["imagenet"]
    recipe = RECIPES["cifar"]
    return replace(recipe, batch_size=256) if model == "vgg19" else recipe


# ----------------------------------------------------------------------------------------------- utilities
def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batches(loader: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in loader:
        yield batch[0], batch[1]


def _cycle(loader: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless batches; every pass over ``loader`` is a new epoch (reshuffled)."""
    while True:
        empty = True
        for batch in _batches(loader):
            empty = False
            yield batch
        if empty:
            raise ValueError("the training loader yields no batches")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: Optional[torch.device] = None) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``loader`` in eval mode (mode restored after)."""
    device = device or _device_of(model)
    was_training = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    try:
        for x, y in _batches(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            total += y.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the test loader yields no samples")
    return 100.0 * correct / total, loss / total


def _sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


LR_SCHEDULES = ("step", "cosine")


def _lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, milestones: Sequence[int],
                  gamma: float):
    """Per-epoch learning rate: ``"step"`` (×gamma at each milestone) or ``"cosine"`` (to 0 over ``epochs``)."""
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(epochs), 1))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


@torch.no_grad()
def _eval_counts(model: nn.Module, loader: Iterable, hooks: "TrainHooks", device: torch.device) -> Tensor:
    """``[samples, top-1 correct, top-5 correct, summed cross-entropy]`` (float64, on ``device``) of ``model`` in
    eval mode; one host sync at the end, none per batch."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    try:
        for x, y in _batches(loader):
            x, y = hooks.inputs(x, y, device)
            with hooks.autocast():
                out = model(x)
            out = out.float()
            k = min(5, out.shape[1])
            top = out.topk(k, dim=1).indices
            hit = top == y.unsqueeze(1)
            counts[0] += y.numel()                 # scalar operands: no host-to-device copies per batch
            counts[1] += hit[:, 0].sum()
            counts[2] += hit.any(dim=1).sum()
            counts[3] += F.cross_entropy(out, y, reduction="sum").double()
    finally:
        model.train(was_training)
    return counts


class TrainHooks:
    """What the loops of :func:`run_pruning` and :func:`train` do at each device-, process- or file-specific point.

    This default is plain single-process training (what the pipeline always did); :mod:`tpp.train.engine`
    overrides it for DDP (torchrun), AMP with a GradScaler, channels_last, per-epoch distributed samplers, evaluation
    all-reduced across ranks, agreement checks before removal and managed checkpoint folders. Every method is called
    on every rank at the same point of the run, so an override may use collectives.
    """

    #: pass ``loss.item()`` to ``progress`` every iteration (a host sync); ``False`` passes the detached tensor
    sync_loss: bool = True

    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Put ``model`` (the bare module) where it trains: device, memory format; make ranks agree on its weights."""
        return model.to(device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module forward/backward run on (DDP around ``model``); called again after removal."""
        return model

    def inputs(self, x: Tensor, y: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def autocast(self):
        """The autocast context of forward passes (training and evaluation)."""
        return _NullContext()

    def batches(self, loader: Iterable, phase: str, epoch: int, skip: int = 0) -> Iterable[tuple[Tensor, Tensor]]:
        """The batches of pass ``epoch`` (0-based, per phase) over ``loader``, without its first ``skip`` batches
        (a resumed pass); calls ``sampler.set_epoch(epoch)`` when the loader's sampler has it."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batches = _batches(loader)
        return itertools.islice(batches, skip, None) if skip else batches

    def train_step(self, net: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                   regularizer=None) -> Tensor:
        """One optimization step on ``(x, y)``: zero grads, forward, cross-entropy, backward, the regularizer's
        ``apply_gradients()``, ``optimizer.step()``. Returns the detached loss. (``regularizer.step()`` is the
        caller's.)"""
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        if regularizer is not None:
            regularizer.apply_gradients()
        optimizer.step()
        return loss.detach()

    def mean(self, value: Tensor) -> Tensor:
        """``value`` averaged over ranks (identity in one process)."""
        return value

    def sum(self, value: Tensor) -> Tensor:
        """``value`` summed over ranks (identity in one process)."""
        return value

    def sync(self, model: nn.Module) -> None:
        """Make every rank's copy of ``model`` identical (buffers, e.g. BN running statistics) before it is
        evaluated, saved or pruned."""

    def agree(self, what: str, value) -> None:
        """Raise unless ``value`` (tensors, dicts, lists, numbers, strings) is identical on every rank."""

    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device) -> dict:
        """``{"acc", "top5", "loss"}`` (%, %, mean cross-entropy) of ``model`` on ``loader``, over all ranks."""
        self.sync(model)
        n, top1, top5, loss = self.sum(_eval_counts(model, loader, self, device)).tolist()
        if n == 0:
            raise ValueError("the test loader yields no samples")
        return {"acc": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}

    def state_dict(self) -> dict:
        """Extra state saved in checkpoints (scaler, per-rank RNG states, ...)."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass

    def save(self, state: dict, path: Path, event: str) -> None:
        """Write checkpoint ``state`` to ``path`` (atomically: temporary file, then rename). ``event`` is
        ``"start"``, ``"iteration"``, ``"removed"``, ``"epoch"`` or ``"done"``."""
        atomic_save(state, path)

    def load(self, path: Path):
        return torch.load(path, map_location="cpu", weights_only=True)


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


DEFAULT_HOOKS = TrainHooks()


def train(model: nn.Module, train_loader: Iterable, epochs: int, lr: float, *, momentum: float = 0.9,
          weight_decay: float = 5e-4, milestones: Sequence[int] = (), gamma: float = 0.1,
          test_loader: Optional[Iterable] = None, device: Optional[torch.device] = None,
          progress: Optional[Progress] = None, phase: str = "train", regularizer=None,
          optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None, start_epoch: int = 0,
          on_epoch_end: Optional[Callable[[int, list], None]] = None, history: Optional[list] = None,
          hooks: Optional[TrainHooks] = None, net: Optional[nn.Module] = None, start_batch: int = 0,
          running: Optional[Mapping] = None,
          on_iteration_end: Optional[Callable[[int, int, dict], None]] = None) -> list[dict]:
    """Plain SGD training (cross-entropy) for ``epochs`` epochs with a step-decay learning rate; used for
    pretraining and finetuning. ``regularizer`` (anything with ``apply_gradients()``/``step()``) is applied every
    iteration. Returns per-epoch records ``{"epoch", "lr", "train_loss", "time_s", "test_acc"?, "test_top5"?,
    "test_loss"?}``.

    ``hooks`` (:class:`TrainHooks`) does the steps, data passes and evaluation; ``net`` is the module the steps run
    on (e.g. DDP around ``model``; default ``model``). ``start_epoch``/``start_batch``/``running`` resume inside an
    epoch: skip its first ``start_batch`` batches, with ``running = {"loss_sum", "seen"}`` of the batches done.
    ``on_iteration_end(epoch, batches_done, running)`` is called after every step (0-based epoch)."""
    hooks = hooks or DEFAULT_HOOKS
    net = model if net is None else net
    device = device or _device_of(model)
    optimizer = optimizer or _sgd(model, lr, momentum, weight_decay)
    scheduler = scheduler or torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)
    history = [] if history is None else history
    steps_per_epoch = _len_or_none(train_loader)
    for epoch in range(start_epoch, epochs):
        net.train()
        lr_now = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        skip = start_batch if epoch == start_epoch else 0
        resumed = running if (epoch == start_epoch and skip and running) else {}
        total_loss = torch.tensor(float(resumed.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
        seen = int(resumed.get("seen", 0))
        for i, (x, y) in enumerate(hooks.batches(train_loader, phase, epoch, skip), start=skip):
            x, y = hooks.inputs(x, y, device)
            loss = hooks.train_step(net, optimizer, x, y, regularizer)
            if regularizer is not None:
                regularizer.step()
            total_loss += loss.double() * y.numel()
            seen += y.numel()
            if progress is not None:
                progress(phase, epoch * (steps_per_epoch or 0) + i + 1, epochs * (steps_per_epoch or 0),
                         {"epoch": epoch + 1, "epochs": epochs, "loss": loss.item() if hooks.sync_loss else loss,
                          "lr": lr_now})
            if on_iteration_end is not None:
                on_iteration_end(epoch, i + 1, {"loss_sum": total_loss, "seen": seen})
        scheduler.step()
        loss_sum, count = hooks.sum(torch.stack([total_loss, torch.tensor(float(seen), dtype=torch.float64,
                                                                          device=device)])).tolist()
        record = {"epoch": epoch + 1, "lr": lr_now, "train_loss": loss_sum / max(count, 1),
                  "time_s": time.perf_counter() - t0}
        if test_loader is not None:
            result = hooks.evaluate(model, test_loader, device)
            record["test_acc"], record["test_top5"], record["test_loss"] = result["acc"], result["top5"], \
                result["loss"]
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history)
    return history


def _len_or_none(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


def _first_samples(loader: Iterable, n: int) -> Tensor:
    xs, count = [], 0
    for x, _ in _batches(loader):
        xs.append(x)
        count += x.shape[0]
        if count >= n:
            break
    if not xs:
        raise ValueError("the test loader yields no samples")
    return torch.cat(xs)[:n]


def _jsv(model: nn.Module, inputs: Optional[Tensor]) -> Optional[dict]:
    if inputs is None:
        return None
    return jsv_summary(jacobian_singular_values(model, inputs))


def model_signature(model: nn.Module) -> dict[str, list[int]]:
    """``{parameter/buffer name: shape}``: what a checkpoint for another architecture fails to match."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _check_signature(saved: Mapping[str, Sequence[int]], model: nn.Module, what: str) -> None:
    mine = model_signature(model)
    if set(saved) != set(mine):
        missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
        raise ValueError(f"{what} was written for another architecture: tensors missing from it: {missing[:5]}, "
                         f"tensors the model does not have: {extra[:5]}")
    for k, shape in mine.items():
        if list(saved[k]) != shape:
            raise ValueError(f"{what} was written for another architecture: {k!r} has shape {list(saved[k])} "
                             f"there and {shape} in the model")


def _ratio_key(ratio: RatioSpec) -> str:
    return json.dumps(ratio, sort_keys=True) if isinstance(ratio, Mapping) else repr(ratio)


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
    method: Union[str, Method],
    ratio: RatioSpec,
    *,
    skip: Union[str, Iterable[str]] = (),
    schedule: Optional[GrowingSchedule] = None,
    reg_iters: Optional[int] = None,
    reg_lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    finetune_epochs: int = 120,
    finetune_lr: float = 1e-2,
    lr_milestones: Sequence[int] = (60, 90),
    lr_gamma: float = 0.1,
    orth_weight: Optional[float] = None,
    device: Union[str, torch.device, None] = None,
    jsv_samples: int = 64,
    log_every: Optional[int] = None,
    progress: Optional[Progress] = None,
    seed: Optional[int] = None,
    inplace: bool = False,
    backend: str = "auto",
    bn_map: Optional[Mapping[str, Optional[str]]] = None,
    checkpoint: Union[str, os.PathLike, None] = None,
    checkpoint_every: Optional[int] = None,
    resume: Union[str, os.PathLike, Mapping, None] = None,
    hooks: Optional[TrainHooks] = None,
    lr_schedule: str = "step",
    finetune_checkpoint_every: Optional[int] = None,
) -> PruneResult:
    """Prune ``model`` with ``method`` at ``ratio`` (a float, ``"pattern:ratio,..."`` or dict) and finetune it.

    Args:
        model: the network to prune, normally pretrained; copied unless ``inplace``.
        train_loader, test_loader: iterables of ``(inputs, labels)`` batches.
        method: a name in :data:`tpp.baselines.METHODS` or a :class:`~tpp.baselines.Method`.
        skip: layer patterns never pruned.
        schedule: the growing schedule (default ``GrowingSchedule()``, the paper's CIFAR run).
        reg_iters: regularization iterations of KernOrth/OrthConv + L1 (default ``schedule.total_iters``); the
            growing-schedule methods always run ``schedule.total_iters``.
        reg_lr, momentum, weight_decay: pruning-phase SGD (paper: 1e-3, 0.9, 5e-4 CIFAR / 1e-4 ImageNet).
        finetune_epochs, finetune_lr, lr_milestones, lr_gamma: finetuning (fresh SGD, same momentum/weight decay).
        orth_weight: λ of KernOrth/OrthConv (default :data:`tpp.baselines.DEFAULT_ORTH_WEIGHTS`).
        device: where to run (default: the model's device).
        jsv_samples: test samples for the mean JSV (one backward per class each time); 0 skips JSVs.
        log_every: record strength/penalty/loss every this many iterations (default: ~200 points in all).
        progress: ``progress(phase, done, total, info)``, called every iteration of "regularize", "finetune".
        seed: seeds torch's RNG (initialization for scratch, dropout, ...); data order is the loaders' business.
        backend: TPPRegularizer backend. bn_map: for models torch.fx cannot trace.
        checkpoint: file to write a resumable checkpoint to — after the base measurements, every
            ``checkpoint_every`` regularization iterations (default: 10 per run), after removal and after every
            finetuning epoch (atomically, replacing the previous one).
        resume: such a checkpoint (path or loaded dict) to continue from; ``model`` must be the same architecture
            (unpruned), and ``method``/``ratio``/``skip`` the same. The data position is restored: the interrupted
            pass over the training loader continues without the batches it had already used (its order is the
            loader's business: exact when the loader's order is a function of the pass, as with ``tpp.train``'s
            samplers).
        hooks: a :class:`TrainHooks` doing the device/process-specific steps (default: single process, as is).
        lr_schedule: finetuning learning rate per epoch, ``"step"`` (``lr_milestones``, ``lr_gamma``) or
            ``"cosine"`` (to 0 over ``finetune_epochs``).
        finetune_checkpoint_every: also checkpoint every this many finetuning iterations (default: per epoch only).

    Returns a :class:`PruneResult`. Raises ``ValueError`` for an unknown method, a bad ratio spec, or a checkpoint
    that does not match.
    """
    method = get_method(method)
    schedule = GrowingSchedule() if schedule is None else schedule
    if not isinstance(schedule, GrowingSchedule):
        raise TypeError(f"schedule must be a GrowingSchedule, got {type(schedule).__name__}")
    if method.regularizer == "tpp":
        if reg_iters is not None and reg_iters != schedule.total_iters:
            raise ValueError(f"method {method.name!r} regularizes for schedule.total_iters = {schedule.total_iters} "
                             f"iterations; got reg_iters={reg_iters} (change the schedule instead)")
        reg_iters = schedule.total_iters
    elif method.regularizer is not None:
        reg_iters = schedule.total_iters if reg_iters is None else reg_iters
    else:
        reg_iters = 0
    _check_count(reg_iters, "reg_iters")
    _check_count(finetune_epochs, "finetune_epochs")
    _check_count(jsv_samples, "jsv_samples")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    for name, value in (("reg_lr", reg_lr), ("finetune_lr", finetune_lr)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    log_every = log_every or max(1, reg_iters // 200)
    run = _Run(locals())
    return run.run()


def _check_count(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


class _Run:
    """State of one run_pruning call: stages "base" → "regularize" → "remove" → "finetune" → "done"."""

    def __init__(self, a: dict):
        self.a = a
        self.method: Method = a["method"]
        model = a["model"]
        self.hooks: TrainHooks = a["hooks"] or DEFAULT_HOOKS
        self.model = model if a["inplace"] else copy.deepcopy(model)
        self.device = torch.device(a["device"]) if a["device"] is not None else _device_of(self.model)
        self.model = self.hooks.place(self.model, self.device)
        self.net = self.model                       # what the training steps run on (hooks.wrap(model))
        self.signature = model_signature(self.model)
        self.progress = a["progress"]
        self.stage, self.iteration, self.epoch = "base", 0, 0
        self.data_epoch, self.data_batch = 0, 0     # regularization: pass over the training data, batches used in it
        self.ft_batch, self.ft_running = 0, None    # finetuning: batches done in the current epoch, their loss sum
        self.window, self.window_seen = None, 0     # regularization: loss sum and count since the last history entry
        self.pruned: Optional[dict[str, Tensor]] = None
        self.reg = None
        self.optimizer, self.scheduler, self.ft_reg = None, None, None
        self.history: dict = {"regularize": [], "finetune": []}
        self.metrics: dict = {"accuracy": {}, "top5": {}, "loss": {}, "jsv_mean": {}, "jsv": {}, "time_s": {}}
        self.config = self._config()
        if a["seed"] is not None:
            torch.manual_seed(a["seed"])
        self.jsv_inputs = (_first_samples(a["test_loader"], a["jsv_samples"]).to(self.device)
                           if a["jsv_samples"] else None)
        self.example = _first_samples(a["test_loader"], 1).to(self.device)

    def _config(self) -> dict:
        a = self.a
        ratio = a["ratio"]
        return {
            "method": self.method.name, "method_description": self.method.description,
            "ratio": dict(ratio) if isinstance(ratio, Mapping) else ratio,
            "skip": a["skip"] if isinstance(a["skip"], str) else list(a["skip"]),
            "schedule": a["schedule"].state_dict(), "reg_iters": a["reg_iters"], "reg_lr": a["reg_lr"],
            "momentum": a["momentum"], "weight_decay": a["weight_decay"], "finetune_epochs": a["finetune_epochs"],
            "finetune_lr": a["finetune_lr"], "lr_milestones": list(a["lr_milestones"]), "lr_gamma": a["lr_gamma"],
            "orth_weight": a["orth_weight"], "jsv_samples": a["jsv_samples"], "seed": a["seed"],
            "device": str(self.device), "backend": a["backend"], "lr_schedule": a["lr_schedule"],
        }

    # ------------------------------------------------------------------ checkpoints
    def _save(self, event: str) -> None:
        path = self.a["checkpoint"]
        if path is None:
            return
        self.hooks.sync(self.model)
        running = self.ft_running or {}
        state = {
            "version": CHECKPOINT_VERSION, "stage": self.stage, "iteration": self.iteration, "epoch": self.epoch,
            "method": self.method.name, "ratio": _ratio_key(self.a["ratio"]), "skip": self.config["skip"],
            "signature": self.signature, "model": self.model.state_dict(),
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
        self.hooks.save(state, Path(path), event)

    def _restore(self, state) -> None:
        if not isinstance(state, Mapping):
            path = Path(state)
            if not path.is_file():
                raise FileNotFoundError(f"resume checkpoint {path} does not exist")
            state = self.hooks.load(path)
        if not isinstance(state, Mapping) or state.get("version") != CHECKPOINT_VERSION or "signature" not in state:
            raise ValueError("resume: not a tpp pipeline checkpoint (version "
                             f"{state.get('version') if isinstance(state, Mapping) else None}, expected "
                             f"{CHECKPOINT_VERSION})")
        _check_signature(state["signature"], self.model, "the resume checkpoint")
        for key, mine in (("method", self.method.name), ("ratio", _ratio_key(self.a["ratio"])),
                          ("skip", self.config["skip"])):
            if state[key] != mine:
                raise ValueError(f"the resume checkpoint is for {key} {state[key]!r}, this run has {mine!r}")
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
            self.model = prune_model(self.model, self.pruned)
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
        if self.a["resume"] is not None:
            self._restore(self.a["resume"])
        if self.stage == "base":
            self._measure("base", self.model)
            self.metrics["params"] = {"base": count_params(self.model)}
            self.metrics["flops"] = {"base": count_flops(self.model, self.example)}
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
        result = self.hooks.evaluate(model, self.a["test_loader"], self.device)
        self.metrics["accuracy"][when], self.metrics["loss"][when] = result["acc"], result["loss"]
        self.metrics["top5"][when] = result["top5"]
        summary = _jsv(model, self.jsv_inputs)
        self.metrics["jsv"][when] = summary
        self.metrics["jsv_mean"][when] = summary["mean"] if summary else None

    def _make_reg_optimizer(self) -> None:
        a = self.a
        if self.method.regularizer is None:
            self.reg, self.optimizer = None, None
            return
        self.reg = make_regularizer(self.method, self.model, a["ratio"], a["skip"], schedule=a["schedule"],
                                    orth_weight=a["orth_weight"], bn_map=a["bn_map"],
                                    **({"backend": a["backend"]} if self.method.regularizer == "tpp" else {}))
        self.hooks.agree("the filters selected for pruning", self.reg.pruned)
        self.net = self.hooks.wrap(self.model)
        self.optimizer = _sgd(self.model, a["reg_lr"], a["momentum"], a["weight_decay"])

    def _training_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless regularization batches; every pass over the loader is a new data epoch. ``data_epoch`` and
        ``data_batch`` (batches used in the current pass) always describe what has been handed out."""
        loader = self.a["train_loader"]
        while True:
            for batch in self.hooks.batches(loader, "regularize", self.data_epoch, self.data_batch):
                self.data_batch += 1
                yield batch
            if self.data_batch == 0:
                raise ValueError("the training loader yields no batches")
            self.data_epoch, self.data_batch = self.data_epoch + 1, 0

    def _regularize(self) -> None:
        a, hooks = self.a, self.hooks
        total, reg = a["reg_iters"], self.reg
        if reg is None or self.iteration >= total:
            return
        every = a["checkpoint_every"] or max(1, total // 10)
        self.net.train()
        batches = self._training_batches()
        while self.iteration < total:
            x, y = hooks.inputs(*next(batches), self.device)
            strength = reg.strength
            loss = hooks.train_step(self.net, self.optimizer, x, y, reg)
            reg.step()
            self.iteration += 1
            self.window = loss.double() if self.window is None else self.window + loss.double()
            self.window_seen += 1
            if self.iteration % a["log_every"] == 0 or self.iteration == total:
                with torch.no_grad():
                    penalty = float(reg.penalty())
                self.history["regularize"].append({
                    "iteration": self.iteration, "strength": strength, "penalty": penalty,
                    "loss": float(hooks.mean(self.window)) / self.window_seen, "phase": reg.phase})
                self.window, self.window_seen = None, 0
            if self.progress is not None:
                self.progress("regularize", self.iteration, total,
                              {"strength": strength, "loss": loss.item() if hooks.sync_loss else loss,
                               "phase": reg.phase})
            if self.iteration % every == 0 and self.iteration < total:
                self._save("iteration")

    @torch.no_grad()
    def _remove(self) -> None:
        from .surgery import prune_model

        a, reg = self.a, self.reg
        self.hooks.sync(self.model)
        if self.method.regularizer == "tpp":
            self.pruned = dict(reg.pruned)
        else:
            self.pruned = select_filters(self.model, a["ratio"], a["skip"], bn_map=a["bn_map"])
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
        self.model = prune_model(self.model, self.pruned, inplace=True)
        self.model = self.hooks.place(self.model, self.device)
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
        self.reg, self.optimizer, self.net = None, None, self.model

    def _make_finetune_optimizer(self) -> None:
        a = self.a
        self.net = self.hooks.wrap(self.model)
        self.optimizer = _sgd(self.model, a["finetune_lr"], a["momentum"], a["weight_decay"])
        self.scheduler = _lr_scheduler(self.optimizer, a["lr_schedule"], a["finetune_epochs"], a["lr_milestones"],
                                       a["lr_gamma"])
        self.ft_reg = (OrthRegularizer(self.model, self.method.finetune_regularizer, a["orth_weight"])
                       if self.method.finetune_regularizer else None)

    def _finetune(self) -> None:
        a = self.a
        every = a["finetune_checkpoint_every"]

        def on_iteration_end(epoch: int, batches: int, running: dict) -> None:
            if every and batches % every == 0:
                self.ft_batch, self.ft_running = batches, running
                self._save("iteration")

        def on_epoch_end(epoch: int, history: list) -> None:
            self.epoch, self.ft_batch, self.ft_running = epoch, 0, None
            self._save("epoch")

        start_batch, running = self.ft_batch, self.ft_running
        train(self.model, a["train_loader"], a["finetune_epochs"], a["finetune_lr"], test_loader=a["test_loader"],
              device=self.device, progress=self.progress, phase="finetune", regularizer=self.ft_reg,
              optimizer=self.optimizer, scheduler=self.scheduler, start_epoch=self.epoch,
              on_epoch_end=on_epoch_end, history=self.history["finetune"], hooks=self.hooks, net=self.net,
              start_batch=start_batch, running=running, on_iteration_end=on_iteration_end)
