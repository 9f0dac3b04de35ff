"""Caches and grouping shared by the kernels' host side.

* :class:`LRU`: a small least-recently-used map (the functional ops keep their plans in one);
* :func:`pruned_key` / :func:`tensors_key`: what a cached plan depends on — the tensors' addresses, layouts and
  dtypes, and the index tensors' content (CPU) or identity and content version (device);
* :func:`dtype_groups`: layers grouped by dtype (a kernel is compiled for one element type: one launch per group).
"""
from collections import OrderedDict
from typing import Callable, Hashable, List, Sequence, Tuple

import torch
from torch import Tensor


class LRU:
    """A small least-recently-used map: ``get(key, build)`` returns the cached value or stores ``build()``."""

    def __init__(self, size: int):
        self._size = size
        self._items: "OrderedDict[Hashable, object]" = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], object]):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = build()
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


def pruned_key(pruned: Tensor) -> Tuple:
    """What a plan built from an index tensor depends on. CPU indices (a few bytes): their content, so no write
    can leave a cached plan stale. Device indices (reading them would sync): their identity and content version —
    the plan that uses them keeps a reference, so their memory cannot be reused while the key is cached; in-place
    writes bump ``_version``, writes that bypass it (``.data``, DLPack, ``inference_mode``) are not seen: pass
    a new index tensor after such a write."""
    if pruned.device.type == "cpu":
        return pruned.dtype, tuple(pruned.shape), pruned.numpy().tobytes()
    version = None if pruned.is_inference() else pruned._version
    return pruned.data_ptr(), pruned.dtype, tuple(pruned.shape), pruned.stride(), version


def tensors_key(tensors: Sequence[Tensor], pruned: Sequence[Tensor]) -> Tuple:
    """Addresses, layouts and dtypes of ``tensors`` and :func:`pruned_key` of their index tensors: what a cached
    plan over them depends on (the plan holds the tensors, so no other tensor can take their addresses)."""
    return (tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors),
            tuple(pruned_key(idx) for idx in pruned))


def dtype_groups(dtypes: Sequence[torch.dtype]) -> List[List[int]]:
    """Positions grouped by dtype, in order of first appearance."""
    groups = {}
    for i, dtype in enumerate(dtypes):
        groups.setdefault(dtype, []).append(i)
    return list(groups.values())
