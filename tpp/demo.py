"""``make demo`` / ``python -m tpp.demo``: TPP against L1 and OrthP on the embedded 8×8 digits, offline, on a CPU.

Trains models on scikit-learn's bundled digits (no download) — MLP-7-Linear (64 → 100 ×6 → 10, no activation,
the paper's trainability testbed; the flattened 8×8 image is its input) and ``digits_cnn`` (conv-BN-ReLU 32, 32,
pool, 64; avg-pool; Linear) — then prunes each at several ratios with L1, OrthP and TPP through
:func:`tpp.pipeline.run_pruning`, and reports the test accuracy right after removal and after finetuning, the mean
Jacobian singular value (JSV) right after removal, and the parameter reduction and FLOPs speedup. Pruned layers:
every MLP hidden layer (not the classifier); every conv of the CNN but the first (the paper's VGG setting). Two
models beyond the paper's private layers (tpp-method.md §12): ``digits_resnet`` (a residual CNN: its residual
channels are pruned as coupled groups, every conv but the classifier) and ``digits_vit`` (a tiny ViT, patch 2: its
attention heads and MLP neurons are pruned; the LayerNorm-coupled residual stream is not). ``digits_vit`` runs the
pruning phase at the paper's lr 1e-3: a head's gram term (N = 8 heads, vectors of 3·d_h·E = 384) is far stiffer
than a conv layer's, and at the demo's 1e-2 with momentum its SGD diverges.

The schedule is the ``demo`` recipe of :data:`tpp.pipeline.RECIPES`, a scaled-down version of the paper's: strength
grows by 0.0025 every iteration to 1 (400 iterations; paper: 1e-4 every 10 iterations, 100k), 200 stabilize
iterations with layers zeroed 20 iterations apart (paper: 10k, 100 apart), pruning-phase lr 1e-2 (paper 1e-3) and
10 finetuning epochs (paper 120). Everything else is as in the paper.

Writes ``runs/demo-<timestamp>/``: ``report.md``, ``results.json`` (every run's metrics and histories),
``table.txt``, ``config.json`` and plots of accuracy and mean JSV against the pruning ratio.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "run_demo", "DEMO_MODELS"]

# name -> (build_model kwargs, layers never pruned, run_pruning arguments replacing the recipe's)
DEMO_MODELS = {
    "mlp7": ({"in_features": 64}, (), {}),
    "digits_cnn": ({}, ("features.0",), {}),
    "digits_resnet": ({}, (), {}),
    "digits_vit": ({}, (), {"reg_lr": 1e-3}),
}
DEFAULT_RATIOS = (0.5, 0.7, 0.9)
DEFAULT_METHODS = ("l1", "orthp", "tpp")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu})"


def run_demo(out: Path, ratios: Sequence[float] = DEFAULT_RATIOS, methods: Sequence[str] = DEFAULT_METHODS,
             models: Sequence[str] = tuple(DEMO_MODELS), seed: int = 0, finetune_epochs: Optional[int] = None,
             pretrain_epochs: Optional[int] = None, log=print, threads: Optional[int] = 1) -> dict:
    """Run the demo into ``out`` (created); returns ``{"rows", "results", "meta", "table", "pretrained"}``.

    ``threads``: torch CPU threads (default 1: these models are far too small to gain from more, and one thread
    is not slowed down by other processes competing for the cores; ``None`` keeps torch's setting)."""
    import torch

    from .data import build_loader, load_digits_split
    from .files import write_json, write_text_atomic
    from .metrics import count_params, jacobian_singular_values
    from .models import build_model
    from .pipeline import RECIPES, evaluate, run_pruning, train
    from .report import SUMMARY_COLUMNS, format_table, plot_demo, summary_row, write_demo_report

    start = time.perf_counter()
    torch.set_flush_denormal(True)  # decaying weights must not fall into slow denormal arithmetic on CPUs
    if threads:
        torch.set_num_threads(threads)
    recipe = RECIPES["demo"]
    if finetune_epochs is not None:
        recipe = replace(recipe, finetune_epochs=finetune_epochs,
                         lr_milestones=tuple(m for m in recipe.lr_milestones if m < finetune_epochs))
    if pretrain_epochs is not None:
        recipe = replace(recipe, pretrain_epochs=pretrain_epochs,
                         pretrain_milestones=tuple(m for m in recipe.pretrain_milestones if m < pretrain_epochs))
    out.mkdir(parents=True, exist_ok=False)
    train_set, test_set = load_digits_split(seed=seed)

    def train_loader():  # a fresh seeded loader per phase: every method sees the same data order
        return build_loader(train_set, recipe.batch_size, train=True, seed=seed)

    test_loader = build_loader(test_set, 512, train=False)
    log(f"digits: {len(train_set)} training / {len(test_set)} test images (8×8); run folder {out}")

    rows, results, pretrained = [], [], {}
    total = len(models) * len(ratios) * len(methods)
    for name in models:
        kwargs, skip, overrides = DEMO_MODELS[name]
        torch.manual_seed(seed)
        model = build_model(name, **kwargs)
        t0 = time.perf_counter()
        train(model, train_loader(), recipe.pretrain_epochs, recipe.pretrain_lr, momentum=recipe.momentum,
              weight_decay=recipe.weight_decay, milestones=recipe.pretrain_milestones)
        acc, _ = evaluate(model, test_loader)
        jsv = jacobian_singular_values(model, test_set.tensors[0][:64]).mean().item()
        pretrained[name] = {"epochs": recipe.pretrain_epochs, "accuracy": acc, "jsv": jsv,
                            "params": count_params(model), "time_s": time.perf_counter() - t0}
        log(f"{name}: trained {recipe.pretrain_epochs} epochs in {time.perf_counter() - t0:.1f} s, "
            f"test accuracy {acc:.2f}%, mean JSV {jsv:.4g}")
        for ratio in ratios:
            for method in methods:
                result = run_pruning(copy.deepcopy(model), train_loader(), test_loader, method, float(ratio),
                                     skip=skip, seed=seed, **{**recipe.run_kwargs(), **overrides})
                data = result.to_dict()
                data["model"] = name
                results.append(data)
                row = summary_row(data, model=name)
                rows.append(row)
                log(f"[{len(rows)}/{total}] {name} ratio {ratio:g} {method:<6} accuracy {row['acc_base']:.2f} → "
                    f"{row['acc_after_removal']:.2f} removed → {row['acc_final']:.2f} finetuned, mean JSV "
                    f"{row['jsv_after_removal']:.4g} removed ({row['time_s']:.1f} s)")
    wall = time.perf_counter() - start
    columns = [c for c in SUMMARY_COLUMNS if c[0] != "jsv_base"]
    table = format_table(rows, columns)
    meta = {"machine": _machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "wall_time_s": wall, "seed": seed,
            "recipe": recipe.description if finetune_epochs is None and pretrain_epochs is None
            else json.dumps(recipe.to_dict()),
            "command": " ".join(["python -m tpp.demo"] + sys.argv[1:]), "ratios": list(ratios),
            "methods": list(methods), "models": list(models)}
    plots = plot_demo(rows, out)
    write_text_atomic(out / "table.txt", table + "\n")
    write_json(out / "results.json", {"meta": meta, "pretrained": pretrained, "rows": rows, "results": results})
    write_json(out / "config.json", {"recipe": recipe.to_dict(), **meta})
    write_demo_report(out, rows, meta, plots, pretrained)
    return {"rows": rows, "results": results, "meta": meta, "table": table, "pretrained": pretrained}


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios like 0.5,0.7, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < 1]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"pruning ratios must lie in [0, 1), got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .baselines import METHODS

    parser = argparse.ArgumentParser(prog="python -m tpp.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", help="run folder (default runs/demo-<timestamp>); must not exist")
    parser.add_argument("--ratios", type=_floats, default=DEFAULT_RATIOS, help="pruning ratios, e.g. 0.5,0.7,0.9")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--models", default=",".join(DEMO_MODELS), help=f"any of {', '.join(DEMO_MODELS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-epochs", type=int, help="override the demo recipe's 10")
    parser.add_argument("--pretrain-epochs", type=int, help="override the demo recipe's 30")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); 1 is fastest for these tiny models")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
    for m in models:
        if m not in DEMO_MODELS:
            parser.error(f"unknown demo model {m!r}; allowed: {', '.join(DEMO_MODELS)}")
    out = Path(args.out) if args.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists():
        parser.error(f"--out {out} already exists; choose another folder")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        parser.error('the demo needs scikit-learn for the embedded digits: pip install "tpp[demo]"')
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    demo = run_demo(out, args.ratios, methods, models, args.seed, args.finetune_epochs, args.pretrain_epochs, log,
                    args.threads or None)
    print()
    print(demo["table"])
    print()
    print(f"machine: {demo['meta']['machine']}, torch {demo['meta']['torch']}, torch threads: "
          f"{demo['meta']['threads']}")
    print(f"wall time: {demo['meta']['wall_time_s']:.1f} s; report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
