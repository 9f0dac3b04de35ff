"""The training loop of the pipeline: :func:`train` (pretraining, finetuning), :func:`evaluate`, and
:class:`TrainHooks`, the one place where every device-, process- and file-specific action of a loop happens.

The default hooks are plain single-process training; :mod:`tpp.train.engine` overrides them for DDP, AMP,
channels_last, distributed samplers and managed checkpoint folders, through the same loops.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .files import load_verified, save_verified
from .guard import FiniteGuard

__all__ = ["TrainHooks", "DEFAULT_HOOKS", "train", "evaluate", "device_of", "batches", "first_samples", "sgd",
           "make_lr_scheduler", "LR_SCHEDULES", "Progress"]

Progress = Callable[[str, int, int, dict], None]


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def batches(loader: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
    """``(inputs, labels)`` of each batch of ``loader`` (extra items of a batch are dropped)."""
    for batch in loader:
        yield batch[0], batch[1]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: Optional[torch.device] = None) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``loader`` in eval mode (mode restored after)."""
    device = device or device_of(model)
    was_training = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    try:
        for x, y in batches(loader):
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


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over every parameter of ``model`` (weight decay on all of them, as in the reference code)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


LR_SCHEDULES = ("step", "cosine")


def make_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, milestones: Sequence[int],
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
        for x, y in batches(loader):
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
    #: a step with non-finite gradients is skipped, not applied (a GradScaler): the guard then watches only the loss
    skips_nonfinite_steps: bool = False

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
        return contextlib.nullcontext()

    def batches(self, loader: Iterable, phase: str, epoch: int, skip: int = 0) -> Iterable[tuple[Tensor, Tensor]]:
        """The batches of pass ``epoch`` (0-based, per phase) over ``loader``, without its first ``skip`` batches
        (a resumed pass); calls ``sampler.set_epoch(epoch)`` when the loader's sampler has it."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        passed = batches(loader)
        return itertools.islice(passed, skip, None) if skip else passed

    def train_step(self, net: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                   regularizer=None) -> Tensor:
        """One optimization step on ``(x, y)``: zero grads, forward under :meth:`autocast`, :meth:`criterion`,
        then :meth:`backward_step`. Returns the detached loss. (``regularizer.step()`` is the caller's.)"""
        optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.criterion(net(x), y)
        self.backward_step(loss, optimizer, regularizer)
        return loss.detach()

    def criterion(self, logits: Tensor, y: Tensor) -> Tensor:
        """The training loss: cross-entropy."""
        return F.cross_entropy(logits, y)

    def backward_step(self, loss: Tensor, optimizer: torch.optim.Optimizer, regularizer=None) -> None:
        """Backward, the regularizer's ``apply_gradients()`` on the true gradients, ``optimizer.step()``."""
        loss.backward()
        if regularizer is not None:
            regularizer.apply_gradients()
        optimizer.step()

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

    def checkpoint_due(self) -> bool:
        """Called after every regularization and finetuning step, on every rank: ``True`` asks for a checkpoint now,
        besides the iteration cadence (the engine's wall-time cadence). Must answer the same on every rank."""
        return False

    def state_dict(self) -> dict:
        """Extra state saved in checkpoints (scaler, per-rank RNG states, ...)."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass

    def save(self, state: dict, path: Path, event: str) -> Optional[Path]:
        """Write checkpoint ``state`` to ``path`` (atomically, with a checksum: :func:`tpp.files.save_verified`).
        ``event`` is ``"start"``, ``"iteration"``, ``"removed"``, ``"epoch"`` or ``"done"``. Returns the file
        written, when known."""
        return save_verified(state, path)

    def load(self, path: Path):
        """A checkpoint of :meth:`save`, checked against its checksum (``ValueError`` naming a damaged file)."""
        return load_verified(path)

    def gradients(self, optimizer: torch.optim.Optimizer) -> Optional[list[Tensor]]:
        """The gradients the last step applied, for the non-finite guard (``None``: do not check them)."""
        if self.skips_nonfinite_steps:
            return None
        return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


DEFAULT_HOOKS = TrainHooks()


def train(model: nn.Module, train_loader: Iterable, epochs: int, lr: float, *, momentum: float = 0.9,
          weight_decay: float = 5e-4, milestones: Sequence[int] = (), gamma: float = 0.1,
          test_loader: Optional[Iterable] = None, device: Optional[torch.device] = None,
          progress: Optional[Progress] = None, phase: str = "train", regularizer=None,
          optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None, start_epoch: int = 0,
          on_epoch_end: Optional[Callable[[int, list], None]] = None, history: Optional[list] = None,
          hooks: Optional[TrainHooks] = None, net: Optional[nn.Module] = None, start_batch: int = 0,
          running: Optional[Mapping] = None,
          on_iteration_end: Optional[Callable[[int, int, dict], None]] = None,
          guard: Optional[FiniteGuard] = None) -> list[dict]:
    """Plain SGD training (cross-entropy) for ``epochs`` epochs with a step-decay learning rate; used for
    pretraining and finetuning. ``regularizer`` (anything with ``apply_gradients()``/``step()``) is applied every
    iteration. Returns per-epoch records ``{"epoch", "lr", "train_loss", "time_s", "test_acc"?, "test_top5"?,
    "test_loss"?}``.

    ``hooks`` (:class:`TrainHooks`) does the steps, data passes and evaluation; ``net`` is the module the steps run
    on (e.g. DDP around ``model``; default ``model``). ``start_epoch``/``start_batch``/``running`` resume inside an
    epoch: skip its first ``start_batch`` batches, with ``running = {"loss_sum", "seen"}`` of the batches done.
    ``on_iteration_end(epoch, batches_done, running)`` is called after every step (0-based epoch).

    ``guard`` (:class:`tpp.guard.FiniteGuard`, default a new one) watches every step's loss and gradients on the
    device and is checked at each epoch end (and by the caller's callbacks): a non-finite one raises
    :class:`tpp.guard.NonFiniteError` naming the first bad iteration, before the epoch is recorded or saved."""
    hooks = hooks or DEFAULT_HOOKS
    net = model if net is None else net
    device = device or device_of(model)
    optimizer = optimizer or sgd(model, lr, momentum, weight_decay)
    scheduler = scheduler or torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)
    history = [] if history is None else history
    steps_per_epoch = _len_or_none(train_loader)
    guard = guard or FiniteGuard(device)

    def describe(n: int) -> str:
        if not steps_per_epoch:
            return f"iteration {n}"
        return f"iteration {n} (epoch {(n - 1) // steps_per_epoch + 1}, batch {(n - 1) % steps_per_epoch + 1})"

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
            guard.watch(epoch * (steps_per_epoch or 0) + i + 1, loss, hooks.gradients(optimizer))
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
        guard.check(phase, hooks, model, (epoch + 1) * (steps_per_epoch or 0), describe)
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


def first_samples(loader: Iterable, n: int) -> Tensor:
    """The first ``n`` inputs of ``loader`` as one tensor (fewer when it holds fewer)."""
    xs, count = [], 0
    for x, _ in batches(loader):
        xs.append(x)
        count += x.shape[0]
        if count >= n:
            break
    if not xs:
        raise ValueError("the test loader yields no samples")
    return torch.cat(xs)[:n]

