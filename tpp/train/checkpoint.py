"""Checkpoint files that survive crashes: atomic writes, a numbered series with the last ``k`` kept, and ``best.pt``.

A checkpoint is written to a temporary file in the same folder, flushed and ``fsync``-ed, then renamed over its
final name (``os.replace``, atomic on POSIX) and the folder entry is ``fsync``-ed: a crash or a kill at any moment
leaves either the previous files or the new complete one, never a truncated file under a checkpoint's name.
Temporary files a killed writer left behind are removed when a :class:`CheckpointManager` opens the folder. Every
checkpoint carries a SHA-256 checksum of its content (:func:`tpp.files.save_verified`), checked by
:func:`load_checkpoint`: a damaged file is a ``ValueError`` naming it, never a silently different run.

Files: ``ckpt-<sequence>-<stage>-<position>.pt`` (sequence numbers increase across resumes; the newest is what
``--resume auto`` continues from) and ``best.pt`` (the checkpoint with the best finetuning top-1 so far, a hard link
to the numbered file when the filesystem allows it). Only rank 0 writes; every rank reads.

What a checkpoint holds is :mod:`tpp.pipeline`'s run state (model, optimizer, LR scheduler, regularizer state, stage,
iteration/epoch, data position, history, metrics, torch RNG, the run's :class:`tpp.identity.RunIdentity`) plus the
engine's (GradScaler, every rank's RNG states). :class:`CheckpointFile` is the one-file variant (``tpp prune``'s
``checkpoint.pt``, replaced at every save) with the same interface.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch

from ..files import TEMPORARY, atomic_save, fsync_dir, load_verified, save_verified
from ..identity import CheckpointMismatch

__all__ = ["atomic_save", "CheckpointManager", "CheckpointFile", "CheckpointMismatch", "rng_state", "set_rng_state",
           "list_checkpoints", "load_checkpoint"]

PathLike = Union[str, os.PathLike]
_NAME = re.compile(r"^ckpt-(\d{6,})-[A-Za-z0-9_.-]+\.pt$")


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the same content as ``src``, atomically (hard link, else a copy, then rename)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_dir(dst.parent)


def list_checkpoints(folder: PathLike) -> list[Path]:
    """Numbered checkpoint files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: PathLike) -> dict:
    """A checkpoint read without executing pickled code (``weights_only=True``), on the CPU, and checked against the
    checksum its writer stored (:func:`tpp.files.load_verified`; checkpoints of tpp 0.1 have none). Raises
    ``FileNotFoundError``, or ``ValueError`` naming the file when it is truncated, unreadable or corrupted."""
    return load_verified(path)


class CheckpointManager:
    """Numbered, atomically written checkpoints in ``folder``: keep the newest ``keep_last`` and ``best.pt``.

    ``save(state, event)`` writes on the main process only (``is_main``); ``latest()`` is the newest complete file.
    ``best_key(state) -> float | None`` reads the score deciding ``best.pt`` (higher is better; default: the last
    finetuning epoch's test top-1 on ``"epoch"`` events).
    """

    def __init__(self, folder: PathLike, keep_last: int = 2, is_main: bool = True,
                 best_key: Optional[Callable[[Mapping, str], Optional[float]]] = None,
                 on_saved: Optional[Callable[[Path, Mapping, str], None]] = None):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        self.folder = Path(folder)
        self.keep_last, self.is_main = keep_last, is_main
        self.best_key = best_key or _finetune_top1
        self.on_saved = on_saved
        self.best: Optional[float] = None
        if is_main and self.folder.is_dir():         # created by the first save, not before
            for p in self.folder.iterdir():          # left by a writer killed mid-save
                if TEMPORARY.match(p.name):
                    p.unlink(missing_ok=True)
        existing = list_checkpoints(self.folder)
        self.sequence = int(_NAME.match(existing[-1].name).group(1)) if existing else 0
        best = self.folder / "best.pt"
        if best.is_file():
            try:
                self.best = load_checkpoint(best).get("best_score")
            except Exception:   # unreadable best.pt: the next best epoch replaces it
                self.best = None

    def reset(self) -> None:
        """Forget an earlier run in this folder: remove its numbered checkpoints and ``best.pt`` (main process)."""
        if self.is_main:
            for path in list_checkpoints(self.folder) + [self.folder / "best.pt"]:
                path.unlink(missing_ok=True)
        self.sequence, self.best = 0, None

    def latest(self) -> Optional[Path]:
        files = list_checkpoints(self.folder)
        return files[-1] if files else None

    def load_latest(self, warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> tuple[Path, dict]:
        """The newest checkpoint that loads (older ones are tried when a newer one is unreadable)."""
        files = list_checkpoints(self.folder)
        if not files:
            raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in {self.folder}")
        for path in reversed(files):
            try:
                return path, load_checkpoint(path)
            except Exception as err:  # noqa: BLE001 - any unreadable file: try the previous one
                warn(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); trying the previous one")
        raise FileNotFoundError(f"no readable checkpoint in {self.folder}")

    def save(self, state: dict, event: str, tag: str = "") -> Optional[Path]:
        """Write ``state`` as the next numbered checkpoint (main process only); update ``best.pt``; drop old files.
        Returns the path written (``None`` on other ranks)."""
        score = self.best_key(state, event)
        is_best = score is not None and (self.best is None or score > self.best)
        if is_best:
            state = dict(state, best_score=score)
        if not self.is_main:
            if is_best:
                self.best = score
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sequence += 1
        name = f"ckpt-{self.sequence:06d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', tag or event)}.pt"
        path = save_verified(state, self.folder / name)
        if is_best:
            _link_or_copy(path, self.folder / "best.pt")
            self.best = score
        for old in list_checkpoints(self.folder)[:-self.keep_last]:
            old.unlink(missing_ok=True)
        if self.on_saved is not None:
            self.on_saved(path, state, event)
        return path


def _finetune_top1(state: Mapping, event: str) -> Optional[float]:
    if event != "epoch":
        return None
    history = (state.get("history") or {}).get("finetune") or []
    return history[-1].get("test_acc") if history else None


class CheckpointFile:
    """One checkpoint file, atomically replaced at every save: :class:`CheckpointManager`'s interface for runs that
    keep a single ``checkpoint.pt`` (``tpp prune``)."""

    def __init__(self, path: PathLike, is_main: bool = True):
        self.path, self.is_main = Path(path), is_main

    def reset(self) -> None:
        if self.is_main:
            self.path.unlink(missing_ok=True)

    def latest(self) -> Optional[Path]:
        return self.path if self.path.is_file() else None

    def save(self, state: dict, event: str, tag: str = "") -> Optional[Path]:
        if not self.is_main:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return save_verified(state, self.path)


# ------------------------------------------------------------------------------------------------ RNG states
def rng_state(device: Optional[torch.device] = None) -> dict:
    """This process's RNG states: Python, NumPy (when imported), torch CPU and the CUDA device in use."""
    state: dict = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping, device: Optional[torch.device] = None) -> None:
    """Restore :func:`rng_state`'s output."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
