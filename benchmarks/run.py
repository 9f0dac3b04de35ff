"""``make bench``: run the benchmarks, then write ``benchmarks/results/<device>-<date>.{json,md}`` and the plots.

    python benchmarks/run.py [--set quick|full] [--device cpu|cuda] [--only sweep,layer-sets,steps]
                             [--threads N] [--results DIR] [-- extra pytest arguments]

The set defaults to ``full`` on a CUDA device and ``quick`` elsewhere (:mod:`workloads`). ``--only`` runs some
parts and merges their results into the day's file for the device (cases run again replace the old ones), so the
full GPU set can also be run in several shorter commands. The JSON is pytest-benchmark's (``--benchmark-json``);
:mod:`report` renders it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import machine
import report
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PARTS = {"sweep": "test_penalty.py::test_sweep", "layer-sets": "test_penalty.py::test_layer_set",
         "steps": "test_train_step.py"}


def merge(old: dict, new: dict) -> dict:
    """``new`` plus the cases of ``old`` it did not run; the roofline of ``old`` if ``new`` measured none."""
    ran = {b["fullname"] for b in new["benchmarks"]}
    merged = dict(new, benchmarks=[b for b in old["benchmarks"] if b["fullname"] not in ran] + new["benchmarks"])
    info, old_info = merged["machine_info"]["tpp"], old["machine_info"]["tpp"]
    info["roofline"] = info["roofline"] or old_info["roofline"]
    info["unavailable"] = {**old_info["unavailable"], **info["unavailable"]}
    return merged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=("quick", "full"), default=None, help="default: full on CUDA, else quick")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--only", default=None, help=f"comma-separated parts of {tuple(PARTS)}; merged into the day's file")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--results", default=str(RESULTS), help="where the files go (default: benchmarks/results)")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    suite = args.set or ("full" if device.type == "cuda" else "quick")
    parts = args.only.split(",") if args.only else list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"--only: unknown parts {sorted(unknown)}; known: {list(PARTS)}")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"{machine.slug(device)}-{dt.date.today().isoformat()}"
    part_json = stem.with_suffix(".part.json")
    cmd = [sys.executable, "-m", "pytest", *(str(HERE / PARTS[p]) for p in parts), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={part_json}", "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name",
           "--benchmark-group-by=group", "--benchmark-disable-gc", f"--bench-set={suite}", f"--bench-device={device}"]
    if args.threads:
        cmd.append(f"--bench-threads={args.threads}")
    code = subprocess.call(cmd + args.pytest_args, cwd=HERE.parent)
    if not part_json.exists():
        return code or 1
    result = json.loads(part_json.read_text())
    for b in result["benchmarks"]:  # the case is in its name and extra_info; the options are the suite's
        for key in ("options", "params", "param"):
            b.pop(key, None)
    out = stem.with_suffix(".json")
    if args.only and out.exists():
        result = merge(json.loads(out.read_text()), result)
    out.write_text(json.dumps(result, indent=1) + "\n")
    part_json.unlink()
    for path in [out, *report.write_report(out)]:
        print(path)
    return code


if __name__ == "__main__":
    sys.exit(main())
