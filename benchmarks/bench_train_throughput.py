"""Training throughput of `tpp train`'s step (issue 5 §6): images/s of ResNet50 with AMP and channels_last at the
largest batch that fits, without a regularizer, with TPP's Triton regularizer, and with the literal full-gram
regularizer of the paper's code; the regularizer's share of the step time.

    python benchmarks/bench_train_throughput.py                          # one GPU, ResNet50 2.31×, bf16, auto batch
    torchrun --nproc_per_node 8 benchmarks/bench_train_throughput.py     # per-process and total images/s (DDP)
    python benchmarks/bench_train_throughput.py --batch 32,256           # the DDP per-GPU batch beside bs-256
    python benchmarks/bench_train_throughput.py --quick                  # CPU: resnet20 at 32², bs 32 and 256
    python benchmarks/bench_train_throughput.py --device cpu --model resnet20 --image-size 32 --batch 8 \\
        --steps 2 --warmup 1 --variants none,torch,paper                 # a smoke test of the script

A step is exactly the one `tpp train` runs (:meth:`tpp.train.engine.Engine.train_step`: zero grads, autocast forward,
cross-entropy, backward — through the GradScaler with fp16 —, the regularizer's ``apply_gradients()`` after
``unscale_``, optimizer step) plus ``reg.step()``, on one fixed random batch on the device: data loading is not
timed (measure it separately: it is the bottleneck of most ImageNet setups, not the step). The regularizer runs at
strength 1 (the schedule's ceiling, where it costs what it costs during most of the pruning phase).

Variants (same model, layer set and batch):

* ``none``   — no regularizer;
* ``triton`` — ``TPPRegularizer(backend="triton")``, the pruned-row Triton kernels, in place after backward;
* ``cuda``   — ``TPPRegularizer(backend="cuda")`` (the csrc extension), when it builds;
* ``torch``  — ``TPPRegularizer(backend="torch")``, the pruned-row form in eager PyTorch;
* ``paper``  — the paper's code: ``c · Σ mse(W Wᵀ, target)`` with the full N×N gram and its per-index masking loop
  (:func:`tpp.reference.decorrelation_penalty_reference_run`) differentiated by autograd, plus the same L2 and BN
  gradient terms.

Step anatomy at the real batch: under DDP each GPU steps on its share of the global batch — 32 images of the
recipes' 256 on 8 GPUs — so ``--batch 32,256`` times every variant at both per-process batches; the regularizer's
work does not depend on the batch, so its share of a bs-32 step is about 8× its share of a bs-256 step.
``--batch auto`` is the largest multiple of 32 for which the ``none`` step fits (doubling, then bisection); every
variant runs at each batch (a variant that does not fit is reported as such). ``--quick`` is a CPU-sized run
(resnet20 at 32², the smoke recipe's layer set, bs 32 and 256, variants none and torch, one thread).
Timing: ``--warmup`` steps (cudnn.benchmark and Triton autotuning happen there), then ``--repeats`` windows of
``--steps`` steps, each bracketed by a device synchronization; the median window gives images/s. ``share`` =
(t_variant − t_none) / t_variant at the same batch (also from the fastest windows), and the regularizer's
``apply_gradients()`` timed alone over the step — the robust figure on a loaded machine.
Results: ``benchmarks/results/train-throughput-<device>-<date>.{json,md}`` (rank 0), device named.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402

from tpp import TPPRegularizer, reference  # noqa: E402
from tpp.models import build_model  # noqa: E402
from tpp.train import distributed as D  # noqa: E402
from tpp.train.engine import Engine, resolve_amp  # noqa: E402
from tpp.train.recipes import RESNET50_SETTINGS  # noqa: E402

PAPER_GRAM_WEIGHT = 1000.0
VARIANTS = ("none", "triton", "cuda", "torch", "paper")


class PaperRegularizer:
    """The paper's computation of the penalty's gradients: full-gram MSE with the per-index masked target, by
    autograd (what its training loop adds to the loss), plus the L2 and BN terms as gradients."""

    def __init__(self, model, spec, skip=()):
        self.rest = TPPRegularizer(model, spec, skip, gram_weight=0.0, backend="torch")
        self.rest.strength = 1.0
        device = next(model.parameters()).device
        self.layers = [(model.get_submodule(n).weight, p.to(device)) for n, p in self.rest.pruned.items()]

    def apply_gradients(self) -> None:
        weights = [w for w, _ in self.layers]
        with torch.enable_grad():
            loss = PAPER_GRAM_WEIGHT * torch.stack(
                [reference.decorrelation_penalty_reference_run(w, p) for w, p in self.layers]).sum()
            grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
                w.grad.add_(g)
        self.rest.apply_gradients()

    def step(self) -> None:
        self.rest.step()


def make_regularizer(variant: str, model, spec: str):
    if variant == "none":
        return None
    if variant == "paper":
        return PaperRegularizer(model, spec)
    reg = TPPRegularizer(model, spec, backend=variant)
    reg.strength = 1.0
    return reg


class Bench:
    def __init__(self, args, env):
        self.args, self.env = args, env
        self.amp = resolve_amp(args.amp, env.device)
        self.channels_last = env.device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "on"
        self.held = None                     # model, optimizer, batch of the current setup (freed between cases)

    def sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def setup(self, variant: str, batch: int):
        torch.manual_seed(0)
        a, env = self.args, self.env
        engine = Engine(env, amp=self.amp, channels_last=self.channels_last, batch_size=batch)
        model = engine.place(build_model(a.model, num_classes=a.num_classes), env.device)
        reg = make_regularizer(variant, model, a.spec)
        net = engine.wrap(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        x, y = engine.inputs(torch.randn(batch, 3, a.image_size, a.image_size),
                             torch.randint(0, a.num_classes, (batch,)), env.device)
        net.train()

        def step() -> None:
            engine.train_step(net, opt, x, y, reg)
            if reg is not None:
                reg.step()
        return step, reg, (engine, model, net, opt, x, y)

    def free(self) -> None:
        """Drop the model, optimizer and batch of the last setup and return their memory."""
        self.held = None
        gc.collect()
        if self.env.device.type == "cuda":
            torch.cuda.empty_cache()

    def fits(self, batch: int) -> bool:
        """Whether two ``none`` steps at ``batch`` run on every rank."""
        ok = True
        try:
            step, _, self.held = self.setup("none", batch)
            step()
            step()
            self.sync()
        except torch.OutOfMemoryError:
            ok = False
        step = None
        self.free()
        if self.env.distributed:
            flag = torch.tensor([1.0 if ok else 0.0], device=self.env.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = bool(flag.item())
        return ok

    def largest_batch(self) -> int:
        good, bad = 0, None
        b = 64
        while b <= self.args.max_batch:
            if self.fits(b):
                good, b = b, b * 2
            else:
                bad = b
                break
        if good == 0:
            raise SystemExit("not even a batch of 64 fits; pass --batch")
        bad = bad or good
        while bad - good > 32:
            mid = (good + bad) // 2 // 32 * 32
            if mid in (good, bad):
                break
            if self.fits(mid):
                good = mid
            else:
                bad = mid
        return good

    def time_variant(self, variant: str, batch: int) -> dict:
        a = self.args
        try:
            step, reg, self.held = self.setup(variant, batch)
        except ValueError as err:          # backend unavailable here
            return {"variant": variant, "skipped": str(err)}
        try:
            for _ in range(a.warmup):
                step()
            self.sync()
            windows = []
            for _ in range(a.repeats):
                self.sync()
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    step()
                self.sync()
                windows.append((time.perf_counter() - t0) / a.steps)
            reg_s = None
            if reg is not None:            # the regularizer's gradients alone, on the gradients of the last step
                times = []
                for _ in range(a.steps):
                    self.sync()
                    t0 = time.perf_counter()
                    reg.apply_gradients()
                    self.sync()
                    times.append(time.perf_counter() - t0)
                reg_s = statistics.median(times)
        except torch.OutOfMemoryError:
            step = reg = None
            self.free()
            return {"variant": variant, "skipped": f"out of memory at batch {batch}"}
        step_s = statistics.median(windows)
        out = {"variant": variant, "batch_per_process": batch, "step_ms": 1e3 * step_s,
               "step_ms_min": 1e3 * min(windows),
               "images_per_s_per_process": batch / step_s,
               "images_per_s_total": batch * self.env.world_size / step_s,
               "step_ms_windows": [1e3 * w for w in windows]}
        if reg_s is not None:
            out["regularizer_alone_ms"] = 1e3 * reg_s
            out["alone_share_of_step"] = reg_s / min(windows)
            out["pruned_layers"] = len(getattr(reg, "pruned", None) or reg.rest.pruned)
        if self.env.device.type == "cuda":
            out["max_memory_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.env.device)
        step = reg = None
        self.free()
        return out


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    batches = ", ".join(map(str, s["batch_per_process"]))
    lines = [f"# Training throughput — {s['model']} ({s['setting']}), {m['device']}", "",
             f"{s['world_size']} process(es), batch {batches} per process "
             f"({'largest that fits' if s['batch_auto'] else 'given'}), {s['image_size']}², amp {s['amp']}, "
             f"channels_last {s['channels_last']}, SGD momentum; {s['steps']} steps × {s['repeats']} windows after "
             f"{s['warmup']} warm-up steps (median window). torch {m['torch']}, triton {m['triton']}, "
             f"driver {m['driver']}. {result.get('note', '')}", "",
             "| batch | variant | step (ms) | fastest window (ms/step) | images/s per process | images/s total | "
             "regularizer share of the step (median; fastest) | regularizer alone (ms) | alone ÷ fastest step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["variants"]:
        if "skipped" in r:
            lines.append(f"| {r.get('batch_per_process', '—')} | {r['variant']} | — | — | — | — | skipped: "
                         f"{r['skipped']} | — | — |")
            continue
        share = "—" if r.get("share_of_step") is None else \
            f"{100 * r['share_of_step']:.2f}%; {100 * r['share_of_step_min']:.2f}%"
        alone = f"{r['regularizer_alone_ms']:.3f}" if "regularizer_alone_ms" in r else "—"
        ratio = f"{100 * r['alone_share_of_step']:.2f}%" if "alone_share_of_step" in r else "—"
        lines.append(f"| {r['batch_per_process']} | {r['variant']} | {r['step_ms']:.2f} | {r['step_ms_min']:.2f} | "
                     f"{r['images_per_s_per_process']:,.0f} | {r['images_per_s_total']:,.0f} | {share} | {alone} | "
                     f"{ratio} |")
    lines += ["", "share = (t_variant − t_none) / t_variant at the same batch, from the median and from the fastest "
                  "window; alone = the regularizer's apply_gradients() timed by itself (median), over the variant's "
                  "fastest step — the robust figure on a loaded machine. Target for triton: ≤ 1% at bs 256. Under "
                  "DDP (8 GPUs, global batch 256) each GPU steps at bs 32."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--setting", default="2.31x", help=f"ResNet50 setting {tuple(RESNET50_SETTINGS)} or a ratio spec")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"))
    ap.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--batch", default="auto", help="per-process batches, comma-separated (e.g. 32,256: the DDP "
                                                    "per-GPU batch beside bs-256), or auto (largest that fits)")
    ap.add_argument("--quick", action="store_true", help="CPU-sized: resnet20 at 32², the smoke layer set, 10 "
                                                         "classes, bs 32 and 256, variants none and torch")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--variants", default="none,triton,paper")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--note", default="", help="a line about the machine's load, for the results")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.quick:
        args.model, args.setting, args.num_classes, args.image_size = "resnet20", "*layer*.conv1:0.5", 10, 32
        args.batch, args.variants, args.device = "32,256", "none,torch", args.device or "cpu"
        args.steps, args.repeats, args.warmup, args.threads = min(args.steps, 4), max(args.repeats, 5), \
            min(args.warmup, 2), args.threads or 1
    args.spec = RESNET50_SETTINGS[args.setting][0] if args.setting in RESNET50_SETTINGS else args.setting
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown or "none" not in variants:
        ap.error(f"--variants: known {VARIANTS}, 'none' required; got {variants}")
    env = D.init_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        bench = Bench(args, env)
        batches = [bench.largest_batch()] if args.batch == "auto" else [int(b) for b in args.batch.split(",") if b]
        if env.is_main:
            print(f"batch {batches} per process on {machine.device_name(env.device)} × {env.world_size}", flush=True)
        results = []
        for batch in batches:
            rows = []
            for v in ["none"] + [v for v in variants if v != "none"]:
                r = dict(bench.time_variant(v, batch), batch_per_process=batch)
                rows.append(r)
                if env.is_main:
                    print(json.dumps(r), flush=True)
            base, fastest = rows[0].get("step_ms"), rows[0].get("step_ms_min")
            for r in rows[1:]:
                if base and "step_ms" in r:
                    r["share_of_step"] = (r["step_ms"] - base) / r["step_ms"]
                    r["share_of_step_min"] = (r["step_ms_min"] - fastest) / r["step_ms_min"]
            results += rows
        if env.is_main:
            result = {"machine": machine.describe(env.device), "date": dt.date.today().isoformat(), "note": args.note,
                      "settings": {"model": args.model, "setting": args.setting, "spec": args.spec,
                                   "image_size": args.image_size, "amp": str(bench.amp or "none").replace("torch.", ""),
                                   "channels_last": bench.channels_last, "batch_per_process": batches,
                                   "batch_auto": args.batch == "auto", "world_size": env.world_size,
                                   "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                                   "threads": torch.get_num_threads()},
                      "variants": results}
            path = machine.write_result(Path(args.out), "train-throughput", env.device, result, markdown(result))
            print(markdown(result))
            print(path)
    finally:
        D.shutdown(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
