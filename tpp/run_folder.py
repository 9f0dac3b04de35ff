"""What a tpp run folder holds: which folder and checkpoint a command uses (:func:`resolve_out`), and how
``--overwrite`` empties one without touching anything else.

``--overwrite`` starts a new run from an empty folder: the files of the earlier run are removed first, so nothing
of it (a stale ``pretrained.pt``, plot, checkpoint or rank digest) can be mistaken for the new run's. For the user's
safety only what a tpp run writes is removed — :data:`RUN_FILES`, the folders :data:`RUN_FOLDERS` holding only the
files tpp puts there, the ``.<name>.tmp-<pid>`` files of interrupted writes — and no link is followed. A folder
holding anything else is refused before anything is removed (:func:`foreign_entries` names what), so a mistyped
``--out`` cannot delete a user's files.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

from .arguments import UsageError
from .files import TEMPORARY

__all__ = ["RUN_FILES", "RUN_FOLDERS", "foreign_entries", "clear_run_folder", "interrupted_before_checkpoint",
           "resolve_out"]

#: files a ``tpp prune``/``tpp train`` run (and ``tpp export``'s default output) writes at the top of its folder
RUN_FILES = frozenset({"config.json", "args.yaml", "args.json", "metrics.json", "report.md", "strength_penalty.png",
                       "accuracy.png", "jsv.png", "summary.csv", "regularize.csv", "pruned.pt", "pretrained.pt",
                       "checkpoint.pt", "pruned.torchscript.pt", "pruned.onnx"})
#: sub-folders a run writes, and the names of the files it puts in each
RUN_FOLDERS = {"checkpoints": re.compile(r"ckpt-\d{6,}-[A-Za-z0-9_.-]+\.pt|best\.pt|best\.json"),
               "ranks": re.compile(r"rank\d+\.json"),
               "tb": re.compile(r"events\.out\.tfevents\..+")}


def _is_file_named(path: Path, allowed) -> bool:
    """A regular file (not a link) whose name, or the target name of its temporary file, is ``allowed``."""
    if path.is_symlink() or not path.is_file():
        return False
    tmp = TEMPORARY.match(path.name)
    return allowed(tmp.group(1) if tmp else path.name)


def _own(path: Path) -> bool:
    if path.name in RUN_FOLDERS and path.is_dir() and not path.is_symlink():
        pattern = RUN_FOLDERS[path.name]
        return all(_is_file_named(p, pattern.fullmatch) for p in path.iterdir())
    return _is_file_named(path, RUN_FILES.__contains__)


def foreign_entries(out: Path) -> list[str]:
    """The entries of folder ``out`` a tpp run does not write, sorted (``[]``: a run folder, an empty or absent
    one)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not _own(p))


def clear_run_folder(out: Path) -> None:
    """Remove everything a tpp run wrote in ``out``; raise ``FileExistsError`` naming the entries it did not write
    (then nothing is removed)."""
    out = Path(out)
    foreign = foreign_entries(out)
    if foreign:
        raise FileExistsError(f"{out} holds files a tpp run does not write: {', '.join(foreign[:5])}"
                              + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""))
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.is_dir():
            for p in entry.iterdir():
                p.unlink()
            entry.rmdir()
        else:
            entry.unlink()


def interrupted_before_checkpoint(out: Path, settings_files) -> bool:
    """Whether ``out`` holds a run that was stopped before its first checkpoint: its settings were written (one of
    ``settings_files``), it holds only what a run writes, and no ``metrics.json`` (a finished run). Such a run has
    nothing to resume from: ``--resume auto`` starts it again (same settings, same result)."""
    out = Path(out)
    return (any((out / name).is_file() for name in settings_files) and not (out / "metrics.json").exists()
            and not foreign_entries(out))


def resolve_out(args, layout, default_name: str, env) -> tuple[Path, Optional[Path]]:
    """The run folder and the checkpoint to resume of a command (``args``: its flags, ``layout``: its
    :class:`tpp.command.Layout`): rank 0 decides, every rank gets its answer; a folder the command may not use is a
    :class:`~tpp.arguments.UsageError` naming why."""
    from .train import distributed as D
    from .train.checkpoint import list_checkpoints

    answer: dict = {}
    if env.is_main:
        try:
            series = layout.checkpoints == "series"
            if args.out:
                out = Path(args.out)
            elif args.resume and args.resume != "auto":
                out = Path(args.resume).resolve().parent.parent if series else Path(args.resume).parent
            else:
                out = Path("runs") / f"{default_name.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
            if out.exists() and not out.is_dir():
                raise UsageError(f"--out {out} exists and is not a folder")
            _check_writable(out)
            existing = list_checkpoints(out / "checkpoints") if series else \
                [p for p in (out / "checkpoint.pt",) if p.is_file()]
            resume = None
            non_empty = out.is_dir() and any(out.iterdir())
            if args.resume == "auto":
                resume = existing[-1] if existing else None
                if resume is None and non_empty and not args.overwrite \
                        and not interrupted_before_checkpoint(out, layout.settings_files):   # a finished run
                    raise UsageError(f"--out {out} holds no checkpoint to resume and is not empty; choose another "
                                     "folder, or pass --overwrite to start a new run there")
            elif args.resume:
                resume = Path(args.resume)
                if not resume.is_file():
                    raise UsageError(f"--resume {resume}: no such file (the checkpoint of a run folder, or "
                                     "--resume auto)")
            elif non_empty and not args.overwrite:
                hint = ("it holds checkpoints of a run: pass --resume auto to continue it, or --overwrite to start "
                        "over" if existing else "choose another folder, or pass --overwrite to replace the tpp run "
                                                "in it")
                raise UsageError(f"--out {out} exists and is not empty; {hint}")
            foreign = foreign_entries(out) if resume is None and non_empty else []
            if foreign:
                raise UsageError(f"--overwrite --out {out}: it holds files a tpp run does not write "
                                 f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); --overwrite removes "
                                 "only an earlier run's files: move these, or choose another folder")
            answer = {"out": str(out), "resume": str(resume) if resume else None}
        except UsageError as err:
            answer = {"error": str(err)}
    answer = D.broadcast_object(answer, env)
    if "error" in answer:
        raise UsageError(answer["error"])
    return Path(answer["out"]), Path(answer["resume"]) if answer["resume"] else None


def _check_writable(out: Path) -> None:
    """``out`` (or the folder it will be created in) is a folder this process may write in."""
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: no permission to write in {parent}")
