"""Files that survive crashes, and files that prove their content.

Atomic writes: write beside the target, flush and ``fsync``, rename over it (``os.replace``, atomic on POSIX),
``fsync`` the folder. A crash or kill at any moment leaves the previous file or the complete new one, never a
truncated file; on an error (a full disk included) the temporary file (``.<name>.tmp-<pid>``) is removed and the
target untouched. A killed writer cannot remove its temporary file: :func:`remove_stale_temporaries` does, at the
next run in the folder.

Verified files: :func:`save_verified` stores, beside the content of a dict, :data:`DIGEST_KEY` = the
:func:`content_digest` of the rest (SHA-256 over every tensor's dtype, shape and bytes and every plain value, in the
dict's order); :func:`load_verified` recomputes it and refuses a file whose content changed (a flipped bit, a
truncated or overwritten part) with a ``ValueError`` naming the file. Files without the key (tpp 0.1, early 0.2)
load unverified. Hashing reads every byte once on the writer (about 1 GB/s per core) — hand
:func:`save_verified` CPU tensors when it runs in a background thread.

JSON is strict (:func:`write_json`): non-finite floats are written as ``null``, never as ``NaN``/``Infinity``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional, Union

__all__ = ["fsync_dir", "write_atomic", "atomic_save", "write_text_atomic", "write_json", "strict_json",
           "TEMPORARY", "remove_stale_temporaries", "DIGEST_KEY", "content_digest", "save_verified",
           "load_verified", "verify"]

PathLike = Union[str, os.PathLike]

#: the name of a temporary file of :func:`write_atomic` (``.<name>.tmp-<pid>``; group 1: the target's name)
TEMPORARY = re.compile(r"^\.(.+)\.tmp-\d+$")
#: the key of a verified file's checksum: ``{"sha256": hex, "scheme": DIGEST_SCHEME}``
DIGEST_KEY = "tpp_checksum"
DIGEST_SCHEME = "tpp-content-1"


# -------------------------------------------------------------------------------------------- atomic writes
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


class _Recorded:
    """A binary file that remembers the first ``OSError`` of its ``write``: ``torch.save`` catches it (a full disk)
    and raises a ``RuntimeError`` about zip positions instead; :func:`write_atomic` raises the ``OSError``."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def write_atomic(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary binary file beside ``path``, then rename it over ``path``. Any error (a
    full disk is ``OSError(ENOSPC)``) leaves ``path`` as it was and removes the temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    recorded = None
    try:
        with open(tmp, "wb") as f:
            recorded = _Recorded(f)
            write(recorded)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if recorded is not None and recorded.error is not None and err is not recorded.error:
            raise recorded.error from err
        raise
    fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: PathLike, save: Optional[Callable[[Any, Any], None]] = None) -> Path:
    """``torch.save(obj)`` (or ``save(obj, file)``) to ``path`` atomically."""
    if save is None:
        import torch  # here, not at import: the command line's quick paths write JSON without torch

        save = torch.save
    return write_atomic(path, lambda f: save(obj, f))


def write_text_atomic(path: PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float replaced by ``None`` (tuples become lists)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def write_json(path: PathLike, data: Any) -> Path:
    """``data`` as indented, strict JSON (non-finite numbers as ``null``, anything else unknown as its ``str``) to
    ``path`` atomically: every JSON file of a run."""
    text = json.dumps(strict_json(data), indent=2, default=str, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def remove_stale_temporaries(folder: PathLike, subfolders: Iterable[str] = ()) -> list[Path]:
    """Remove the temporary files killed writers left in ``folder`` and its ``subfolders`` (only names of the
    :data:`TEMPORARY` pattern, only these folders, not recursively). Returns what was removed."""
    folder = Path(folder)
    removed = []
    for where in [folder, *(folder / s for s in subfolders)]:
        if not where.is_dir():
            continue
        for p in where.iterdir():
            if TEMPORARY.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------- verified files
def content_digest(obj: Any) -> str:
    """SHA-256 (hex) of ``obj``: nested dicts (keys and values in order), lists/tuples, tensors (dtype, shape and
    the bytes of their values, read on the CPU) and plain values (None, bool, int, float, str, dtypes, devices)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}{t.layout};".encode())
        if t.layout == torch.strided and t.numel():
            data = t.cpu().contiguous().reshape(-1).view(torch.uint8)
            h.update(memoryview(data.numpy()))
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        text = repr(obj)
        h.update(f"{type(obj).__name__}{len(text)}:{text};".encode())
    else:   # dtypes, devices, ... (what weights_only loading allows): by their type and str
        text = str(obj)
        h.update(f"{type(obj).__name__}{len(text)}:{text};".encode())


def save_verified(obj: Mapping, path: PathLike) -> Path:
    """``torch.save`` the dict ``obj`` plus ``{DIGEST_KEY: {"sha256": content_digest(obj), "scheme": ...}}`` to
    ``path``, atomically. ``obj`` is not modified."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"save_verified writes a dict, got {type(obj).__name__}")
    if DIGEST_KEY in obj:
        obj = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    stamped = {**obj, DIGEST_KEY: {"sha256": content_digest(obj), "scheme": DIGEST_SCHEME}}
    return atomic_save(stamped, path)


def verify(obj: Any, source: str = "checkpoint") -> Any:
    """``obj`` without its :data:`DIGEST_KEY`, after checking it; ``ValueError`` naming ``source`` when the content
    does not match the checksum stored with it. Objects without one are returned as they are."""
    if not isinstance(obj, Mapping) or DIGEST_KEY not in obj:
        return obj
    stored = obj[DIGEST_KEY]
    content = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    if not isinstance(stored, Mapping) or stored.get("scheme") != DIGEST_SCHEME:
        raise ValueError(f"{source} is corrupted or from a newer tpp: unknown checksum {stored!r}")
    if content_digest(content) != stored.get("sha256"):
        raise ValueError(f"{source} is corrupted: its content does not match the SHA-256 checksum stored in it "
                         "(a damaged or partly overwritten file); use another copy or an earlier checkpoint")
    return content


def load_verified(path: PathLike) -> Any:
    """A file of :func:`save_verified` (or any ``torch.save`` file) read on the CPU without executing pickled code
    (``weights_only=True``), checked against its checksum, which is removed. ``FileNotFoundError`` for a missing
    file; ``ValueError`` naming the file for one that cannot be read (truncated, not a torch file) or is corrupted."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling and zip errors come in many types; the first line says which
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} cannot be read (truncated, corrupted or not a torch file): "
                         f"{type(err).__name__}: {first}") from err
    return verify(obj, str(path))
