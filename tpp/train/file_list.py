"""ImageFolder that lists its files once per machine: the ``(path, class)`` list of a split (1.28M files for ImageNet's
``train/``) is cached and reused while the folder's listing is unchanged.

The cache key is the split folder's path; the entry holds a fingerprint — the modification times (ns) of the split
folder and of every class folder, which change whenever a file is added, removed or renamed in them — so a stale
list is never used. A listing changed in the last :data:`SETTLE_S` seconds is not cached: filesystem timestamps are
coarse, and a change within the same tick would not move them. Cache files live in ``$TPP_CACHE_DIR`` (default
``~/.cache/tpp``)/``imagefolder/`` and are written atomically; a cache that cannot be read or written is skipped
(the folder is scanned, as ImageFolder does).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

from torchvision import datasets

from ..files import write_text_atomic

__all__ = ["ListedImageFolder", "cache_dir", "SETTLE_S"]

SETTLE_S = 2.0


def cache_dir() -> Path:
    """Where the file lists are kept: ``$TPP_CACHE_DIR/imagefolder`` (default ``~/.cache/tpp/imagefolder``)."""
    return Path(os.environ.get("TPP_CACHE_DIR") or Path.home() / ".cache" / "tpp") / "imagefolder"


def _fingerprint(directory: Path, classes: dict[str, int]) -> list[int]:
    return [directory.stat().st_mtime_ns] + [(directory / name).stat().st_mtime_ns for name in sorted(classes)]


class ListedImageFolder(datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` whose file list comes from the cache when the folder is unchanged."""

    @staticmethod
    def make_dataset(directory, class_to_idx: dict[str, int], extensions: Optional[tuple[str, ...]] = None,
                     is_valid_file: Optional[Callable[[str], bool]] = None, allow_empty: bool = False):
        directory = Path(directory).resolve()
        options = {"extensions": list(extensions) if extensions else None, "custom_filter": is_valid_file is not None,
                   "allow_empty": allow_empty, "classes": class_to_idx}
        name = hashlib.sha256(json.dumps([str(directory), options], sort_keys=True).encode()).hexdigest()[:32]
        path = cache_dir() / f"{name}.json"
        fingerprint = _fingerprint(directory, class_to_idx)
        if is_valid_file is None:
            try:
                cached = json.loads(path.read_text(encoding="utf-8"))
                if cached["fingerprint"] == fingerprint:
                    return [(str(directory / rel), target) for rel, target in cached["samples"]]
            except (OSError, ValueError, KeyError, TypeError):
                pass
        samples = datasets.ImageFolder.make_dataset(str(directory), class_to_idx, extensions, is_valid_file,
                                                    allow_empty)
        settled = max(fingerprint) < time.time_ns() - SETTLE_S * 1e9
        if is_valid_file is None and settled:       # a custom filter is code: its result cannot be keyed
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                rel = [(os.path.relpath(p, directory), t) for p, t in samples]
                write_text_atomic(path, json.dumps({"fingerprint": fingerprint, "samples": rel}))
            except OSError:
                pass
        return samples
