"""The paper's gram computation against the pruned-row form, forward + backward, on a whole layer set.

Default: torchvision ResNet50 at the 2.31× setting of tpp-method §5 (32 layers, 3,346 pruned filters).
Forms timed (sum over all layers of the gram term, then backward to the weights):

* ``paper``        — full N×N gram, target = detached gram with pruned rows/cols zeroed by a Python loop over
                     indices, ``mse_loss`` (what MingSun-Tse/TPP runs: ``orth_regularization_v5``);
* ``masked-full``  — full N×N gram with a vectorized mask (``reference.decorrelation_penalty_full``);
* ``pruned-row``   — ``R = W_P Wᵀ`` only, autograd (``reference.decorrelation_penalty``);
* ``closed-form``  — pruned-row gradient without autograd (``reference.gram_penalty_grad``, the in-place path).

Medians after warm-up, device synchronized. Writes ``benchmarks/results/gram_forms-<device>-<date>.{json,md}``.
Run: ``python benchmarks/bench_gram_forms.py [--device cuda] [--repeats 20]``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision

from tpp import reference, select_filters

SETTING = "*layer[1-3]*conv[1-2]:0.6,*layer4*conv[1-2]:0.21"
RESULTS = Path(__file__).resolve().parent / "results"


def layer_set(device: torch.device):
    model = torchvision.models.resnet50(weights=None)
    pruned = select_filters(model, SETTING)
    weights = [model.get_submodule(n).weight.detach().to(device).requires_grad_(True) for n in pruned]
    return weights, [p.to(device) for p in pruned.values()]


def forms(weights, pruned):
    def backward_of(penalty):
        def run():
            total = sum(penalty(w, p) for w, p in zip(weights, pruned))
            total.backward()
            for w in weights:
                w.grad = None
        return run

    def closed_form():
        for w, p in zip(weights, pruned):
            reference.gram_penalty_grad(w, p)

    return {
        "paper": backward_of(reference.decorrelation_penalty_reference_run),
        "masked-full": backward_of(reference.decorrelation_penalty_full),
        "pruned-row": backward_of(reference.decorrelation_penalty),
        "closed-form": closed_form,
    }


def median_ms(fn, device, warmup: int, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False

    weights, pruned = layer_set(device)
    timings = {name: median_ms(fn, device, args.warmup, args.repeats) for name, fn in forms(weights, pruned).items()}
    result = {
        "benchmark": "gram term forward+backward, ResNet50 2.31x layer set",
        "setting": SETTING, "layers": len(weights), "pruned_filters": int(sum(p.numel() for p in pruned)),
        "device": machine(device), "torch": torch.__version__, "dtype": "float32",
        "date": dt.date.today().isoformat(), "warmup": args.warmup, "repeats": args.repeats,
        "median_ms": timings,
        "speedup_vs_paper": {k: timings["paper"] / v for k, v in timings.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"gram_forms-{device.type}-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Gram term, forward+backward — ResNet50 2.31× layer set ({result['layers']} layers, "
             f"{result['pruned_filters']} pruned filters)", "",
             f"Device: {result['device']}; torch {result['torch']}; float32; median of {args.repeats} after "
             f"{args.warmup} warm-up runs; {result['date']}.", "",
             "| form | median ms | speedup vs paper |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {result['speedup_vs_paper'][k]:.1f}× |" for k, v in timings.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
