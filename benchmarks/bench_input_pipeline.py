"""Input-pipeline throughput of `tpp train` on ImageNet-like JPEGs (issue 14 §2): images/s per loader worker and per
training process, and CPU time per image, for each way the training images reach the model.

    python benchmarks/bench_input_pipeline.py                       # CPU figures, 1 worker (a loaded, small machine)
    python benchmarks/bench_input_pipeline.py --workers 8 --images 1024   # a training node; GPU rows when CUDA is there

Paths (the same RandomResizedCrop(224) + flip, or Resize(256) + CenterCrop(224), drawn from the same per-sample seeds):

* ``float`` — before issue 14: PIL decode, crop and resize, ``ToTensor`` + ``Normalize`` in the worker, float32
  batches (602 KB per 224² image to copy);
* ``uint8`` — the default now: the same PIL decode, crop and resize, a uint8 HWC view (no float conversion, no
  transposition), channels_last uint8 batches (150 KB per image); ``Normalize`` runs on the device (its cost on
  this device is reported apart: ``device normalize``);
* ``tensor`` — ``--decode cpu-tensor``: the worker decodes with ``torchvision.io.decode_jpeg`` (libjpeg, bitwise
  PIL's decode) and crops, resizes and flips the uint8 tensor (torch's antialiased bilinear kernel: pixels within 2
  levels of PIL's, same crops);
* ``jpeg`` — ``--decode gpu``: the worker reads the file and draws the crop from the JPEG header; decoding, crop,
  resize and flip run on the GPU (``device decode`` row, only when CUDA is available).

DALI is not a path of `tpp train` (see the README), so it is not measured.

Per worker: one process, torch limited to one thread (as in a DataLoader worker), ``dataset[(index, seed)]`` over
the files in turn; ``--repeats`` passes after one warm-up pass; the median pass gives img/s, and
``time.process_time`` gives the CPU time per image. Per process: a DataLoader with ``--workers`` workers (batch
``--batch``, collate and the hand-over to the training process included), median of ``--repeats`` passes after a
warm-up pass. The synthetic images (``--images`` JPEGs of 500×375 and 375×500, smooth random fields with noise,
quality 90, about ImageNet's bytes per pixel) are written to a temporary folder. Results:
``benchmarks/results/input-pipeline-<device>-<date>.{json,md}`` with the machine and its load average.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402

from tpp.train.data import SeededSamples, build_datasets, build_loaders, sample_seed  # noqa: E402
from tpp.train.decode import collate as encoded_collate  # noqa: E402

PATHS = ("float", "uint8", "tensor", "jpeg")
BYTES_PER_IMAGE = {"float": 4, "uint8": 1, "tensor": 1, "jpeg": 1}     # per pixel and channel of the copied batch


def write_images(root: Path, count: int, seed: int = 0) -> float:
    """``count`` JPEGs in ``root/{train,val}/c{0..3}/``; returns the mean file size in KB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = []
    for split in ("train", "val"):
        for i in range(count):
            width, height = (500, 375) if i % 2 == 0 else (375, 500)
            coarse = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
            pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
            folder = root / split / f"c{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:05d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            sizes.append(path.stat().st_size)
    return statistics.mean(sizes) / 1e3


def worker_pass(dataset, rep: int, seeded: bool) -> tuple[float, float]:
    """Seconds of wall and CPU time per image of one pass of ``dataset[(i, seed)]`` (or ``dataset[i]``) here."""
    samples = SeededSamples(dataset)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(len(dataset)):
        _ = samples[(i, sample_seed(0, rep, i))] if seeded else samples[i]
    return (time.perf_counter() - wall0) / len(dataset), (time.process_time() - cpu0) / len(dataset)


def process_pass(loader, rep: int) -> float:
    """Seconds per image of one pass of the training ``loader`` as the training process receives it."""
    loader.sampler.set_epoch(rep)
    t0, seen = time.perf_counter(), 0
    for _, y in loader:
        seen += len(y)
    return (time.perf_counter() - t0) / seen


def interleaved(measure, keys: list, repeats: int) -> dict:
    """``{key: [measure(key, rep) for rep in 1..repeats]}`` after a warm-up round, the keys alternating within each
    round so that the load of a shared machine falls on every key alike."""
    out: dict = {k: [] for k in keys}
    for rep in range(repeats + 1):
        for k in keys:
            value = measure(k, rep)
            if rep:
                out[k].append(value)
    return out


def summary(passes: list) -> dict:
    """img/s (median pass) and CPU ms per image (median) of ``[(wall s, cpu s) per image]`` passes."""
    return {"img_s": 1 / statistics.median(w for w, _ in passes),
            "cpu_ms_per_image": 1e3 * statistics.median(c for _, c in passes),
            "img_s_passes": [round(1 / w, 1) for w, _ in passes]}


def device_normalize(train_set, batch: int, device: torch.device, repeats: int = 20) -> dict:
    """µs per image of :class:`~tpp.train.prefetch.Normalize` on a uint8 batch on ``device`` in the memory format
    `tpp train` uses there by default (channels_last on CUDA, contiguous on the CPU)."""
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    if device.type != "cuda":
        x = x.contiguous()
    return {"us_per_image": _timed(lambda: train_set.normalize(x), device, repeats) / batch * 1e6}


def device_decode(jpeg_set, batch: int, device: torch.device, repeats: int = 10) -> dict:
    """µs per image of decoding, cropping, resizing and flipping a batch of JPEGs on ``device``."""
    samples = SeededSamples(jpeg_set)
    encoded, _ = encoded_collate([samples[(i, sample_seed(0, 0, i))] for i in range(batch)])
    return {"us_per_image": _timed(lambda: encoded.decode(device), device, repeats) / batch * 1e6}


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after two warm-up calls, synchronized on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for rep in range(repeats + 2):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if rep >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="JPEGs per split")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the per-process figure")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    paths = args.paths.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)                       # what a DataLoader worker runs with
    load_start = os.getloadavg()
    result: dict = {"machine": machine.describe(device), "load_average_start": load_start, "args": vars(args),
                    "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result["jpeg_kb"] = write_images(root, args.images)
        sets = {p: build_datasets("imagefolder", str(root), 224, pixels=p) for p in paths}
        train = interleaved(lambda p, rep: worker_pass(sets[p][0], rep, True), paths, args.repeats)
        val_paths = [p for p in paths if p in ("float", "uint8")]   # the others evaluate as uint8 does
        val = interleaved(lambda p, rep: worker_pass(sets[p][1], rep, False), val_paths, args.repeats)
        loaders = {p: build_loaders(*sets[p], args.batch, args.batch, rank=0, world_size=1, seed=0,
                                    workers=args.workers, pin_memory=False)[0] for p in paths}
        process = interleaved(lambda p, rep: process_pass(loaders[p], rep), paths, args.repeats)
        for path in paths:
            passes = process[path]
            row = {"path": path, "batch_bytes_per_image": BYTES_PER_IMAGE[path] * 3 * 224 * 224,
                   "train_worker": summary(train[path]),
                   "train_process": {"img_s": 1 / statistics.median(passes),
                                     "img_s_passes": [round(1 / t, 1) for t in passes]}}
            if path in val:
                row["val_worker"] = summary(val[path])
            if path == "uint8":
                row["device_normalize"] = device_normalize(sets[path][0], args.batch, device)
            if path == "jpeg" and device.type == "cuda":
                row["device_decode"] = device_decode(sets[path][0], args.batch, device)
            if "float" in paths:          # per-round ratios: the rounds alternate paths, so load cancels
                row["train_worker"]["vs_float"] = statistics.median(
                    f[0] / t[0] for f, t in zip(train["float"], train[path]))
                row["train_worker"]["cpu_vs_float"] = statistics.median(
                    f[1] / t[1] for f, t in zip(train["float"], train[path]))
                row["train_process"]["vs_float"] = statistics.median(
                    f / t for f, t in zip(process["float"], process[path]))
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    result["load_average_end"] = os.getloadavg()
    write(result, Path(args.out), device)
    return result


def write(result: dict, out: Path, device: torch.device) -> None:
    m, a = result["machine"], result["args"]
    lines = [f"# Input pipeline — {m['device']} — {dt.date.today().isoformat()}", "",
             f"`python benchmarks/bench_input_pipeline.py` ({a['images']} JPEGs per split, mean "
             f"{result['jpeg_kb']:.0f} KB, 500×375 / 375×500; {a['workers']} DataLoader worker(s), batch "
             f"{a['batch']}; median of {a['repeats']} passes after a warm-up). torch {m['torch']}, Python "
             f"{m['python']}. Load average (1, 5, 15 min) at the start "
             f"{', '.join(f'{v:.2f}' for v in result['load_average_start'])}, at the end "
             f"{', '.join(f'{v:.2f}' for v in result['load_average_end'])}.", "",
             "Ratios are medians of per-round ratios (each round runs every path once, so the load falls on all).", "",
             "| path | train img/s per worker | vs float | CPU ms per train image | CPU vs float | "
             f"val img/s per worker | train img/s per process ({a['workers']} worker) | vs float | "
             "batch bytes per image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        tw = r["train_worker"]
        ratio = f"{tw['vs_float']:.2f}×" if "vs_float" in tw else "—"
        val = f"{r['val_worker']['img_s']:.0f}" if "val_worker" in r else "as uint8"
        tp = r["train_process"]
        process_ratio = f"{tp['vs_float']:.2f}×" if "vs_float" in tp else "—"
        cpu_ratio = f"{tw['cpu_vs_float']:.2f}×" if "cpu_vs_float" in tw else "—"
        lines.append(f"| {r['path']} | {tw['img_s']:.0f} | {ratio} | {tw['cpu_ms_per_image']:.2f} | {cpu_ratio} | "
                     f"{val} | {tp['img_s']:.0f} | {process_ratio} | {r['batch_bytes_per_image'] / 1e3:.0f} KB |")
    lines.append("")
    for r in result["rows"]:
        for key, label in (("device_normalize", "device normalize"), ("device_decode", "device decode + crop")):
            if key in r:
                lines.append(f"* {label} ({r['path']} path) on {m['device']}: {r[key]['us_per_image']:.1f} µs per "
                             "image")
    path = machine.write_result(out, "input-pipeline", device, result, "\n".join(lines) + "\n")
    print(f"wrote {path} and its .json")


if __name__ == "__main__":
    main()
