"""Files that survive crashes: write beside the target, flush and ``fsync``, rename over it (``os.replace``, atomic
on POSIX), ``fsync`` the folder. A crash or kill at any moment leaves the previous file or the complete new one,
never a truncated file; on an error the temporary file (``.<name>.tmp-<pid>``) is removed and the target untouched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["fsync_dir", "atomic_save", "write_text_atomic", "write_json"]

PathLike = Union[str, os.PathLike]


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: PathLike, write: Callable[[Any], None]) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: PathLike, save: Optional[Callable[[Any, Any], None]] = None) -> Path:
    """``torch.save(obj)`` (or ``save(obj, file)``) to ``path`` atomically."""
    if save is None:
        import torch  # here, not at import: the command line's quick paths write JSON without torch

        save = torch.save
    return _atomic_write(path, lambda f: save(obj, f))


def write_text_atomic(path: PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` atomically."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: PathLike, data: Any) -> Path:
    """``data`` as indented JSON (anything else as its ``str``) to ``path`` atomically: every JSON file of a run."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
