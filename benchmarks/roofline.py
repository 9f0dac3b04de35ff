"""The floor of each case: the least time the device could take, from rates measured on it in the same run.

``floor = max(bytes moved / copy bandwidth, FLOPs / matmul rate)`` with, per layer (tpp-method.md §2, ``W`` is
N×D, p pruned rows, ``s`` bytes per element):

* forward ``R = W_P Wᵀ``: p·N·D MACs; reads W once and the gathered W_P: (N + p)·D·s bytes;
* backward: p·N·D (pruned rows, ``4RW``) + (N − p)·p·D (kept rows, ``4R[:,K]ᵀW_P``) MACs, and the gradient
  written once: N·D·s bytes more; the in-place path reads and writes it: 2·N·D·s;
* "fwd+bwd" and "in-place" both do the forward and the backward work.

FLOPs = 2 × MACs. A layer set adds its layers' FLOPs and bytes before taking the max. The rates:

* copy bandwidth: ``dst.copy_(src)`` of a large buffer, counted as 2 × its size (one read, one write);
* matmul rate: one large square GEMM per dtype (float32 under the run's float32 matmul precision — TF32 on CUDA —
  and bfloat16).

Both take the fastest of several calls (the device's capability), so on a busy machine a case can still come out
above 100 % of its floor: the cases are medians.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from timing import fastest_seconds

MODES = ("fwd", "fwd+bwd", "in-place")

# (copy buffer elements of float32, GEMM size) per device type
_PROBE_SIZES = {"cuda": (1 << 28, 8192), "cpu": (1 << 26, 1024)}


def gram_work(n: int, d: int, p: int, mode: str, itemsize: int) -> tuple[int, int]:
    """(FLOPs, bytes) that one layer's gram term needs at least in ``mode`` (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    forward_macs = p * n * d
    read = (n + p) * d * itemsize
    if mode == "fwd":
        return 2 * forward_macs, read
    backward_macs = p * n * d + (n - p) * p * d
    grad_passes = 1 if mode == "fwd+bwd" else 2
    return 2 * (forward_macs + backward_macs), read + grad_passes * n * d * itemsize


@dataclass(frozen=True)
class Rates:
    """Measured copy bandwidth (bytes/s) and matmul rates (FLOP/s by dtype name, e.g. ``"float32"``)."""

    copy_bytes_per_s: float
    matmul_flops_per_s: dict[str, float]

    def floor(self, flops: float, nbytes: float, dtype: str) -> float:
        """Seconds at the device's limit: the larger of the memory time and the compute time."""
        return max(nbytes / self.copy_bytes_per_s, flops / self.matmul_flops_per_s[dtype])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Rates":
        return cls(float(d["copy_bytes_per_s"]), {k: float(v) for k, v in d["matmul_flops_per_s"].items()})


def measure(device: torch.device, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> Rates:
    """Probe ``device``: the fastest of 20 copies and of 20 GEMMs per dtype, after warm-up."""
    elements, size = _PROBE_SIZES[device.type]
    rates = {}
    for dtype in dtypes:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        rates[str(dtype).removeprefix("torch.")] = 2 * size**3 / fastest_seconds(lambda: a @ b, device, 3, 20)
    return Rates(_copy_bandwidth(elements, device), rates)


def _copy_bandwidth(elements: int, device: torch.device) -> float:
    src = torch.ones(elements, device=device)
    dst = torch.empty_like(src)
    seconds = fastest_seconds(lambda: dst.copy_(src), device, 3, 20)
    return 2 * src.numel() * src.element_size() / seconds
