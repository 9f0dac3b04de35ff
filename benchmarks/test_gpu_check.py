"""``make gpu-check``'s plumbing on the CPU (``--dry-run``), fast: ``pytest benchmarks/test_gpu_check.py``.

The whole dry run (``make gpu-check GPU_CHECK_ARGS=--dry-run``, about 1.5 minutes on two cores) also runs the
smoke, table and train stages on tiny CPU shapes; here two quick stages, a stage cut at its cap, and $OUT.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def gpu_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OUT=str(out))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, str(HERE / "gpu_check.py"), "--dry-run", "--results", str(tmp_path), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    summaries = list(tmp_path.glob("*-gpu-check.json"))
    assert len(summaries) == 1, run.stdout + run.stderr
    return run, json.loads(summaries[0].read_text()), out


def test_stages_write_their_results_and_the_summary(tmp_path):
    run, summary, out = gpu_check(tmp_path, "--stages", "build,tests")
    assert run.returncode == 0, run.stdout + run.stderr
    assert summary["dry_run"] and list(summary["stages"]) == ["build", "tests"]
    assert summary["stages"]["build"]["status"].startswith(("ok", "skipped: no CUDA toolkit"))
    tests = summary["stages"]["tests"]
    assert tests["status"].startswith("skipped: no CUDA") and tests["counts"]["skipped"] == tests["counts"]["tests"] > 0
    assert all(s["seconds"] <= s["cap_s"] + 5 for s in summary["stages"].values())
    md = next(tmp_path.glob("*-gpu-check.md")).read_text()
    assert "| build |" in md and "| tests |" in md
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".log", ".md"]


def test_a_stage_cut_at_its_cap_still_reports(tmp_path):
    """The train stage cannot finish in 8 s: it is killed with its children, and what is left is skipped."""
    run, summary, _ = gpu_check(tmp_path, "--stages", "train,tests", "--total-s", "8")
    assert run.returncode == 1
    assert summary["stages"]["train"]["status"].startswith("cut at its time cap")
    assert summary["stages"]["train"]["seconds"] < 15
    assert summary["stages"]["tests"]["status"] == "skipped: no time left"
