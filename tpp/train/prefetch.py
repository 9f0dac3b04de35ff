"""Batches onto the device: uint8 images normalized there, and the next batch copied while the current one computes.

* :class:`Normalize`: uint8 images (``[C, H, W]`` or ``[N, C, H, W]``, any memory format) to float32
  ``(x / 255 − mean) / std`` on their own device, by the float32 operations of torchvision's ``ToTensor`` then
  ``Normalize`` (convert, ``div 255``, ``sub mean``, ``div std``; each correctly rounded on CPU and CUDA), so the
  result is bitwise what the CPU transforms gave. Floating inputs pass through. The output keeps the input's memory
  format (the loaders' batches are channels_last). It is float32, not the autocast dtype: autocast casts at the first
  layer anyway, and the callers outside autocast (Jacobian, FLOP count) need float32.
* :func:`prefetch`: the batches of an iterable with their tensors on the device. On CUDA the next batch is copied
  on a side stream (from pinned memory, ``non_blocking``) while the current one computes; before a batch is handed
  over the compute stream waits for its copy and its tensors are recorded on the compute stream (so the caching
  allocator does not reuse them while it still reads them). Elsewhere it is a pass-through. The order is the
  iterable's; a batch counts as used when it is handed over, so a resumed pass starts at the first batch not handed
  over (the one in flight is read again).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["Normalize", "prefetch"]


class Normalize:
    """uint8 images to float32 ``(x / 255 − mean) / std`` (per channel); floating inputs are returned as they are."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or any(s == 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std no zero, got {mean} and {std}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"

    def __getstate__(self) -> dict:
        """Pickled (into loader workers with the dataset) without the per-device copies of the statistics."""
        return {"mean": self.mean, "std": self.std, "_stats": {}}

    def __call__(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            return x
        if x.dtype != torch.uint8:
            raise TypeError(f"Normalize takes uint8 images (or floating ones, passed through), got {x.dtype}")
        if x.dim() not in (3, 4) or x.shape[-3] != len(self.mean):
            raise ValueError(f"Normalize takes [C, H, W] or [N, C, H, W] images with C = {len(self.mean)}, "
                             f"got shape {tuple(x.shape)}")
        mean, std = self._on(x.device)
        return x.to(torch.float32).div_(255).sub_(mean).div_(std)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._stats:
            as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)  # noqa: E731
            self._stats[device] = as_tensor(self.mean), as_tensor(self.std)
        return self._stats[device]


def prefetch(batches: Iterable, device: torch.device) -> Iterator:
    """The batches of ``batches`` (tuples or lists; their tensors moved to ``device``, other items as they are),
    the next one copied on a side CUDA stream while the current one is used (see the module docstring)."""
    device = torch.device(device)
    if device.type != "cuda":
        yield from batches
        return
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.Stream(device)
    source = iter(batches)
    pending = _copy(next(source, None), stream, device)
    while pending is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        for item in pending:
            if isinstance(item, Tensor):
                item.record_stream(current)
        batch = pending
        pending = _copy(next(source, None), stream, device)
        yield batch


def _copy(batch, stream: torch.cuda.Stream, device: torch.device):
    """``batch`` with its tensors copied to ``device`` on ``stream`` (pinned first when they are not)."""
    if batch is None:
        return None
    with torch.cuda.stream(stream):
        moved = [_to(item, device) if isinstance(item, Tensor) else item for item in batch]
    return tuple(moved) if isinstance(batch, tuple) else moved


def _to(t: Tensor, device: torch.device) -> Tensor:
    if t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
