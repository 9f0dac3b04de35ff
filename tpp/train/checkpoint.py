"""Checkpoint files that survive crashes: atomic writes, a numbered series with the last ``k`` kept, and ``best.pt``.

A checkpoint is written to a temporary file in the same folder, flushed and ``fsync``-ed, then renamed over its
final name (``os.replace``, atomic on POSIX) and the folder entry is ``fsync``-ed: a crash or a kill at any moment
leaves either the previous files or the new complete one, never a truncated file under a checkpoint's name.
Temporary files a killed writer left behind are removed when a :class:`CheckpointManager` opens the folder. Every
checkpoint carries a SHA-256 checksum of its content (:func:`tpp.files.save_verified`), checked by
:func:`load_checkpoint`: a damaged file is a ``ValueError`` naming it, never a silently different run.

Files: ``ckpt-<sequence>-<stage>-<position>.pt`` (sequence numbers increase across resumes; the newest is what
``--resume auto`` continues from), ``best.pt`` (the checkpoint with the best finetuning top-1 so far, a hard link
to the numbered file when the filesystem allows it) and ``best.json`` (its score, written atomically after
``best.pt``: start-up reads this number, not the model; a folder without it, or with one older than ``best.pt``
— a writer killed between the two renames — falls back to reading ``best.pt``). Only rank 0 writes; every rank reads.

Background writing (``background=True``): ``save`` takes a :func:`snapshot` of the state — every tensor copied to
host memory (pinned for CUDA tensors, one synchronisation; the previous snapshot's buffers are reused, so one
checkpoint's worth of host memory stays allocated), every container copied — and returns; a writer thread
then does what a synchronous save does (the file, ``best.pt``/``best.json``, the old files dropped, ``on_saved``).
The training loop is blocked for the snapshot only, and may change the model right after. One write is in flight at
a time: a ``save`` while one is pending first waits for it (no coalescing: every checkpoint asked for is written, in
order, so ``--resume auto`` always finds the newest one the run reached). An error of the writer is raised by the
next ``save``, :meth:`~CheckpointManager.wait` or :meth:`~CheckpointManager.close` — never swallowed; the run waits
for the pending write before it evaluates, removes filters, ends, or stops (``close``).

What a checkpoint holds is :mod:`tpp.pipeline`'s run state (model, optimizer, LR scheduler, regularizer state, stage,
iteration/epoch, data position, history, metrics, torch RNG, the run's :class:`tpp.identity.RunIdentity`) plus the
engine's (GradScaler, every rank's RNG states). :class:`CheckpointFile` is the one-file variant (``tpp prune``'s
``checkpoint.pt``, replaced at every save) with the same interface.
"""
from __future__ import annotations

import copy
import os
import random
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch

from ..files import atomic_save, fsync_dir, load_verified, remove_stale_temporaries, save_verified, write_json
from ..identity import CheckpointMismatch

__all__ = ["atomic_save", "CheckpointManager", "CheckpointFile", "CheckpointMismatch", "rng_state", "set_rng_state",
           "list_checkpoints", "load_checkpoint", "read_best_score", "snapshot", "BackgroundWriter"]

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


def _write(state: Mapping, path: Path) -> Path:
    """The one place a checkpoint file is written (atomically, with its checksum)."""
    return save_verified(state, path)


def snapshot(obj, into=None):
    """A deep copy of ``obj`` in host memory: tensors copied to the CPU (into pinned memory for CUDA tensors, then
    one synchronisation), dicts, lists and tuples rebuilt, anything else ``copy.deepcopy``-ed. Nothing of the result
    shares memory with ``obj``: training may go on changing it at once.

    ``into``: an earlier snapshot no longer in use; its tensors are reused where the same place holds a tensor of the
    same shape, dtype and strides (no allocation, no page faults: the copy is all that is left)."""
    pending: list = []

    def copy_of(x, old):
        if isinstance(x, torch.Tensor):
            x = x.detach()
            pinned = x.device.type == "cuda"
            same = isinstance(old, torch.Tensor) and old.is_pinned() == pinned and \
                (old.shape, old.dtype, old.stride()) == (x.shape, x.dtype, x.stride())
            if same:
                out = old
            else:
                out = torch.empty_like(x, device="cpu", pin_memory=pinned)      # dense x: the same strides
            out.copy_(x, non_blocking=pinned)
            if pinned:
                pending.append(x.device)
            return out
        if isinstance(x, dict):
            old = old if isinstance(old, dict) else {}
            return type(x)((k, copy_of(v, old.get(k))) for k, v in x.items())
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            old = old if isinstance(old, (list, tuple)) and len(old) == len(x) else [None] * len(x)
            items = [copy_of(v, o) for v, o in zip(x, old)]
            return items if isinstance(x, list) else tuple(items)
        return copy.deepcopy(x)

    out = copy_of(obj, into)
    for device in set(pending):
        torch.cuda.synchronize(device)
    return out


class BackgroundWriter:
    """Runs one job at a time in a thread. ``submit(job)`` first waits for the job in flight; ``wait()`` blocks until
    none is in flight and raises the error of the last job, if it failed (once: the error is then cleared)."""

    def __init__(self, name: str = "tpp-checkpoint-writer"):
        self.name = name
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = err

        # not a daemon: an interpreter that exits without wait() still finishes the file it is writing
        self._thread = threading.Thread(target=run, name=self.name)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def read_best_score(folder: PathLike) -> Optional[float]:
    """The score of ``folder``'s ``best.pt``: from ``best.json`` when it is there and not older than ``best.pt``,
    else (a folder of an older tpp, or a writer killed between the two files) from ``best.pt`` itself; ``None``
    without a readable one."""
    folder = Path(folder)
    best, note = folder / "best.pt", folder / "best.json"
    try:
        if note.is_file() and (not best.exists() or note.stat().st_mtime_ns >= best.stat().st_mtime_ns):
            import json

            return json.loads(note.read_text(encoding="utf-8"))["best_score"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if best.is_file():
        try:
            return load_checkpoint(best).get("best_score")
        except Exception:   # noqa: BLE001 - unreadable best.pt: the next best epoch replaces it
            return None
    return None


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
    """Numbered, atomically written checkpoints in ``folder``: keep the newest ``keep_last``, ``best.pt`` and
    ``best.json``.

    ``save(state, event)`` writes on the main process only (``is_main``); ``latest()`` is the newest complete file.
    ``best_key(state) -> float | None`` reads the score deciding ``best.pt`` (higher is better; default: the last
    finetuning epoch's test top-1 on ``"epoch"`` events). With ``background=True`` the write happens in a thread
    after a host-memory :func:`snapshot` (module docstring); call :meth:`close` before the process ends.
    """

    def __init__(self, folder: PathLike, keep_last: int = 2, is_main: bool = True,
                 best_key: Optional[Callable[[Mapping, str], Optional[float]]] = None,
                 on_saved: Optional[Callable[[Path, Mapping, str], None]] = None, background: bool = False):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        self.folder = Path(folder)
        self.keep_last, self.is_main = keep_last, is_main
        self.best_key = best_key or _finetune_top1
        self.on_saved = on_saved
        self.writer = BackgroundWriter() if background else None
        self.previous: Optional[dict] = None        # the last snapshot: its host memory is reused by the next one
        if is_main:
            remove_stale_temporaries(self.folder)    # left by a writer killed mid-save
        existing = list_checkpoints(self.folder)
        self.sequence = int(_NAME.match(existing[-1].name).group(1)) if existing else 0
        self.best: Optional[float] = read_best_score(self.folder)

    def reset(self) -> None:
        """Forget an earlier run in this folder: remove its numbered checkpoints, ``best.pt`` and ``best.json`` (main
        process)."""
        self.wait()
        if self.is_main:
            for path in list_checkpoints(self.folder) + [self.folder / "best.pt", self.folder / "best.json"]:
                path.unlink(missing_ok=True)
        self.sequence, self.best = 0, None

    def wait(self) -> None:
        """Block until the pending background write is done; raise its error if it failed."""
        if self.writer is not None:
            self.writer.wait()

    close = wait

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
        """Write ``state`` as the next numbered checkpoint (main process only); update ``best.pt`` and ``best.json``;
        drop old files. Returns the path written — in the background: the path being written — (``None`` on other
        ranks). Raises the error of the previous background write, if it failed (before anything of this one)."""
        self.wait()
        score = self.best_key(state, event)
        is_best = score is not None and (self.best is None or score > self.best)
        if is_best:
            state = dict(state, best_score=score)
            self.best = score
        if not self.is_main:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sequence += 1
        path = self.folder / f"ckpt-{self.sequence:06d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', tag or event)}.pt"
        if self.writer is None:
            self._store(state, path, event, score if is_best else None)
        else:
            state = self.previous = snapshot(state, self.previous)
            self.writer.submit(lambda: self._store(state, path, event, score if is_best else None))
        return path

    def _store(self, state: Mapping, path: Path, event: str, best: Optional[float]) -> None:
        _write(state, path)
        if best is not None:
            _link_or_copy(path, self.folder / "best.pt")
            write_json(self.folder / "best.json", {"best_score": best, "checkpoint": path.name})
        for old in list_checkpoints(self.folder)[:-self.keep_last]:
            old.unlink(missing_ok=True)
        if self.on_saved is not None:
            self.on_saved(path, state, event)


def _finetune_top1(state: Mapping, event: str) -> Optional[float]:
    if event != "epoch":
        return None
    history = (state.get("history") or {}).get("finetune") or []
    return history[-1].get("test_acc") if history else None


class CheckpointFile:
    """One checkpoint file, atomically replaced at every save: :class:`CheckpointManager`'s interface (background
    writing included) for runs that keep a single ``checkpoint.pt`` (``tpp prune``)."""

    def __init__(self, path: PathLike, is_main: bool = True, background: bool = False):
        self.path, self.is_main = Path(path), is_main
        self.writer = BackgroundWriter() if background else None
        self.previous: Optional[dict] = None

    def reset(self) -> None:
        self.wait()
        if self.is_main:
            self.path.unlink(missing_ok=True)

    def wait(self) -> None:
        """Block until the pending background write is done; raise its error if it failed."""
        if self.writer is not None:
            self.writer.wait()

    close = wait

    def latest(self) -> Optional[Path]:
        return self.path if self.path.is_file() else None

    def save(self, state: dict, event: str, tag: str = "") -> Optional[Path]:
        self.wait()
        if not self.is_main:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.writer is None:
            return _write(state, self.path)
        state = self.previous = snapshot(state, self.previous)
        self.writer.submit(lambda: _write(state, self.path))
        return self.path


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
