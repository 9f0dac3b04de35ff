"""The CUDA C++ backend: ``torch.ops.tpp_cuda.*`` from ``csrc/``, with the same functions as ``tpp_kernels``.

Math (tpp-method.md §2), one layer: ``W ∈ R^{N×D}``, pruned rows ``P``, ``R = W_P Wᵀ``, ``m_j = 0`` for ``j ∈ P``:
``L_gram = s·Σ (1 + m_j) R_ij²`` (``s = 1/N²`` for "mean", 1 for "sum"), rows P of its gradient ``4s·R W``, rows K
``4s·R[:, K]ᵀ W_P``; ``L_bn = Σ_{j∈P} γ_j² + β_j²``. ``csrc/tpp_ops.cpp`` says how the work is split between
cuBLAS GEMMs and multi-layer kernels, and how many launches each op takes.

Public functions (all layers of a call together; weights float32/float16/bfloat16, CPU or CUDA):

* ``gram_penalty(weight, pruned_idx, ...)`` / ``gram_penalty_multi(weights, pruned_idxs, ...)`` — differentiable;
* ``add_gram_penalty_grad_(weights, grads, pruned_idxs, scale, ...)`` — the same gradient added into ``grads``;
* ``bn_penalty(gammas, betas, pruned_idxs)`` / ``add_bn_penalty_grad_(...)`` — the BatchNorm term.

The library is loaded at import: ``tpp/_C`` when setup.py built it (``TPP_BUILD_CUDA=1``), else the just-in-time
build of :mod:`tpp.cuda_build` (compiled on first use, then cached). If neither works, importing this module raises
``ImportError`` saying why. Autograd and the fake (meta) kernels of the ops are registered here, in Python, so that
``torch.compile`` sees symbolic shapes; the C++ side has the CPU and CUDA kernels.
"""
from __future__ import annotations

import importlib.util
import math
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import cuda_build, reference

__all__ = ["gram_penalty", "gram_penalty_multi", "add_gram_penalty_grad_", "bn_penalty", "add_bn_penalty_grad_",
           "build", "library_path", "has_cuda_kernels"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load() -> str:
    """Load ``tpp._C`` (refusing one built from other sources than csrc/), else the just-in-time build."""
    spec = importlib.util.find_spec("tpp._C")
    if spec is not None and spec.origin:
        torch.ops.load_library(spec.origin)
        built, current = torch.ops.tpp_cuda.source_hash(), None
        if cuda_build.SOURCE_DIR.is_dir():
            current = cuda_build.source_hash()
        if current is not None and built != current:
            raise ImportError(f"{spec.origin} was built from other sources than {cuda_build.SOURCE_DIR} "
                              f"({built} != {current}): rebuild it (TPP_BUILD_CUDA=1 pip install "
                              f"--no-build-isolation -e .) or delete it to use the just-in-time build")
        return spec.origin
    if not cuda_build.SOURCE_DIR.is_dir():
        raise ImportError(f"the tpp_cuda extension is not built and its sources ({cuda_build.SOURCE_DIR}) are "
                          f"missing: install tpp from a source checkout with TPP_BUILD_CUDA=1")
    try:
        path = cuda_build.build()
    except cuda_build.BuildError as e:
        raise ImportError(f"the tpp_cuda extension is neither built nor buildable here: {e}") from e
    torch.ops.load_library(str(path))
    return str(path)


library_path = _load()
_ops = torch.ops.tpp_cuda
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("tpp_cuda::gram_penalty_fwd", "CUDA")


def has_cuda_kernels() -> bool:
    """Whether the loaded library has its CUDA kernels (it is CPU-only when built without a CUDA toolkit)."""
    return _HAS_CUDA_KERNELS


def build(verbose: bool = False) -> Path:
    """Build the extension for the current sources unless that build exists (:func:`tpp.cuda_build.build`);
    a new build takes effect in new processes — the library loaded by this one stays."""
    return cuda_build.build(verbose=verbose)


# ----------------------------------------------------------------------------------------------------------------
# Fake kernels and autograd of the ops
# ----------------------------------------------------------------------------------------------------------------


@torch.library.register_fake("tpp_cuda::gram_penalty_fwd")
def _(weights, pruned, mean):
    r_numel = sum(idx.shape[0] * w.shape[0] for w, idx in zip(weights, pruned))
    return weights[0].new_empty((), dtype=torch.float32), weights[0].new_empty(r_numel, dtype=torch.float32)


@torch.library.register_fake("tpp_cuda::gram_penalty_bwd")
def _(grad, weights, pruned, r, mean):
    return [torch.empty_like(w) for w in weights]


@torch.library.register_fake("tpp_cuda::gram_penalty_add_grad")
def _(weights, grads, pruned, scale, scale_tensor, mean):
    return None


@torch.library.register_fake("tpp_cuda::bn_penalty_fwd")
def _(values, pruned):
    return values[0].new_empty((), dtype=torch.float32)


@torch.library.register_fake("tpp_cuda::bn_penalty_bwd")
def _(grad, values, pruned):
    return [torch.empty_like(v) for v in values]


@torch.library.register_fake("tpp_cuda::bn_penalty_add_grad")
def _(values, grads, pruned, scale, scale_tensor):
    return None


def _gram_setup_context(ctx, inputs, output):
    weights, pruned, mean = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], *weights, *pruned)
    ctx.n_layers, ctx.mean = len(weights), mean


def _gram_backward(ctx, grad_loss, grad_r):
    r, *saved = ctx.saved_tensors
    weights, pruned = saved[:ctx.n_layers], saved[ctx.n_layers:]
    return _ops.gram_penalty_bwd(grad_loss, weights, pruned, r, ctx.mean), [None] * ctx.n_layers, None


def _bn_setup_context(ctx, inputs, output):
    values, pruned = inputs
    ctx.save_for_backward(*values, *pruned)
    ctx.n_values = len(values)


def _bn_backward(ctx, grad_loss):
    saved = ctx.saved_tensors
    values, pruned = saved[:ctx.n_values], saved[ctx.n_values:]
    return _ops.bn_penalty_bwd(grad_loss, values, pruned), [None] * ctx.n_values


torch.library.register_autograd("tpp_cuda::gram_penalty_fwd", _gram_backward, setup_context=_gram_setup_context)
torch.library.register_autograd("tpp_cuda::bn_penalty_fwd", _bn_backward, setup_context=_bn_setup_context)

# ----------------------------------------------------------------------------------------------------------------
# Argument checks: structure, dtypes and devices here (naming the caller's arguments); the C++ ops check the rest.
# ----------------------------------------------------------------------------------------------------------------


def _tensor_list(values, name: str, optional: bool = False) -> List[Optional[Tensor]]:
    if isinstance(values, Tensor) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(values).__name__}")
    for i, t in enumerate(values):
        if not isinstance(t, Tensor) and not (optional and t is None):
            raise TypeError(f"{name}[{i}] must be a tensor{' or None' if optional else ''}, got {type(t).__name__}")
    return list(values)


def _same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")


def _check_tensors(tensors: Sequence[Optional[Tensor]], pruned: Sequence[Tensor], name: str, one_dim: bool) -> None:
    device = next((t.device for t in tensors if t is not None), None)
    for i, (t, idx) in enumerate(zip(tensors, pruned)):
        if t is None:
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] must be float32, float16 or bfloat16, got {t.dtype} "
                            "(tpp.reference handles other dtypes)")
        if (t.dim() != 1) if one_dim else (t.dim() < 2):
            raise ValueError(f"{name}[{i}] must {'be 1-D' if one_dim else 'have at least 2 dims [N, ...]'}, "
                             f"got shape {tuple(t.shape)}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"pruned_idxs[{i}] must be an integer tensor of filter indices, got dtype {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"pruned_idxs[{i}] must be a 1-D tensor of filter indices, got shape "
                             f"{tuple(idx.shape)}")
        for what, tensor in ((f"{name}[{i}]", t), (f"pruned_idxs[{i}]", idx)):
            if tensor.device != device:
                raise ValueError(f"{what} is on {tensor.device}, expected {device} (all tensors of one call "
                                 "share a device)")
    if device is not None and device.type == "cuda" and not _HAS_CUDA_KERNELS:
        raise RuntimeError(f"{library_path} has no CUDA kernels (built without a CUDA toolkit): rebuild it "
                           "with nvcc available (CUDA_HOME)")


_checked: "OrderedDict[tuple, Tensor]" = OrderedDict()


def _check_index_values(layers: Sequence[Tuple[int, int, Tensor]]) -> None:
    """Range and distinctness of the index tensors, once per tensor and version (on CUDA a device sync). Skipped
    while compiling: then the C++ ops check CPU indices and the CUDA kernels assert on the device."""
    if torch.compiler.is_compiling():
        return
    for i, n, idx in layers:  # (position in the caller's lists, N, indices)
        key = (idx.data_ptr(), None if idx.is_inference() else idx._version, idx.dtype, idx.shape, idx.device, n)
        if key in _checked:
            _checked.move_to_end(key)
            continue
        reference.check_pruned_indices(idx, n, f"pruned_idxs[{i}]")
        _checked[key] = idx  # the reference keeps the memory from being reused under the same data_ptr
        if len(_checked) > 1024:
            _checked.popitem(last=False)


def _rows_dense(t: Tensor) -> bool:
    """Each of the N rows at its own D consecutive elements, row i at element i·D (contiguous, channels-last)."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape[1:], t.stride()[1:]) if n != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return t.shape[0] <= 1 or t.stride(0) == expected


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _scale(value: Union[float, Tensor]) -> Tuple[float, Optional[Tensor]]:
    """A python number, or a 0-d floating tensor read on the device (no host sync)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"scale must be a python float or a 0-d floating tensor, got {value.dtype} "
                             f"of shape {tuple(value.shape)}")
        return 1.0, value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"scale must be a finite python float or a 0-d tensor, got {value!r}")
    return float(value), None


def _options(variant: str, reduction: str) -> None:
    if variant not in reference.VARIANTS:
        raise ValueError(f"variant must be one of {reference.VARIANTS}, got {variant!r}")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")


def _gram_layers(weights, pruned_idxs) -> Tuple[List[Tensor], List[Tensor]]:
    weights = _tensor_list(weights, "weights")
    pruned_idxs = _tensor_list(pruned_idxs, "pruned_idxs")
    _same_length(weights, pruned_idxs, "weights", "pruned_idxs")
    _check_tensors(weights, pruned_idxs, "weights", one_dim=False)
    _check_index_values([(i, w.shape[0], idx) for i, (w, idx) in enumerate(zip(weights, pruned_idxs))])
    return weights, pruned_idxs


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def gram_penalty_multi(weights: Sequence[Tensor], pruned_idxs: Sequence[Tensor], variant: str = "decorrelate",
                       reduction: str = "mean") -> Tensor:
    """``Σ_l L_l``: the gram penalty of every layer, each reduced by its own N (``reduction="mean"``: ÷N²).

    ``weights[l]``: ``[N, ...]`` (read as ``[N, D]``), float32/float16/bfloat16, all on one device;
    ``pruned_idxs[l]``: its distinct pruned filter indices (any integer dtype; p = 0 allowed). Differentiable;
    returns a float32 0-d tensor (0 without any launch of ours if nothing is pruned). ``variant="diagonal"`` needs
    the whole gram and runs ``tpp.reference``.
    """
    _options(variant, reduction)
    weights, pruned_idxs = _gram_layers(weights, pruned_idxs)
    if not weights:
        return torch.zeros(())
    if variant == "diagonal":
        for i, (w, idx) in enumerate(zip(weights, pruned_idxs)):
            reference.check_pruned_indices(idx, w.shape[0], f"pruned_idxs[{i}]")
        return sum(reference.diagonal_penalty(w, idx, reduction) for w, idx in zip(weights, pruned_idxs))
    weights = [w if _rows_dense(w) else w.contiguous() for w in weights]
    loss, _ = _ops.gram_penalty_fwd(weights, pruned_idxs, reduction == "mean")
    return loss


def gram_penalty(weight: Tensor, pruned_idx: Tensor, variant: str = "decorrelate",
                 reduction: str = "mean") -> Tensor:
    """The gram penalty of one layer: ``gram_penalty_multi([weight], [pruned_idx], ...)``."""
    return gram_penalty_multi([weight], [pruned_idx], variant, reduction)


@torch.no_grad()
def add_gram_penalty_grad_(weights: Sequence[Tensor], grads: Sequence[Tensor], pruned_idxs: Sequence[Tensor],
                           scale: Union[float, Tensor], variant: str = "decorrelate",
                           reduction: str = "mean") -> None:
    """``grads[l] += scale · ∂L_l/∂W_l`` in place, without autograd: the gradient of
    ``scale · gram_penalty_multi(weights, pruned_idxs, ...)``, computed in fp32 and rounded once into the grad dtype.

    ``grads[l]``: shape, dtype and device of ``weights[l]``, dense (contiguous or channels-last; e.g. its
    ``.grad``). ``scale``: python float or 0-d floating tensor on the device (read there: no host sync). Every input
    is checked before anything is written: on error no gradient has changed.
    """
    _options(variant, reduction)
    weights, pruned_idxs = _gram_layers(weights, pruned_idxs)
    grads = _tensor_list(grads, "grads")
    _same_length(grads, weights, "grads", "weights")
    scale, scale_tensor = _scale(scale)
    if not weights:
        return
    if variant == "diagonal":
        for i, (w, g, idx) in enumerate(zip(weights, grads, pruned_idxs)):
            reference.check_pruned_indices(idx, w.shape[0], f"pruned_idxs[{i}]")
            if g.shape != w.shape:
                raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, weights[{i}] {tuple(w.shape)}")
        factor = scale if scale_tensor is None else scale_tensor * scale
        for w, g, idx in zip(weights, grads, pruned_idxs):
            g.add_((reference.gram_penalty_grad_fp32(w, idx, "diagonal", reduction) * factor).to(g.dtype).view_as(g))
        return
    # the kernels read each weight in its gradient's memory order
    weights = [torch.empty_like(g).copy_(w) if g.shape == w.shape and _rows_dense(g) and not _same_layout(w, g)
               else w for w, g in zip(weights, grads)]
    _ops.gram_penalty_add_grad(weights, grads, pruned_idxs, scale, scale_tensor, reduction == "mean")


def _bn_vectors(gammas, betas, pruned_idxs) -> Tuple[List[Tensor], List[Tensor], List[Tuple[int, int]]]:
    """The present γ and β vectors with their pruned sets, and (layer, 0 for γ / 1 for β) of each."""
    gammas = _tensor_list(gammas, "gammas", optional=True)
    betas = _tensor_list(betas, "betas", optional=True)
    pruned_idxs = _tensor_list(pruned_idxs, "pruned_idxs")
    _same_length(gammas, pruned_idxs, "gammas", "pruned_idxs")
    _same_length(betas, pruned_idxs, "betas", "pruned_idxs")
    _check_tensors(gammas, pruned_idxs, "gammas", one_dim=True)
    _check_tensors(betas, pruned_idxs, "betas", one_dim=True)
    values, pruned, where = [], [], []
    for i, (g, b, idx) in enumerate(zip(gammas, betas, pruned_idxs)):
        if g is not None and b is not None and (g.shape != b.shape or g.device != b.device):
            raise ValueError(f"betas[{i}] has shape {tuple(b.shape)} on {b.device}, gammas[{i}] "
                             f"{tuple(g.shape)} on {g.device}")
        for k, v in enumerate((g, b)):
            if v is not None:
                values.append(v.contiguous())
                pruned.append(idx)
                where.append((i, k))
    if values and any(v.device != values[0].device for v in values):
        raise ValueError("gammas and betas must be on one device")
    _check_index_values([(i, v.shape[0], pruned_idxs[i]) for v, (i, _) in zip(values, where)])
    return values, pruned, where


def bn_penalty(gammas: Sequence[Optional[Tensor]], betas: Sequence[Optional[Tensor]],
               pruned_idxs: Sequence[Tensor]) -> Tensor:
    """``Σ_l Σ_{j∈P_l} γ_lj² + β_lj²``, differentiable, float32 0-d.

    ``gammas[l]``, ``betas[l]``: the 1-D weight and bias of the BatchNorm after pruned layer l (either may be None:
    it contributes 0), float32/float16/bfloat16; ``pruned_idxs[l]``: its pruned channels.
    """
    values, pruned, _ = _bn_vectors(gammas, betas, pruned_idxs)
    if not values:
        return torch.zeros(())
    return _ops.bn_penalty_fwd(values, pruned)


@torch.no_grad()
def add_bn_penalty_grad_(gammas: Sequence[Optional[Tensor]], betas: Sequence[Optional[Tensor]],
                         gamma_grads: Sequence[Optional[Tensor]], beta_grads: Sequence[Optional[Tensor]],
                         pruned_idxs: Sequence[Tensor], scale: Union[float, Tensor]) -> None:
    """``grad += scale · ∂L_bn/∂(γ, β)`` in place: ``gamma_grads[l][j] += 2·scale·γ_lj`` and
    ``beta_grads[l][j] += 2·scale·β_lj`` for pruned ``j`` (kept channels untouched); the gradient of
    ``scale · bn_penalty(...)``. A None γ or β has a None gradient. ``scale``: python float or 0-d tensor.
    """
    values, pruned, where = _bn_vectors(gammas, betas, pruned_idxs)
    grad_lists = (_tensor_list(gamma_grads, "gamma_grads", optional=True),
                  _tensor_list(beta_grads, "beta_grads", optional=True))
    for grads, name in zip(grad_lists, ("gamma_grads", "beta_grads")):
        _same_length(grads, pruned_idxs, name, "pruned_idxs")
    grads = []
    for i, k in where:
        g = grad_lists[k][i]
        if g is None:
            raise ValueError(f"{('gamma_grads', 'beta_grads')[k]}[{i}] is None, but its parameter is not")
        grads.append(g)
    scale, scale_tensor = _scale(scale)
    if values:
        _ops.bn_penalty_add_grad(values, grads, pruned, scale, scale_tensor)
