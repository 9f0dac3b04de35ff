"""The fused kernels as a GPU would run them, checked without one: every variant compiled for sm_90.

``benchmarks/ptx_report.py`` compiles each variant of :mod:`tpp_kernels.plan` with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` (in a subprocess: the tests run Triton in the interpreter) and reads the PTX and
``ptxas -v``. Every variant must run without register spills, move its aligned operands in 16-byte transactions
(``cp.async`` of 16 bytes into shared memory or ``ld.global.v4``) and use Hopper's ``wgmma``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ptx_report.py"), "--json"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_every_variant_is_compiled(report):
    assert sorted(report) == sorted(f"{kind}-{dtype}" for kind in ("fwd-loss", "fwd-r", "bwd-add", "bwd-write")
                                    for dtype in ("fp32", "fp16", "bf16"))


def test_no_register_spills(report):
    assert {name: row["spill_bytes"] for name, row in report.items() if row["spill_bytes"]} == {}


def test_aligned_operands_move_in_16_byte_transactions(report):
    for name, row in report.items():
        assert row["cp_async_16"] > 0, f"{name}: no 16-byte cp.async in the main loops"
        if name.startswith("fwd-loss") or name.startswith("bwd"):
            assert row["ld_global_v4"] > 0, f"{name}: no 16-byte global load"


def test_dots_run_on_hopper_tensor_cores(report):
    assert {name: row["wgmma"] for name, row in report.items() if not row["wgmma"]} == {}
