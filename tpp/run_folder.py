"""What a tpp run folder holds, and how ``--overwrite`` empties one without touching anything else.

``--overwrite`` starts a new run from an empty folder: the files of the earlier run are removed first, so nothing
of it (a stale ``pretrained.pt``, plot, checkpoint or rank digest) can be mistaken for the new run's. For the user's
safety only what a tpp run writes is removed — :data:`RUN_FILES`, the folders :data:`RUN_FOLDERS` holding only the
files tpp puts there, the ``.<name>.tmp-<pid>`` files of interrupted writes — and no link is followed. A folder
holding anything else is refused before anything is removed (:func:`foreign_entries` names what), so a mistyped
``--out`` cannot delete a user's files.
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["RUN_FILES", "RUN_FOLDERS", "foreign_entries", "clear_run_folder", "interrupted_before_checkpoint"]

#: files a ``tpp prune``/``tpp train`` run (and ``tpp export``'s default output) writes at the top of its folder
RUN_FILES = frozenset({"config.json", "args.yaml", "args.json", "metrics.json", "report.md", "strength_penalty.png",
                       "accuracy.png", "jsv.png", "summary.csv", "regularize.csv", "pruned.pt", "pretrained.pt",
                       "checkpoint.pt", "pruned.torchscript.pt", "pruned.onnx"})
#: sub-folders a run writes, and the names of the files it puts in each
RUN_FOLDERS = {"checkpoints": re.compile(r"ckpt-\d{6,}-[A-Za-z0-9_.-]+\.pt|best\.pt|best\.json"),
               "ranks": re.compile(r"rank\d+\.json"),
               "tb": re.compile(r"events\.out\.tfevents\..+")}
_TMP = re.compile(r"\.(.+)\.tmp-\d+")


def _is_file_named(path: Path, allowed) -> bool:
    """A regular file (not a link) whose name, or the target name of its temporary file, is ``allowed``."""
    if path.is_symlink() or not path.is_file():
        return False
    tmp = _TMP.fullmatch(path.name)
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
