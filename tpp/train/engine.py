"""The training engine of `tpp prune` and `tpp train`: :class:`tpp.loop.TrainHooks` for DDP, AMP, channels_last,
resumable distributed data passes, all-reduced evaluation, rank agreement and managed checkpoints.

The loops are :mod:`tpp.loop`'s (one training loop in the project); this module only says how each step is done:

* ``place``: model to ``cuda:LOCAL_RANK`` (or CPU), channels_last when asked, every parameter and buffer broadcast
  from rank 0 — the filters are then selected from identical weights on every rank, and ``agree`` checks they are.
* ``wrap``: ``DistributedDataParallel`` (rebuilt after removal, when the pipeline builds the finetuning optimizer),
  ``broadcast_buffers=False``: DDP's default broadcasts every buffer from rank 0 before each forward — one more
  collective per step — but no step reads another rank's BN running statistics (training normalises with the
  batch's), so ``sync`` broadcasts them once where they are read: before evaluation, saving and removal (the result
  is the same: rank 0's statistics, which broadcasting never changed). With ``compile``, the module the steps run on
  is ``torch.compile``-d (around DDP); ``reg.apply_gradients()`` and ``reg.step()`` run outside it, and the pruned
  model is compiled afresh when ``wrap`` is called again after removal.
* ``train_step`` (the loop's): forward under ``torch.autocast`` (bf16 or fp16); ``criterion``: cross-entropy with
  optional label smoothing; ``backward_step``: backward through the GradScaler (fp16),
  ``scaler.unscale_(optimizer)`` **before** the regularizer's ``apply_gradients()`` (its gradients are unscaled and
  identical on every rank, added to the all-reduced ones), ``scaler.step``, ``scaler.update``.
* ``batches``: ``sampler.set_epoch(pass, start)`` of :class:`~tpp.train.data.ResumableDistributedSampler` (finetuning
  passes are numbered apart from regularization passes), the next batch copied to the GPU while the current one
  trains (:func:`~tpp.train.prefetch.prefetch`); ``inputs``: uint8 image batches normalized on the device
  (:attr:`Engine.normalize`), JPEG batches of ``--decode gpu`` decoded there.
* ``sum``/``mean``: all-reduce; evaluation counts (top-1, top-5, loss) are summed over the ranks' disjoint shards.
* ``sync``: BN running statistics broadcast from rank 0 before anything is evaluated, saved or removed, so every
  rank holds the same model; it also waits for the checkpoint being written in the background, so the files are
  complete wherever the ranks synchronise.
* ``checkpoint_due``: wall-time cadence (``checkpoint_minutes``) besides the pipeline's iteration cadence; rank 0's
  clock decides, polled every ``poll_every`` steps (one small broadcast then, none in between).
* ``agree``: hash all-gather; the pipeline calls it on the selected filters and on the pruned sets and weights right
  before removal — no rank removes anything on its own.
* ``state_dict``: GradScaler, the RNG states of every rank; ``save`` hands the state to a
  :class:`~tpp.train.checkpoint.CheckpointManager` or :class:`~tpp.train.checkpoint.CheckpointFile` (rank 0 writes,
  in the background when the store was made with ``background=True``); ``close`` waits for the pending write and
  raises its error.
"""
from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..loop import TrainHooks
from . import distributed as D
from .checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from .decode import EncodedImages
from .prefetch import Normalize, prefetch

__all__ = ["Engine", "AMP_MODES", "resolve_amp", "fp32_arithmetic", "FINETUNE_PASS_OFFSET", "StopRequested",
           "stop_after"]

AMP_MODES = ("auto", "none", "bf16", "fp16")
FINETUNE_PASS_OFFSET = 1_000_000   # sampler epochs of finetuning passes: distinct permutations from regularization's


def resolve_amp(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``mode``: ``auto`` is bf16 on GPUs that support it (else fp16), none on CPU."""
    if mode not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {mode!r}")
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def fp32_arithmetic() -> None:
    """IEEE fp32 convolutions and matmuls on GPUs: TF32 off for cuDNN (on by PyTorch's default) and cuBLAS — the
    paper's arithmetic under ``--amp none``. The legacy flags work on every torch: 2.9+ maps them onto its
    ``fp32_precision`` settings (cuDNN conv/rnn ``"none"``, matmul ``"ieee"``), so code reading either API sees the
    same state (setting the new API instead makes the legacy getters raise)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class Engine(TrainHooks):
    """DDP/AMP/channels_last hooks for :func:`tpp.pipeline.run_pruning` (see the module docstring).

    Args:
        env: this process's :class:`~tpp.train.distributed.DistEnv`.
        amp: autocast dtype (``torch.bfloat16``, ``torch.float16`` with a GradScaler) or ``None``.
        channels_last: convert the model and 4-D inputs to ``torch.channels_last``.
        label_smoothing: of the training cross-entropy (evaluation is plain cross-entropy).
        checkpoints: where ``save`` writes (:class:`CheckpointManager` or :class:`CheckpointFile`); ``None``
            writes nothing.
        batch_size: per-rank training batch (the sampler's start of a resumed pass is ``skip × batch_size``).
        seed: reseeds the RNGs of ranks whose states a checkpoint does not hold (another world size).
        find_unused_parameters, static_graph, broadcast_buffers: passed to DDP (see the module docstring for why
            buffers are not broadcast at every step).
        compile: ``torch.compile`` backend of the training module (``"inductor"``, ``"aot_eager"``, ...) or ``None``.
        checkpoint_minutes: also checkpoint when this much wall time has passed since the last checkpoint (``0``:
            by iterations only); checked every ``poll_every`` steps (default: every step in one process, every
            50 under DDP, where checking is a broadcast and a host synchronisation).
    """

    def __init__(self, env: D.DistEnv, *, amp: Optional[torch.dtype] = None, channels_last: bool = False,
                 label_smoothing: float = 0.0, checkpoints: Optional[CheckpointManager] = None,
                 batch_size: int = 1, seed: int = 0,
                 find_unused_parameters: bool = False, static_graph: bool = False, broadcast_buffers: bool = False,
                 compile: Optional[str] = None, checkpoint_minutes: float = 0.0,
                 poll_every: Optional[int] = None):
        if amp not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp must be torch.bfloat16, torch.float16 or None, got {amp!r}")
        poll_every = poll_every or (50 if env.distributed else 1)
        if not checkpoint_minutes >= 0 or poll_every < 1:
            raise ValueError(f"checkpoint_minutes must be >= 0 and poll_every >= 1, got {checkpoint_minutes!r}, "
                             f"{poll_every!r}")
        self.env, self.device = env, env.device
        self.amp, self.channels_last = amp, channels_last
        self.label_smoothing = float(label_smoothing)
        self.checkpoints = checkpoints
        self.batch_size, self.seed = batch_size, seed
        self.ddp_kwargs = {"find_unused_parameters": find_unused_parameters, "static_graph": static_graph,
                           "broadcast_buffers": broadcast_buffers}
        self.compile = compile
        self.checkpoint_seconds, self.poll_every = 60.0 * checkpoint_minutes, poll_every
        self.steps, self.last_save = 0, time.monotonic()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == torch.float16)
        self.skips_nonfinite_steps = self.scaler.is_enabled()     # fp16: the scaler skips overflowing steps
        self.sync_loss = False              # the loop passes loss tensors: no host sync per step
        self.pass_info = {"phase": None, "epoch": 0, "start": 0}

    # ---------------------------------------------------------------- model
    @torch.no_grad()
    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.env.distributed:
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        net = model
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            kwargs = dict(self.ddp_kwargs)
            if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters:
                kwargs["forward_sync_buffers"] = kwargs.pop("broadcast_buffers")     # its name since torch 2.14
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None,
                                                      gradient_as_bucket_view=True, **kwargs)
        if self.compile:
            torch.compiler.reset()      # a model wrapped again (after removal) is compiled afresh
            net = torch.compile(net, backend=self.compile)
        return net

    #: how uint8 image batches become model inputs on the device (the dataset's mean/std); None: float batches only
    normalize: Optional[Normalize] = None

    def inputs(self, x, y: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """``x`` on the device (JPEG batches decoded there, uint8 images normalized by :attr:`normalize`) in the
        model's memory format, and ``y``; copies are ``non_blocking`` (already done when :meth:`batches` prefetched
        them)."""
        if isinstance(x, EncodedImages):
            x = x.decode(self.device)
        x = x.to(self.device, non_blocking=True)
        if x.dim() == 4:                          # before normalizing: uint8 is 4× cheaper to rearrange
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        if not x.is_floating_point():
            if self.normalize is None:
                raise TypeError(f"{x.dtype} input batches need Engine.normalize (the dataset's mean and std); "
                                "build the datasets with tpp.train.data.build_datasets and set it from normalizer_of")
            x = self.normalize(x)
        return x, y.to(self.device, non_blocking=True)

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    # ----------------------------------------------------------------- data
    def batches(self, loader: Iterable, phase: str, epoch: int, skip: int = 0):
        sampler = getattr(loader, "sampler", None)
        number = epoch + (FINETUNE_PASS_OFFSET if phase == "finetune" else 0)
        self.pass_info = {"phase": phase, "epoch": number, "start": skip}
        if hasattr(sampler, "start"):            # ResumableDistributedSampler: starts the pass part-way
            sampler.set_epoch(number, skip * self.batch_size)
            return prefetch(loader, self.device)
        return prefetch(super().batches(loader, phase, number, skip), self.device)

    # ----------------------------------------------------------------- step
    def criterion(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def backward_step(self, loss: Tensor, optimizer: torch.optim.Optimizer, regularizer=None) -> None:
        if not self.scaler.is_enabled():
            return super().backward_step(loss, optimizer, regularizer)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)          # gradients are true gradients from here on
        if regularizer is not None:
            regularizer.apply_gradients()
        self.scaler.step(optimizer)              # skipped (and the scale lowered) on inf/nan gradients
        self.scaler.update()

    # ------------------------------------------------------------ collectives
    def sum(self, value: Tensor) -> Tensor:
        if not self.env.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def mean(self, value: Tensor) -> Tensor:
        return self.sum(value) / self.env.world_size if self.env.distributed else value

    @torch.no_grad()
    def sync(self, model: nn.Module) -> None:
        self.wait()
        if self.env.distributed:
            for b in model.buffers():
                dist.broadcast(b.data, src=0)

    def agree(self, what: str, value) -> None:
        D.agree(what, value, self.env)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"world_size": self.env.world_size,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": D.all_gather_object(rng_state(self.device), self.env),
                "sampler": dict(self.pass_info)}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        states = state.get("rng") or []
        if not states:           # a checkpoint of plain hooks (tpp prune 0.1): the run's own RNG state suffices
            return
        if len(states) == self.env.world_size:
            set_rng_state(states[self.env.rank], self.device)
        else:
            warnings.warn(f"the checkpoint was written by {len(states)} processes and this run has "
                          f"{self.env.world_size}: RNG streams (dropout and other in-model randomness) are reseeded; "
                          "the interrupted data pass resumes after the same samples (the global batches are "
                          "unchanged, only the padding that evens out the last shards differs); resume on the same "
                          "number of processes for an exact continuation", RuntimeWarning, stacklevel=2)
            torch.manual_seed(self.seed + self.env.rank)

    def checkpoint_due(self) -> bool:
        """Whether ``checkpoint_minutes`` have passed since the last checkpoint (rank 0's clock, the same answer on
        every rank); called once per training step on every rank."""
        self.steps += 1
        if not self.checkpoint_seconds or self.checkpoints is None or self.steps % self.poll_every:
            return False
        due = time.monotonic() - self.last_save >= self.checkpoint_seconds
        if self.env.distributed:
            flag = torch.tensor([1 if due else 0], dtype=torch.int32, device=self.device)
            dist.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def wait(self) -> None:
        """Block until the checkpoint being written in the background is on disk; raise its error if it failed."""
        if self.checkpoints is not None and hasattr(self.checkpoints, "wait"):
            self.checkpoints.wait()

    def close(self) -> None:
        """The end of a run (done, stopped or failed): wait for the pending checkpoint write (raising its error)."""
        self.wait()

    def save(self, state: dict, path: Path, event: str) -> Optional[Path]:
        self.last_save = time.monotonic()
        if self.checkpoints is None:
            return None
        tag = {"iteration": f"{state['stage']}-it{state['iteration']:07d}" if state["stage"] == "regularize"
               else f"{state['stage']}-ep{state['epoch']:03d}-b{state['finetune_position']['batch']:06d}",
               "epoch": f"{state['stage']}-ep{state['epoch']:03d}"}.get(event, f"{state['stage']}-{event}")
        return self.checkpoints.save(state, event, tag)          # the file (rank 0; written in the background)

    def load(self, path: Path):
        return load_checkpoint(path)


def stop_after(progress: Optional[Callable], iterations: Optional[int]) -> Optional[Callable]:
    """``progress`` that raises :class:`StopRequested` after ``iterations`` training iterations (``--stop-after-iters``:
    the run ends as if killed there; its last checkpoint resumes it)."""
    if not iterations:
        return progress
    count = {"n": 0}

    def wrapped(phase: str, done: int, total: int, info: dict) -> None:
        if progress is not None:
            progress(phase, done, total, info)
        count["n"] += 1
        if count["n"] >= iterations:
            raise StopRequested(f"stopped after {count['n']} training iterations (--stop-after-iters)")

    return wrapped


class StopRequested(Exception):
    """Raised by ``--stop-after-iters``: the run ends as if killed; its last checkpoint resumes it."""
