"""How long a checkpoint blocks the training loop: a synchronous write (tpp before issue 14) against the
background write of :class:`tpp.train.checkpoint.CheckpointManager` (``background=True``: a host-memory snapshot,
then a writer thread).

    python benchmarks/bench_checkpoint.py                      # ResNet50 + SGD momentum (~195 MiB), CPU or GPU
    python benchmarks/bench_checkpoint.py --model resnet20 --saves 3      # a smoke test of the script

The state is what `tpp train` checkpoints for ResNet50: the model's state_dict and the SGD momentum buffers (on the
device), plus a history list. For each mode, ``--saves`` checkpoints are taken, ``--gap`` seconds of training steps
apart (a small model training on the CPU, or the model itself on a GPU, while the writer thread runs):

* ``blocked``: the time ``save()`` takes on the training thread — the whole write (fsync included) when
  synchronous; the snapshot copy (and any wait for the previous write) in the background;
* ``write``: the background write itself (``save()``'s return to the write's end, to a training step);
* ``step while writing``: the median training step while a write is in flight, against the median step without
  one (the writer thread shares the GIL and the host's cores).

Results: ``benchmarks/results/checkpoint-<device>-<date>.{json,md}``, machine named.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402

from tpp.models import build_model  # noqa: E402
from tpp.train.checkpoint import CheckpointManager  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer(device: torch.device):
    """One training step of the loop that runs while checkpoints are written: the model itself on a GPU is too
    big for the CPU, so there a resnet20 step at bs 32, 32² stands in."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32, device=device), torch.randint(0, 10, (32,), device=device)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sync(device)
        return time.perf_counter() - t0
    return step


def run(args, device: torch.device, background: bool, folder: Path) -> dict:
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=1000).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    step = trainer(device)
    for _ in range(3):
        step()
    manager = CheckpointManager(folder, keep_last=2, background=background)
    blocked, writes, busy_steps, idle_steps = [], [], [], []
    for i in range(args.saves):
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "history": [{"i": j} for j in range(i)],
                 "stage": "regularize", "iteration": i}
        sync(device)
        t0 = time.perf_counter()
        manager.save(state, "iteration")
        t1 = time.perf_counter()
        blocked.append(t1 - t0)
        with torch.no_grad():                  # training changes the model right after the save
            for p in model.parameters():
                p.add_(1e-3)
        end, done = t1 + args.gap, None
        while time.perf_counter() < end:
            writing = manager.writer is not None and manager.writer.busy
            if not writing and done is None:
                done = time.perf_counter()      # the write ended during the last step (step granularity)
            (busy_steps if writing else idle_steps).append(step())
        manager.wait()
        if background:
            writes.append((done or time.perf_counter()) - t1)
    manager.close()
    size = max(p.stat().st_size for p in folder.glob("ckpt-*.pt"))
    out = {"mode": "background" if background else "synchronous", "checkpoint_mib": size / 2**20,
           "blocked_s": blocked, "blocked_median_s": statistics.median(blocked),
           "step_idle_median_ms": 1e3 * statistics.median(idle_steps) if idle_steps else None,
           "step_while_writing_median_ms": 1e3 * statistics.median(busy_steps) if busy_steps else None,
           "steps_while_writing": len(busy_steps)}
    if background:
        out["write_s"] = writes
        out["write_median_s"] = statistics.median(writes)
    return out


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"# Checkpoint stall — {s['model']} + SGD momentum, {m['device']}", "",
             f"{s['saves']} checkpoints, {s['gap']} s of training steps (resnet20, bs 32, 32², on {s['device']}) "
             f"after each; files on {s['folder_fs']}. torch {m['torch']}. {result['note']}", "",
             "| mode | checkpoint (MiB) | training loop blocked per checkpoint (median, s) | blocked (each, s) | "
             "background write (median, s) | step idle (ms) | step while a write runs (ms) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["modes"]:
        each = ", ".join(f"{b:.3f}" for b in r["blocked_s"])
        idle = "—" if r["step_idle_median_ms"] is None else f"{r['step_idle_median_ms']:.1f}"
        busy = "—" if r["step_while_writing_median_ms"] is None else f"{r['step_while_writing_median_ms']:.1f}"
        write = f"{r['write_median_s']:.3f}" if "write_median_s" in r else "—"
        lines.append(f"| {r['mode']} | {r['checkpoint_mib']:.0f} | {r['blocked_median_s']:.3f} | {each} | {write} | "
                     f"{idle} | {busy} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--gap", type=float, default=2.0, help="seconds of training steps after each checkpoint")
    ap.add_argument("--device", default=None)
    ap.add_argument("--folder", default=None, help="where the checkpoints go (default: a temporary folder)")
    ap.add_argument("--note", default="", help="a line about the machine's load, for the results")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(1)
    modes = []
    for background in (False, True):
        with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
            r = run(args, device, background, Path(tmp))
        print(json.dumps(r), flush=True)
        modes.append(r)
    import subprocess

    fs = subprocess.run(["df", "-T", args.folder or tempfile.gettempdir()], capture_output=True, text=True)
    result = {"machine": machine.describe(device), "date": dt.date.today().isoformat(), "note": args.note,
              "settings": {"model": args.model, "saves": args.saves, "gap": args.gap, "device": str(device),
                           "folder_fs": " ".join(fs.stdout.splitlines()[-1].split()[:2]) if fs.stdout else "?"},
              "modes": modes}
    path = machine.write_result(Path(args.out), f"checkpoint-{args.model}", device, result, markdown(result))
    print(markdown(result))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
