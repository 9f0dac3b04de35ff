"""The CUDA C++ backend: ``torch.ops.tpp_cuda.*`` from ``csrc/``, with the same functions as ``tpp_kernels``.

Math (tpp-method.md §2), one layer: ``W ∈ R^{N×D}``, pruned rows ``P``, ``R = W_P Wᵀ``, ``m_j = 0`` for ``j ∈ P``:
``L_gram = s·Σ (1 + m_j) R_ij²`` (``s = 1/N²`` for "mean", 1 for "sum"), rows P of its gradient ``4s·R W``, rows K
``4s·R[:, K]ᵀ W_P``; ``L_bn = Σ_{j∈P} γ_j² + β_j²``. ``csrc/tpp_ops.cpp`` says how the work is split between
cuBLAS GEMMs and multi-layer kernels, and how many launches each op takes.

Public functions (all layers of a call together; weights float32/float16/bfloat16, CPU or CUDA):

* ``gram_penalty(weight, pruned_idx, ...)`` / ``gram_penalty_multi(weights, pruned_idxs, ...)`` — differentiable;
* ``add_gram_penalty_grad_(weights, grads, pruned_idxs, scale, ...)`` — the same gradient added into ``grads``;
* ``bn_penalty(gammas, betas, pruned_idxs)`` / ``add_bn_penalty_grad_(...)`` — the BatchNorm term.

The library is loaded at import: ``tpp_kernels._C`` when setup.py built it (``TPP_BUILD_CUDA=1``), else the
just-in-time build of :mod:`tpp_kernels.cuda_build` (compiled on first use, then cached). If neither works,
importing this module raises ``ImportError`` saying why. Autograd and the fake (meta) kernels of the ops are
registered here, in Python, so that ``torch.compile`` sees symbolic shapes; the C++ side has the CPU and CUDA
kernels. Arguments are checked by :mod:`tpp_kernels.checks`, as for the Triton backend.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import checks, cuda_build, reference

__all__ = ["gram_penalty", "gram_penalty_multi", "add_gram_penalty_grad_", "bn_penalty", "add_bn_penalty_grad_",
           "build", "library_path", "has_cuda_kernels"]


def _load() -> str:
    """Load ``tpp_kernels._C`` (refusing one built from other sources than csrc/), else the just-in-time build."""
    spec = importlib.util.find_spec("tpp_kernels._C")
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
        except OSError as e:
            raise ImportError(f"{spec.origin} cannot be loaded ({e}): rebuild it (TPP_BUILD_CUDA=1 pip install "
                              "--no-build-isolation -e .) or delete it to use the just-in-time build") from e
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
    """Build the extension for the current sources unless that build exists (:func:`tpp_kernels.cuda_build.build`);
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
# Argument checks: tpp_kernels.checks (naming the caller's arguments); the C++ ops check the rest.
# ----------------------------------------------------------------------------------------------------------------


def _has_kernels_for(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda" and not _HAS_CUDA_KERNELS:
        raise RuntimeError(f"{library_path} has no CUDA kernels (built without a CUDA toolkit): rebuild it "
                           "with nvcc available (CUDA_HOME)")


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _gram_layers(weights, pruned_idxs, variant: str, reduction: str) -> Tuple[List[Tensor], List[Tensor]]:
    checks.options(variant, reduction, None)
    weights, pruned_idxs = checks.layers(weights, pruned_idxs, "weights", "pruned_idxs", min_dim=2)
    _has_kernels_for(weights[0].device if weights else None)
    checks.index_values_once([(i, w.shape[0], idx) for i, (w, idx) in enumerate(zip(weights, pruned_idxs))])
    return weights, pruned_idxs


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def gram_penalty_multi(weights: Sequence[Tensor], pruned_idxs: Sequence[Tensor], variant: str = "decorrelate",
                       reduction: str = "mean") -> Tensor:
    """``Σ_l L_l``: the gram penalty of every layer, each reduced by its own N (``reduction="mean"``: ÷N²).

    ``weights[l]``: ``[N, ...]`` (read as ``[N, D]``), float32/float16/bfloat16, all on one device;
    ``pruned_idxs[l]``: its distinct pruned filter indices (any integer dtype; p = 0 allowed). Differentiable;
    returns a float32 0-d tensor (0 without any launch of ours if nothing is pruned). fp32 GEMMs (cuBLAS through
    ATen) run at torch's fp32 matmul precision, TF32 unless ``torch.get_float32_matmul_precision()`` is "highest":
    the precision policy of every backend. ``variant="diagonal"`` needs the whole gram and runs the reference.
    """
    weights, pruned_idxs = _gram_layers(weights, pruned_idxs, variant, reduction)
    if not weights:
        return torch.zeros(())
    if variant == "diagonal":
        return sum(reference.diagonal_penalty(w, idx, reduction) for w, idx in zip(weights, pruned_idxs))
    weights = [w if checks.rows_dense(w) else w.contiguous() for w in weights]
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
    is checked before anything is written: on error no gradient has changed. A gradient sharing memory with a
    weight or another gradient is refused (``ValueError``).
    """
    weights, pruned_idxs = _gram_layers(weights, pruned_idxs, variant, reduction)
    grads = checks.dense_like(grads, weights, "grads", "weights")
    if not weights:
        return
    checks.disjoint_outputs(weights, grads, [f"weights[{i}]" for i in range(len(weights))],
                            [f"grads[{i}]" for i in range(len(grads))])
    scale, scale_tensor = checks.scale(scale, weights[0].device)
    if variant == "diagonal":
        factor = scale if scale_tensor is None else scale_tensor * scale
        for w, g, idx in zip(weights, grads, pruned_idxs):
            g.add_((reference.gram_penalty_grad_fp32(w, idx, "diagonal", reduction) * factor).to(g.dtype).view_as(g))
        return
    # the kernels read each weight in its gradient's memory order
    weights = [w if _same_layout(w, g) else torch.empty_like(g).copy_(w) for w, g in zip(weights, grads)]
    _ops.gram_penalty_add_grad(weights, grads, pruned_idxs, scale, scale_tensor, reduction == "mean")


def _bn_vectors(gammas, betas, pruned_idxs) -> Tuple[List[Tensor], List[Tensor], List[Tuple[int, int]]]:
    """The present γ and β vectors with their pruned sets, and (layer, 0 for γ / 1 for β) of each."""
    pruned_idxs = checks.tensor_list(pruned_idxs, "pruned_idxs")
    gammas = checks.vectors(gammas, pruned_idxs, "gammas", "pruned_idxs")
    betas = checks.vectors(betas, pruned_idxs, "betas", "pruned_idxs")
    values, pruned, where = [], [], []
    for i, (g, b, idx) in enumerate(zip(gammas, betas, pruned_idxs)):
        if g is not None and b is not None:
            checks.matches(b, g, f"betas[{i}]", f"gammas[{i}]")
        for k, v in enumerate((g, b)):
            if v is not None:
                values.append(v.contiguous())
                pruned.append(idx)
                where.append((i, k))
    _has_kernels_for(values[0].device if values else None)
    checks.index_values_once([(i, v.shape[0], pruned_idxs[i]) for v, (i, _) in zip(values, where)])
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
    names = ("gamma_grads", "beta_grads")
    grad_lists = (checks.tensor_list(gamma_grads, names[0], optional=True),
                  checks.tensor_list(beta_grads, names[1], optional=True))
    for grads, name in zip(grad_lists, names):
        checks.same_length(grads, pruned_idxs, name, "pruned_idxs")
    grads = []
    for v, (i, k) in zip(values, where):
        g = grad_lists[k][i]
        if g is None:
            raise ValueError(f"{names[k]}[{i}] is None, but its parameter is not")
        checks.matches(g, v, f"{names[k]}[{i}]", f"{('gammas', 'betas')[k]}[{i}]")
        checks.dense(g, f"{names[k]}[{i}]")
        grads.append(g)
    if values:
        kinds = (("gammas", "gamma_grads"), ("betas", "beta_grads"))
        checks.disjoint_outputs(values, grads, [f"{kinds[k][0]}[{i}]" for i, k in where],
                                [f"{kinds[k][1]}[{i}]" for i, k in where])
        scale, scale_tensor = checks.scale(scale, values[0].device)
        _ops.bn_penalty_add_grad(values, grads, pruned, scale, scale_tensor)
