"""Host-built launch tables and their caches, shared by the multi-layer kernels.

A multi-layer launch reads three kinds of host-built, device-resident tables:

* per-layer metadata (sizes, int64 offsets into flat index/scratch buffers) and the validated pruned sets — they
  depend on the layer shapes and the pruned index tensors only, so they live in a per-op *layout* object cached on
  :func:`pruned_key` and rebuilt only when a pruned set changes (that is also when the indices are validated, which
  synchronizes with the device);
* a tile table, one ``(layer, row start, col start)`` row per program, memoized on the layout per block shape;
* address offsets: layer ``l``'s tensor is read as ``anchor + o[l]`` where ``anchor`` is the first tensor of the
  list, passed to the kernel as an ordinary pointer argument, and ``o[l]`` is the int64 element distance between the
  two allocations. No copy into a flat buffer, no int→pointer casts; memoized on the data pointers, which stay put
  from step to step for parameters and mostly for gradients.
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
    """Identity and content version of an index tensor. The layout that uses it keeps a reference to it, so its
    memory cannot be reused while the key is cached; in-place writes bump ``_version`` (writes through ``.data``
    do not, and are not detected)."""
    version = None if pruned.is_inference() else pruned._version
    return pruned.data_ptr(), pruned.dtype, tuple(pruned.shape), pruned.stride(), version


def table(rows: Sequence[Sequence[int]], width: int, device: torch.device) -> Tensor:
    """``rows`` as a ``[len(rows), width]`` int32 tensor on ``device`` (tile tables: small ints)."""
    return torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width).to(device)


def offsets_from_anchor(tensors: Sequence[Tensor]) -> List[int]:
    """Element offsets ``o`` with ``tensors[i].data_ptr() == tensors[0].data_ptr() + o[i] * itemsize``."""
    anchor, itemsize = tensors[0].data_ptr(), tensors[0].element_size()
    offsets = []
    for t in tensors:
        distance = t.data_ptr() - anchor
        if distance % itemsize:  # only a tensor viewed at an odd byte offset of a wider buffer gets here
            raise ValueError(f"tensor at {t.data_ptr():#x} is not {itemsize}-byte aligned with the first one")
        offsets.append(distance // itemsize)
    return offsets


class AddressOffsets:
    """Memoized device int64 tensor of :func:`offsets_from_anchor`, keyed on the data pointers."""

    def __init__(self, size: int = 8):
        self._cache = LRU(size)

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        key = tuple(t.data_ptr() for t in tensors)
        device = tensors[0].device
        return self._cache.get(
            key, lambda: torch.tensor(offsets_from_anchor(tensors), dtype=torch.int64).to(device))
