"""Host-built launch tables and their caches, shared by the multi-layer kernels.

A launch over many layers reads three kinds of host-built, device-resident tables:

* per-layer metadata (sizes, int64 offsets into flat index and scratch buffers) and the validated pruned sets —
  they depend only on the layer shapes, dtypes and pruned index tensors, so they live in a :class:`Layout` cached
  by :func:`layout` and rebuilt only when a pruned set changes (which is also when the indices are validated,
  a device sync);
* a tile table, one ``(layer, row start, col start)`` row per program, memoized on the layout per block shape;
* address offsets: layer ``l``'s tensor is read as ``anchor + o[l]``, where the anchor is the first tensor of
  the layer's dtype group, passed to the kernel as an ordinary pointer argument, and ``o[l]`` the int64 element
  distance between the two allocations. No copy into a flat buffer, no int→pointer casts; memoized on the data
  pointers, which stay put from step to step for parameters (and mostly for gradients).

Layers are grouped by dtype (a kernel is compiled for one element type): one launch per group and stage.
"""
from collections import OrderedDict
from typing import Callable, Hashable, List, Sequence, Tuple

import torch
from torch import Tensor

from .reference import check_pruned_indices


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
    """Identity and content version of an index tensor. The layout that uses it keeps a reference to it, so its
    memory cannot be reused while the key is cached; in-place writes bump ``_version`` (writes through ``.data``
    do not, and are not detected)."""
    version = None if pruned.is_inference() else pruned._version
    return pruned.data_ptr(), pruned.dtype, tuple(pruned.shape), pruned.stride(), version


def dtype_groups(dtypes: Sequence[torch.dtype]) -> List[List[int]]:
    """Positions grouped by dtype, in order of first appearance."""
    groups = {}
    for i, dtype in enumerate(dtypes):
        groups.setdefault(dtype, []).append(i)
    return list(groups.values())


def flat_views(flat: Tensor, tensors: Sequence[Tensor]) -> List[Tensor]:
    """Consecutive regions of the 1-D ``flat`` viewed with the shapes and strides of the dense ``tensors``."""
    views, offset = [], 0
    for t in tensors:
        views.append(flat.as_strided(t.shape, t.stride(), offset))
        offset += t.numel()
    return views


def table(rows: Sequence[Sequence[int]], width: int, device: torch.device) -> Tensor:
    """``rows`` as a ``[len(rows), width]`` int32 tensor on ``device`` (tile tables: small ints)."""
    return torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width).to(device)


class Layout:
    """What the launches over a list of layers need that changes only with their sizes, dtypes and pruned sets.

    Per layer ``l``: ``sizes[l]`` (``sizes[l][0]`` = N, filters or channels), ``p[l]``, and the kept mask ``m``
    (int8, 1 = kept) at ``m[o_idx[l] : o_idx[l] + N]`` of one flat device buffer; ``groups``: layer positions by
    dtype. Building a layout validates every pruned set (``check_pruned_indices``, a device sync) before anything
    is launched. Subclasses add their metadata; tile tables and address offsets are memoized here.
    """

    def __init__(self, sizes: Sequence[Tuple[int, ...]], dtypes: Sequence[torch.dtype], pruned: Sequence[Tensor],
                 device: torch.device):
        self.pruned = list(pruned)  # keeps the indices alive: their data_ptr is part of the cache key
        self.sizes = list(sizes)
        self.p = [idx.numel() for idx in pruned]
        self.groups = dtype_groups(dtypes)
        self.device = device
        self.o_idx, masks, o_idx = [], [], 0
        for i, (size, idx) in enumerate(zip(sizes, pruned)):
            check_pruned_indices(idx, size[0], f"pruned_idxs[{i}]")
            m = torch.ones(size[0], dtype=torch.int8, device=device)
            m[idx.long()] = 0
            masks.append(m)
            self.o_idx.append(o_idx)
            o_idx += size[0]
        self.m = torch.cat(masks)
        self._tiles = LRU(16)
        self._offsets = LRU(8)

    def tiles(self, key: Hashable, rows: Callable[[], Sequence[Sequence[int]]], width: int) -> Tensor:
        """The tile table ``rows()`` (``width`` ints per program), memoized under ``key``."""
        return self._tiles.get(key, lambda: table(rows(), width, self.device))

    def offsets(self, tensors: Sequence[Tensor]) -> Tensor:
        """int64 ``o`` with ``tensors[i]`` at ``anchor + o[i]`` elements, the anchor being the first tensor of the
        dtype group of layer ``i // k`` (``k = len(tensors) // len(layers)`` tensors per layer, consecutive)."""
        def build():
            k = len(tensors) // len(self.sizes)
            o = [0] * len(tensors)
            for group in self.groups:
                anchor = tensors[k * group[0]]
                for i in (k * layer + j for layer in group for j in range(k)):
                    distance = tensors[i].data_ptr() - anchor.data_ptr()
                    if distance % anchor.element_size():  # only a view at an odd byte offset of a wider buffer
                        raise ValueError(f"tensor {i} is not {anchor.element_size()}-byte aligned with tensor "
                                         f"{k * group[0]} of the same dtype")
                    o[i] = distance // anchor.element_size()
            return torch.tensor(o, dtype=torch.int64).to(self.device)
        return self._offsets.get(tuple(t.data_ptr() for t in tensors), build)


def layout(cache: LRU, cls: type, sizes: Sequence[Tuple[int, ...]], dtypes: Sequence[torch.dtype],
           pruned: Sequence[Tensor], device: torch.device) -> Layout:
    """The cached ``cls(sizes, dtypes, pruned, device)``."""
    key = (cls, device, tuple(sizes), tuple(dtypes), tuple(pruned_key(idx) for idx in pruned))
    return cache.get(key, lambda: cls(sizes, dtypes, pruned, device))
