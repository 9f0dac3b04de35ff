"""The fused kernels compiled for sm_90 without a GPU: registers, spills and memory instructions of each variant.

    python benchmarks/ptx_report.py [--json] [--keep DIR]

Every variant the regularizer launches (:mod:`tpp_kernels.kernels`: forward with and without the loss, backward
accumulating into ``.grad`` or writing fresh buffers; float32, float16 and bfloat16 weights) is compiled by
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` with the configuration the plan picks on a GPU, pointer
arguments 16-byte aligned as the allocator gives them. ``ptxas -v`` (Triton's own) reports registers and spills;
the PTX is searched for 16-byte global→shared copies (``cp.async … 16``) and 16-byte global loads
(``ld.global….v4``), the aligned branch's main-loop loads, and for ``wgmma`` (Hopper's tensor-core instruction).
Runs with ``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tpp_kernels import kernels, plan  # noqa: E402

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TARGET = GPUTarget("cuda", 90, 32)


def _compile(fn, args, constexprs: dict, cfg) -> str:
    """PTX of ``fn`` for ``args`` ((name, Triton type) in order; ``constexpr`` entries are taken from
    ``constexprs``), every pointer 16-byte aligned."""
    signature = {name: ty for name, ty in args}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (_, ty) in enumerate(args) if ty.startswith("*")}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": cfg.num_warps,
                                                       "num_stages": cfg.num_stages}).asm["ptx"]


def _common(dtype: torch.dtype) -> dict:
    vec = 16 // dtype.itemsize
    return {"MEAN": True, "INPUT_PRECISION": "tf32", "VEC_W": vec, "VEC_X": vec}


def forward_ptx(dtype: torch.dtype, loss: bool) -> str:
    t, cfg = TYPES[dtype], plan.GPU_CONFIGS["fwd"]
    args = [("p_w", f"*{t}"), ("p_ow", "*i64"), ("p_gmeta", "*i64"), ("p_x", f"*{t}"), ("p_ox", "*i64"),
            ("p_smeta", "*i64"), ("p_tiles", "*i32"), ("p_order", "*i32"), ("p_m", "*i8"), ("p_r", "*fp32"),
            ("p_part", "*fp32" if loss else "constexpr"), ("p_strength", "*fp64"), ("gram_weight", "fp32"),
            ("l2_weight", "fp32")]
    constexprs = {**_common(dtype), "LOSS": loss, "DOT_FP32": False, "BLOCK_M": cfg.block_rows,
                  "BLOCK_N": cfg.block_cols, "BLOCK_K": cfg.block_red, **({} if loss else {"p_part": None})}
    args += [(name, "constexpr") for name in constexprs if name != "p_part"]
    return _compile(kernels.fwd_kernel, args, constexprs, cfg)


def backward_ptx(dtype: torch.dtype, accumulate: bool) -> str:
    t, cfg = TYPES[dtype], plan.GPU_CONFIGS["bwd"]
    args = [("p_w", f"*{t}"), ("p_ow", "*i64"), ("p_gmeta", "*i64"), ("p_gout", f"*{t}"), ("p_ogout", "*i64"),
            ("p_x", f"*{t}"), ("p_ox", "*i64"), ("p_smeta", "*i64"), ("p_xout", f"*{t}"), ("p_oxout", "*i64"),
            ("p_tiles", "*i32"), ("p_order", "*i32"), ("p_r", "*fp32"), ("p_strength", "*fp64"),
            ("p_grad", "constexpr" if accumulate else "*fp32"), ("gram_weight", "fp32"), ("l2_weight", "fp32")]
    constexprs = {**_common(dtype), "ACCUMULATE": accumulate, "BLOCK_M": cfg.block_rows,
                  "BLOCK_D": cfg.block_cols, "BLOCK_J": cfg.block_red, **({"p_grad": None} if accumulate else {})}
    args += [(name, "constexpr") for name in constexprs if name != "p_grad"]
    return _compile(kernels.bwd_kernel, args, constexprs, cfg)


def _ptxas() -> str:
    import triton.backends.nvidia as nvidia

    return str(Path(nvidia.__file__).parent / "bin" / "ptxas")


def inspect(ptx: str, keep: Path | None, name: str) -> dict:
    """Registers and spills (``ptxas -v`` for sm_90a) and counts of the memory and tensor-core instructions."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(keep or tmp) / f"{name}.ptx"
        path.write_text(ptx)
        report = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", str(path), "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)]
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global[^\n]*?\],\s*(0x10|16|0x8|8|0x4|4)\b", ptx)
    return {"registers": max(int(r) for r in re.findall(r"Used (\d+) registers", report)),
            "spill_bytes": sum(spills),
            "cp_async_16": sum(c in ("0x10", "16") for c in copies),
            "cp_async_under_16": sum(c not in ("0x10", "16") for c in copies),
            "ld_global_v4": len(re.findall(r"ld\.global\S*\.v4", ptx)),
            "ld_global": len(re.findall(r"ld\.global", ptx)),
            "wgmma": ptx.count("wgmma.mma_async")}


def variants():
    for dtype in TYPES:
        for loss in (True, False):
            yield f"fwd-{'loss' if loss else 'r'}-{TYPES[dtype]}", lambda d=dtype, x=loss: forward_ptx(d, x)
        for accumulate in (True, False):
            yield f"bwd-{'add' if accumulate else 'write'}-{TYPES[dtype]}", \
                lambda d=dtype, x=accumulate: backward_ptx(d, x)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep", type=Path, help="write each variant's PTX into this folder")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    results = {name: inspect(make(), args.keep, name) for name, make in variants()}
    if args.json:
        print(json.dumps(results))
    else:
        columns = list(next(iter(results.values())))
        print("| variant | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for name, row in results.items():
            print(f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |")
    return results


if __name__ == "__main__":
    main()
