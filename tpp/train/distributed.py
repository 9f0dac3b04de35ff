"""Processes, ranks and devices from torchrun's environment; small collectives; rank-named log lines.

``init_distributed()`` reads what ``torchrun`` (``python -m torch.distributed.run``) exports — ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` — and, when the world has more
than one process, initialises the default process group: NCCL with one GPU per process (``cuda:LOCAL_RANK``, so the
same command works on every node of a multi-node job), gloo on CPU. Without those variables it is one process on
``cuda`` (when available) or ``cpu``.

``agree(what, value, env)`` is how ranks make sure they are about to do the same thing: every rank hashes ``value``
(tensors by their bytes, dtype and shape; containers recursively) and the hashes are all-gathered; any difference
raises on every rank, naming the ranks that differ.

Log lines and warnings carry ``[rank r/w]``; non-zero ranks log warnings and errors only.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "shutdown", "digest", "agree", "broadcast_object", "all_gather_object",
           "barrier", "setup_logging", "logger"]

logger = logging.getLogger("tpp.train")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world_size`` (``local_rank`` on its node) and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None        # process-group backend; None in a single process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        return f"rank {self.rank}/{self.world_size}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_distributed(device: Optional[str] = None, backend: Optional[str] = None,
                     timeout_s: float = 1800.0) -> DistEnv:
    """The :class:`DistEnv` of this process, with the default process group initialised when ``WORLD_SIZE > 1``.

    ``device``: ``"cpu"``, ``"cuda"`` (each process uses ``cuda:LOCAL_RANK``), or ``None`` for cuda when
    available; ``"cuda:N"`` is honoured in a single process only. ``backend``: ``"nccl"`` (default with CUDA) or
    ``"gloo"`` (default on CPU). ``timeout_s`` bounds every collective (the others wait there while rank 0 finishes a
    background checkpoint write before evaluation or removal: it must fit in it).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    kind = (device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"[rank {rank}/{world}] device cuda requested but torch.cuda.is_available() is False")
        if world > 1:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"[rank {rank}/{world}] LOCAL_RANK={local_rank} but only "
                                 f"{torch.cuda.device_count()} GPUs are visible: start at most that many processes "
                                 "per node (torchrun --nproc_per_node)")
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device(device) if device and ":" in device else torch.device("cuda", 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return DistEnv(0, 1, 0, 1, dev, None)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("backend nccl needs CUDA devices; use gloo on CPU")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world,
                                  "timeout": _dt.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev      # binds the communicator to this GPU (eager init, no device guessing)
        try:
            dist.init_process_group(**kwargs)
        except TypeError:                  # an older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
    return DistEnv(rank, world, local_rank, local_world, dev, backend)


def shutdown(env: DistEnv) -> None:
    """Destroy the process group (if this process has one)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=env.device if env.backend == "nccl" else None)
    return box[0]


def all_gather_object(obj: Any, env: DistEnv) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _update(h, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"D%d" % len(value))
        for k in value:                    # insertion order: state_dicts and pruned sets are ordered
            _update(h, str(k))
            _update(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(b"L%d" % len(value))
        for v in value:
            _update(h, v)
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


def digest(value: Any) -> str:
    """SHA-256 of ``value``: tensors by bytes, dtype and shape (any memory format), containers recursively."""
    h = hashlib.sha256()
    _update(h, value)
    return h.hexdigest()


def agree(what: str, value: Any, env: DistEnv) -> str:
    """Raise ``RuntimeError`` on every rank unless ``value`` is identical on all of them; returns its digest."""
    mine = digest(value)
    if not env.distributed:
        return mine
    hashes = all_gather_object(mine, env)
    if len(set(hashes)) > 1:
        groups: dict[str, list[int]] = {}
        for r, h in enumerate(hashes):
            groups.setdefault(h, []).append(r)
        detail = "; ".join(f"ranks {ranks}: {h[:12]}" for h, ranks in groups.items())
        raise RuntimeError(f"[{env.tag}] {what} differ across ranks ({detail}); refusing to go on with ranks that "
                           "would disagree")
    return mine


class _RankFilter(logging.Filter):
    def __init__(self, env: DistEnv):
        super().__init__()
        self.tag = env.tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.tag
        return True


def setup_logging(env: DistEnv, quiet: bool = False, stream=None) -> logging.Logger:
    """``tpp.train`` logger: ``time [rank r/w] LEVEL message`` on stderr; INFO on rank 0 (WARNING with ``quiet``),
    WARNING elsewhere. Python warnings are routed through it, so they name the rank too."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(rank)s] %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(_RankFilter(env))
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if env.is_main and not quiet else logging.WARNING)
    logger.propagate = False

    def showwarning(message, category, filename, lineno, file=None, line=None):
        logger.warning("%s: %s (%s:%s)", category.__name__, message, os.path.basename(filename), lineno)

    warnings.showwarning = showwarning
    return logger
