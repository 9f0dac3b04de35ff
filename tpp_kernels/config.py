"""Launch settings: interpreter detection, dot input precision, the device a launch runs on, tile configurations.

Every kernel tiles a 2-D output with a reduction loop, so one :class:`Config` (rows × cols tile, reduction chunk,
warps, pipeline stages) describes a launch. Configurations are fixed shapes chosen in :mod:`tpp_kernels.plan`, never
timed: the same on every DDP rank and inside a CUDA-graph capture.
"""
import contextlib
import os
from typing import NamedTuple, Optional

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
INTERPRETER_CONFIG = Config(16, 16, 16, 1, 1)
