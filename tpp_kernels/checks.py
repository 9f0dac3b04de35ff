"""Argument checks of every backend (Triton ops, CUDA bindings), run before any launch: they read only metadata (no
device sync), so they also run under ``torch.compile``. Index *values* (range, duplicates) are checked once per
pruned set (``tpp_kernels.reference.check_pruned_indices``, which synchronizes): by the Triton backend when its
launch tables are built, by the CUDA backend through :func:`index_values_once`."""
import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import INPUT_PRECISIONS
from .reference import REDUCTIONS, VARIANTS, check_pruned_indices
from .tables import pruned_key

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def options(variant: str, reduction: str, input_precision: Optional[str]) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if input_precision is not None and input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be None or one of {INPUT_PRECISIONS}, got {input_precision!r}")


def tensor_list(values, name: str, optional: bool = False) -> List[Optional[Tensor]]:
    """``values`` as a list of tensors (``None`` entries allowed when ``optional``)."""
    if isinstance(values, Tensor) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(values).__name__}")
    for i, t in enumerate(values):
        if not isinstance(t, Tensor) and not (optional and t is None):
            raise TypeError(f"{name}[{i}] must be a tensor{' or None' if optional else ''}, got {type(t).__name__}")
    return list(values)


def same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")


def floating(t: Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}"
                        " (use tpp_kernels.reference for other dtypes)")


def same_device(t: Tensor, device: torch.device, name: str) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors of one call share a device)")


def pruned_indices(idx: Tensor, n: int, device: torch.device, name: str) -> None:
    """Metadata half of ``check_pruned_indices``: integer dtype, 1-D, at most ``n`` entries, on ``device``."""
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of filter indices, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of filter indices, got shape {tuple(idx.shape)}")
    if idx.numel() > n:
        raise ValueError(f"{name} has {idx.numel()} indices for a layer of {n} filters")
    same_device(idx, device, name)


def rows_dense(t: Tensor) -> bool:
    """Whether each of the ``t.shape[0]`` rows occupies its own contiguous ``D`` elements, row ``i`` at ``i·D``
    (true for contiguous and channels-last weights). Kernels read a row in memory order: the gram penalty is
    invariant to one permutation of ``D`` shared by all rows, and gradients are written back in that same order."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape[1:], t.stride()[1:]) if s != 1),
                               key=lambda size_stride: size_stride[1]):
        if stride != expected:
            return False
        expected *= size
    return t.shape[0] <= 1 or t.stride(0) == expected


def layers(weights, pruned, weights_name: str, pruned_name: str, min_dim: int,
           max_dim: Optional[int] = None) -> Tuple[List[Tensor], List[Tensor]]:
    """Check per-layer tensors ``[N, ...]`` with ``min_dim`` to ``max_dim`` dims and their pruned index tensors."""
    weights = tensor_list(weights, weights_name)
    pruned = tensor_list(pruned, pruned_name)
    same_length(weights, pruned, weights_name, pruned_name)
    for i, (w, idx) in enumerate(zip(weights, pruned)):
        floating(w, f"{weights_name}[{i}]")
        if w.dim() < min_dim or (max_dim is not None and w.dim() > max_dim):
            dims = f"{min_dim}" if min_dim == max_dim else f"at least {min_dim}"
            raise ValueError(f"{weights_name}[{i}] must have {dims} dims, got shape {tuple(w.shape)}")
        same_device(w, weights[0].device, f"{weights_name}[{i}]")
        pruned_indices(idx, w.shape[0], weights[0].device, f"{pruned_name}[{i}]")
    return weights, pruned


def vectors(values, pruned: Sequence[Tensor], name: str, pruned_name: str) -> List[Optional[Tensor]]:
    """Check optional 1-D per-layer vectors (a BatchNorm's γ or β; ``None``: absent) against their pruned sets."""
    values = tensor_list(values, name, optional=True)
    same_length(values, pruned, name, pruned_name)
    device = next((v.device for v in values if v is not None), None)
    for i, (v, idx) in enumerate(zip(values, pruned)):
        if v is None:
            continue
        floating(v, f"{name}[{i}]")
        if v.dim() != 1:
            raise ValueError(f"{name}[{i}] must have 1 dims, got shape {tuple(v.shape)}")
        same_device(v, device, f"{name}[{i}]")
        pruned_indices(idx, v.shape[0], device, f"{pruned_name}[{i}]")
    return values


def like(tensors, reference: Sequence[Tensor], name: str, reference_name: str) -> List[Tensor]:
    """Check one tensor per reference tensor, with its shape, dtype and device."""
    tensors = tensor_list(tensors, name)
    same_length(tensors, reference, name, reference_name)
    for i, (t, ref) in enumerate(zip(tensors, reference)):
        matches(t, ref, f"{name}[{i}]", f"{reference_name}[{i}]")
    return tensors


def matches(t: Tensor, ref: Tensor, name: str, reference_name: str) -> None:
    """``t`` has the shape, dtype and device of ``ref``."""
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, {reference_name} {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, {reference_name} {ref.dtype}")
    same_device(t, ref.device, name)


def dense_like(tensors, reference: Sequence[Tensor], name: str, reference_name: str) -> List[Tensor]:
    """Check gradient buffers updated in place: :func:`like`, and rows dense."""
    tensors = like(tensors, reference, name, reference_name)
    for i, t in enumerate(tensors):
        dense(t, f"{name}[{i}]")
    return tensors


def dense(t: Tensor, name: str) -> None:
    """``t`` can be updated in place by the kernels (:func:`rows_dense`)."""
    if not rows_dense(t):
        raise ValueError(f"{name} must be dense (contiguous or channels-last) to be updated in place")


def scale(value: Union[float, Tensor], device: torch.device) -> Tuple[float, Optional[Tensor]]:
    """A python number, or a 0-d floating tensor on ``device`` (read by the kernel: no host sync)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"scale must be a python float or a 0-d floating tensor, got {value.dtype} "
                             f"of shape {tuple(value.shape)}")
        same_device(value, device, "scale")
        return 1.0, value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"scale must be a finite python float or a 0-d tensor, got {value!r}")
    return float(value), None


def index_values(tensors: Sequence[Tensor], pruned: Sequence[Tensor]) -> None:
    """Range and distinctness of every pruned set (syncs; the kernels' layouts run it once per pruned set)."""
    for i, (t, idx) in enumerate(zip(tensors, pruned)):
        check_pruned_indices(idx, t.shape[0], f"pruned_idxs[{i}]")


_checked: "OrderedDict[tuple, Tensor]" = OrderedDict()


def index_values_once(layers: Sequence[Tuple[int, int, Tensor]]) -> None:
    """:func:`index_values` for ``(position, N, indices)`` triples, once per :func:`~tpp_kernels.tables.pruned_key`
    (content on the CPU; identity and version on a device, a sync there the first time). Skipped while compiling:
    the ops then check on their own."""
    if torch.compiler.is_compiling():
        return
    for i, n, idx in layers:
        key = (pruned_key(idx), idx.device, n)
        if key in _checked:
            _checked.move_to_end(key)
            continue
        check_pruned_indices(idx, n, f"pruned_idxs[{i}]")
        _checked[key] = idx  # holding the tensor keeps its memory from being reused under the same data_ptr
        if len(_checked) > 1024:
            _checked.popitem(last=False)


def _extent(t: Tensor) -> Tuple[int, int]:
    """The bytes ``[start, end)`` that ``t``'s elements span (empty for no elements)."""
    start, numel = t.data_ptr(), t.numel()
    if numel == 0 or t.is_contiguous():
        return start, start + numel * t.element_size()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _same_view(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def disjoint_outputs(inputs: Sequence[Tensor], outputs: Sequence[Tensor], input_names: Sequence[str],
                     output_names: Sequence[str], twins: Sequence[bool] = ()) -> None:
    """Refuse outputs (updated in place) that overlap in memory any input or another output: the kernels read
    every input while adding into the outputs, and add into each output from many programs. ``twins[i]``: output
    ``i`` may be the very tensor another twin output is when their inputs are the same tensor too (a vector listed
    twice with disjoint index sets). Byte ranges, sorted: no device work. A ``ValueError`` names the pair. Skipped
    while compiling (traced tensors have no addresses; the Triton ops check inside their plans, on real tensors)."""
    if torch.compiler.is_compiling():
        return
    items = [(*_extent(t), False, i) for i, t in enumerate(inputs)]  # (start, end, is_output, position)
    seen = {}
    for i, t in enumerate(outputs):
        if i < len(twins) and twins[i]:
            key = (t.data_ptr(), tuple(t.shape), t.stride())
            twin = seen.setdefault(key, i)
            if twin != i and _same_view(inputs[i], inputs[twin]):
                continue
        items.append((*_extent(t), True, i))
    items.sort(key=lambda item: (item[0], not item[2]))
    last_in = last_out = None
    for start, end, is_output, i in items:
        if start == end:
            continue
        for last in (last_out, last_in if is_output else None):
            if last is not None and start < last[1]:
                if is_output:  # the output named first: this one, else the earlier one (inputs meet outputs only)
                    out_name = output_names[i]
                    other_name = output_names[last[3]] if last[2] else input_names[last[3]]
                else:
                    out_name, other_name = output_names[last[3]], input_names[i]
                raise ValueError(f"{out_name} shares memory with {other_name}: gradients are added in place while "
                                 "every input is read, so each gradient needs memory of its own (not a weight, not "
                                 "another gradient)")
        if is_output and (last_out is None or end > last_out[1]):
            last_out = (start, end, is_output, i)
        if not is_output and (last_in is None or end > last_in[1]):
            last_in = (start, end, is_output, i)
