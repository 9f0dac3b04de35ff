"""Launch configurations: interpreter detection, dot input precision, block sizes, and the lazy autotuner.

Every multi-layer kernel tiles a 2-D output with a reduction loop, so one :class:`Config` (rows × cols tile,
reduction chunk, warps, pipeline stages) describes a launch. The tile tables the kernels read are built on the host
from the block sizes, so tuning happens here, once per (kernel, layer-set signature), by timing each candidate —
never at import. ``TPP_AUTOTUNE=0`` (tests, CI) pins :func:`default_config`; so does the Triton interpreter, where
timings mean nothing, and CUDA-graph capture, where timing cannot run.
"""
import contextlib
import os
from typing import Callable, Dict, Hashable, NamedTuple, Optional

import torch

# ``@triton.jit`` reads this variable when the kernels are decorated, so it is read once, at import, here too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

INPUT_PRECISIONS = ("ieee", "tf32")


@torch.compiler.assume_constant_result
def matmul_precision() -> str:
    """The precision torch gives fp32 matmuls on CUDA (what cuBLAS runs through ATen): "tf32" or "ieee".

    ``torch.backends.cuda.matmul.fp32_precision`` where torch has it (≥ 2.9; it resolves the generic
    ``torch.backends.fp32_precision`` and ``torch.set_float32_matmul_precision``), else
    ``torch.get_float32_matmul_precision()`` ("highest" → ieee). Read once per trace under ``torch.compile``.
    """
    value = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if value is None:
        value = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32" if value == "tf32" else "ieee"


def input_precision(requested: Optional[str]) -> str:
    """The ``tl.dot`` input precision for fp32 operands, one policy for every backend: ``requested`` when given, else
    "ieee" in the interpreter, else torch's fp32 matmul precision (:func:`matmul_precision`; the CUDA backend's
    cuBLAS GEMMs follow the same setting)."""
    if requested is not None:
        return requested
    return "ieee" if INTERPRET else matmul_precision()


def check_device(t: torch.Tensor) -> None:
    """The interpreter reads CPU memory through raw addresses: kernels get CPU tensors only."""
    if INTERPRET and t.device.type != "cpu":
        raise RuntimeError(f"TRITON_INTERPRET=1 runs the tpp kernels on CPU tensors only, got {t.device}")


def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU whatever the current device (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class Config(NamedTuple):
    """Tile ``block_rows × block_cols`` of the output, reduction in chunks of ``block_red``."""

    block_rows: int
    block_cols: int
    block_red: int
    num_warps: int = 4
    num_stages: int = 3


# The interpreter runs one program at a time in numpy: 16 is the smallest ``tl.dot`` block, and it makes the small
# test shapes span several tiles in every direction.
_INTERPRETER_CONFIG = Config(16, 16, 16, 1, 1)
_DEFAULT = {"gram_fwd": Config(64, 64, 32), "gram_bwd": Config(64, 64, 32)}
_CANDIDATES = {
    "gram_fwd": (
        Config(64, 64, 32), Config(64, 128, 32), Config(128, 64, 32), Config(128, 128, 32, 8),
        Config(32, 64, 64, 4, 4), Config(64, 64, 64, 4, 4),
    ),
    "gram_bwd": (
        Config(64, 64, 32), Config(64, 128, 32), Config(128, 64, 32), Config(128, 128, 32, 8),
        Config(32, 128, 32), Config(64, 64, 64, 4, 4),
    ),
}
_best: Dict[Hashable, Config] = {}


def default_config(kernel: str) -> Config:
    """The pinned configuration of ``kernel`` ("gram_fwd" or "gram_bwd")."""
    return _INTERPRETER_CONFIG if INTERPRET else _DEFAULT[kernel]


def autotune_enabled() -> bool:
    """Tune unless ``TPP_AUTOTUNE=0``, in the interpreter, or while a CUDA graph is being captured."""
    if INTERPRET or os.environ.get("TPP_AUTOTUNE", "1") == "0":
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _bench(fn: Callable[[], object]) -> float:
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    try:
        return do_bench(fn)
    except OutOfResources:
        return float("inf")


def pick(kernel: str, signature: Hashable, launch: Callable[[Config], object]) -> Config:
    """The candidate of ``kernel`` with which ``launch(config)`` runs fastest, timed once per ``signature``
    (the pinned config while tuning is off and nothing was tuned: a CUDA graph captured after a tuned warm-up
    call keeps the tuned config, whose tables exist already).

    ``launch`` must be free of side effects on user tensors (it writes scratch outputs): it runs many times.
    """
    key = (kernel, signature)
    if key not in _best:
        if not autotune_enabled():
            return default_config(kernel)
        timings = {config: _bench(lambda: launch(config)) for config in _CANDIDATES[kernel]}
        _best[key] = min(timings, key=timings.__getitem__)
    return _best[key]
