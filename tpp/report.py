"""Reports of pruning runs: terminal/markdown tables, a markdown report per run and per demo, PNG plots.

Plots need matplotlib (``pip install "tpp[demo]"``); without it the ``plot_*`` functions return no files and the
reports say so. matplotlib is imported on first use with the non-interactive ``Agg`` backend.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from .files import write_atomic, write_text_atomic

__all__ = ["Column", "SUMMARY_COLUMNS", "summary_row", "format_table", "markdown_table", "plot_run", "plot_demo",
           "write_run_report", "write_demo_report", "matplotlib_available"]

Column = tuple[str, str, str]  # (key, header, format spec)

SUMMARY_COLUMNS: tuple[Column, ...] = (
    ("model", "model", "s"),
    ("ratio", "ratio", "s"),
    ("method", "method", "s"),
    ("acc_base", "acc base", ".2f"),
    ("acc_after_removal", "acc removed", ".2f"),
    ("acc_final", "acc finetuned", ".2f"),
    ("jsv_base", "JSV base", ".4g"),
    ("jsv_after_removal", "JSV removed", ".4g"),
    ("params_reduction", "params ÷", ".2f"),
    ("speedup", "FLOPs ×", ".2f"),
)


def summary_row(result: Mapping, **extra) -> dict:
    """One table row from a ``PruneResult.to_dict()``: accuracies (%), mean JSVs, params reduction, FLOPs speedup;
    ``extra`` (e.g. ``model=...``) is added as is."""
    m = result["metrics"]
    ratio = result["config"]["ratio"]
    row = {
        "method": result["method"],
        "ratio": ratio if isinstance(ratio, str) else (f"{ratio:g}" if isinstance(ratio, float) else str(ratio)),
        "acc_base": m["accuracy"]["base"],
        "acc_before_removal": m["accuracy"].get("before_removal"),
        "acc_after_removal": m["accuracy"].get("after_removal"),
        "acc_final": m["accuracy"].get("final"),
        "acc_best": m["accuracy"].get("best"),
        "jsv_base": m["jsv_mean"].get("base"),
        "jsv_before_removal": m["jsv_mean"].get("before_removal"),
        "jsv_after_removal": m["jsv_mean"].get("after_removal"),
        "jsv_final": m["jsv_mean"].get("final"),
        "params_base": m["params"]["base"],
        "params_pruned": m["params"].get("pruned"),
        "params_reduction": m["params"].get("reduction"),
        "flops_base": m["flops"]["base"],
        "flops_pruned": m["flops"].get("pruned"),
        "speedup": m["flops"].get("speedup"),
        "time_s": m["time_s"].get("total"),
    }
    row.update(extra)
    return row


def _cell(value, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def format_table(rows: Sequence[Mapping], columns: Sequence[Column] = SUMMARY_COLUMNS) -> str:
    """Aligned plain-text table (numbers right-aligned) for the terminal."""
    header = [h for _, h, _ in columns]
    body = [[_cell(row.get(k), spec) for k, _, spec in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = [spec != "s" for _, _, spec in columns]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def markdown_table(rows: Sequence[Mapping], columns: Sequence[Column] = SUMMARY_COLUMNS) -> str:
    """GitHub-flavoured markdown table."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    align = "|" + "|".join("---:" if spec != "s" else ":---" for _, _, spec in columns) + "|"
    body = ["| " + " | ".join(_cell(row.get(k), spec) for k, _, spec in columns) + " |" for row in rows]
    return "\n".join([header, align] + body)


# -------------------------------------------------------------------------------------------------- plots
def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_run(result: Mapping, out_dir: Path) -> list[Path]:
    """``strength_penalty.png`` (regularization methods), ``accuracy.png`` and ``jsv.png`` for one run."""
    if not matplotlib_available():
        return []
    plt = _pyplot()
    out_dir = Path(out_dir)
    files = []
    m, history = result["metrics"], result["history"]
    reg = history.get("regularize") or []
    if reg:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        its = [r["iteration"] for r in reg]
        ax1.plot(its, [r["strength"] for r in reg], color="tab:blue")
        ax1.set(xlabel="iteration", ylabel="strength r", title="regularization strength")
        stabilize = [r["iteration"] for r in reg if r.get("phase") in ("stabilize", "done")]
        if stabilize:
            for ax in (ax1, ax2):
                ax.axvline(stabilize[0], color="gray", linestyle=":", linewidth=1)
            ax1.annotate(" stabilize + zero-out", (stabilize[0], 0), fontsize=8, color="gray")
        ax2.plot(its, [r["penalty"] for r in reg], color="tab:red", label="penalty")
        ax2.plot(its, [r["loss"] for r in reg], color="tab:gray", label="cross-entropy")
        if any(r["penalty"] > 0 for r in reg):
            ax2.set_yscale("symlog", linthresh=1e-4)
        ax2.set(xlabel="iteration", title="penalty and training loss")
        ax2.legend()
        fig.tight_layout()
        files.append(_save(fig, out_dir / "strength_penalty.png", plt))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    stages = [("base", "given"), ("before_removal", "pre-removal"), ("after_removal", "removed"),
              ("final", "finetuned")]
    values = [m["accuracy"].get(k) for k, _ in stages]
    bars = ax1.bar([label for _, label in stages], [v or 0 for v in values], color="tab:blue")
    for bar, v in zip(bars, values):
        ax1.annotate("–" if v is None else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=8)
    ax1.set(ylabel="test accuracy (%)", ylim=(0, 105), title=f"{result['method']}: accuracy")
    ft = history.get("finetune") or []
    ft = [r for r in ft if "test_acc" in r]
    if ft:
        ax2.plot([0] + [r["epoch"] for r in ft], [m["accuracy"].get("after_removal")] + [r["test_acc"] for r in ft],
                 marker="o", markersize=3)
    ax2.set(xlabel="finetuning epoch", ylabel="test accuracy (%)", title="finetuning")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    files.append(_save(fig, out_dir / "accuracy.png", plt))

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    values = [m["jsv_mean"].get(k) for k, _ in stages]
    if any(v is not None for v in values):
        bars = ax.bar([label for _, label in stages], [v or 0 for v in values], color="tab:green")
        for bar, v in zip(bars, values):
            ax.annotate("–" if v is None else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        present = [v for v in values if v is not None]
        if all(v > 0 for v in present) and max(present) / min(present) > 100:  # e.g. L1 on a linear MLP
            ax.set_yscale("log")
    ax.set(ylabel="mean Jacobian singular value", title=f"{result['method']}: mean JSV")
    fig.tight_layout()
    files.append(_save(fig, out_dir / "jsv.png", plt))
    return files


def _save(fig, path: Path, plt) -> Path:
    try:
        write_atomic(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110))
    finally:
        plt.close(fig)
    return path


def plot_demo(rows: Sequence[Mapping], out_dir: Path) -> list[Path]:
    """Per model: accuracy after removal / after finetuning and mean JSV after removal, against the ratio."""
    if not matplotlib_available() or not rows:
        return []
    plt = _pyplot()
    files = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for key, ylabel, log, name in (
        ("acc_after_removal", "accuracy right after removal (%)", False, "demo_accuracy_removed.png"),
        ("acc_final", "accuracy after finetuning (%)", False, "demo_accuracy_finetuned.png"),
        ("jsv_after_removal", "mean JSV right after removal", True, "demo_jsv.png"),
    ):
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
        for ax, model in zip(axes[0], models):
            for method in methods:
                pts = sorted((float(r["ratio"]), r[key]) for r in rows
                             if r["model"] == model and r["method"] == method and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=method)
            base = [r["jsv_base" if log else "acc_base"] for r in rows if r["model"] == model]
            if base:
                ax.axhline(base[0], color="gray", linestyle="--", linewidth=1, label="unpruned")
            if log:
                ax.set_yscale("log")
            ax.set_xticks(sorted({float(r["ratio"]) for r in rows if r["model"] == model}))
            ax.set(title=model, xlabel="pruning ratio", ylabel=ylabel)
            ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(_save(fig, Path(out_dir) / name, plt))
    return files


# ------------------------------------------------------------------------------------------------ reports
def _images(files: Iterable[Path]) -> list[str]:
    return [f"![{Path(f).stem}]({Path(f).name})" for f in files]


def write_run_report(out_dir: Path, config: Mapping, result: Mapping, plots: Sequence[Path] = ()) -> Path:
    """``report.md`` of one ``tpp prune``/``tpp train`` run: settings, results table, latency, pruned layers,
    plots."""
    out_dir = Path(out_dir)
    m = result["metrics"]
    cfg = result["config"]
    row = summary_row(result, model=config.get("model", "?"))
    stages = [("base", "given model"), ("before_removal", "before removal"),
              ("removed_untransformed", "removed (before the method's transform)"),
              ("after_removal", "right after removal"), ("final", "after finetuning")]
    lines = [
        f"# {config.get('command', 'tpp prune').split(' --')[0]}: {config.get('model', '?')} on "
        f"{config.get('data', '?')}, method `{result['method']}`",
        "",
        f"{cfg['method_description']}.",
        "",
        "## Settings",
        "",
        f"- ratio: `{cfg['ratio']}`" + (f", skip: `{cfg['skip']}`" if cfg.get("skip") else ""),
        f"- regularization: {cfg['reg_iters']} iterations, SGD lr {cfg['reg_lr']}, momentum {cfg['momentum']}, "
        f"weight decay {cfg['weight_decay']}; schedule {cfg['schedule']}",
        f"- finetuning: {cfg['finetune_epochs']} epochs, lr {cfg['finetune_lr']} ×{cfg['lr_gamma']} at "
        f"{cfg['lr_milestones']}",
        f"- device: {cfg['device']}, seed: {cfg['seed']}, JSV over {cfg['jsv_samples']} test samples (eval mode)",
        f"- command: `{config.get('command', '')}`",
        "",
        "## Results",
        "",
        markdown_table([row]),
        "",
        "| stage | test accuracy (%) | test loss | mean JSV |",
        "|:---|---:|---:|---:|",
    ]
    for key, label in stages:
        if key in m["accuracy"]:
            lines.append(f"| {label} | {_cell(m['accuracy'][key], '.2f')} | {_cell(m['loss'].get(key), '.4f')} | "
                         f"{_cell(m['jsv_mean'].get(key), '.4g')} |")
    lines += [
        "",
        f"- best finetuning accuracy: {_cell(m['accuracy'].get('best'), '.2f')}%",
        f"- parameters: {m['params']['base']:,} → {m['params'].get('pruned', 0):,} "
        f"({_cell(m['params'].get('reduction'), '.2f')}× fewer)",
        f"- FLOPs per sample: {m['flops']['base']:,} → {m['flops'].get('pruned', 0):,} "
        f"({_cell(m['flops'].get('speedup'), '.2f')}× speedup)",
    ]
    latency = m.get("latency_s") or {}
    if "base" in latency and "pruned" in latency:
        lines.append(f"- measured latency (median forward, batch {latency.get('batch')}, {latency.get('device')}): "
                     f"{1e3 * latency['base']:.3g} ms → {1e3 * latency['pruned']:.3g} ms "
                     f"({_cell(latency.get('speedup'), '.2f')}× faster)")
    if "max_abs_pruned_before_zero" in m:
        lines.append(f"- largest |W, b, γ, β| of pruned filters before the final zero-out: "
                     f"{m['max_abs_pruned_before_zero']:.3g}")
    lines.append("- wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in m["time_s"].items()))
    lines += ["", "## Pruned layers", "", "| layer | pruned filters |", "|:---|---:|"]
    lines += [f"| `{name}` | {n} |" for name, n in m.get("pruned_filters", {}).items()]
    lines += ["", "## Plots", ""]
    lines += _images(plots) if plots else ["(matplotlib is not installed: no plots; pip install \"tpp[demo]\")"]
    path = out_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def write_demo_report(out_dir: Path, rows: Sequence[Mapping], meta: Mapping, plots: Sequence[Path] = (),
                      pretrain: Optional[Mapping] = None) -> Path:
    """``report.md`` of ``make demo``: what ran, the table, pretraining results and plots."""
    lines = [
        "# tpp demo: pruning on the embedded 8×8 digits",
        "",
        f"- machine: {meta.get('machine', '?')}; torch {meta.get('torch', '?')}, torch threads: "
        f"{meta.get('threads', '?')}",
        f"- wall time: {meta.get('wall_time_s', 0):.1f} s",
        f"- recipe: {meta.get('recipe', '')}",
        f"- command: `{meta.get('command', '')}`",
        "",
        "Accuracy (%) on the held-out 20% of the digits; JSV = mean singular value of the input–output Jacobian",
        "over the test samples (eval mode); params ÷ = parameter reduction; FLOPs × = FLOPs speedup.",
        "",
    ]
    if pretrain:
        lines += ["## Pretrained models", "", "| model | epochs | test accuracy (%) | mean JSV | params |",
                  "|:---|---:|---:|---:|---:|"]
        for name, p in pretrain.items():
            lines.append(f"| {name} | {p['epochs']} | {p['accuracy']:.2f} | {_cell(p.get('jsv'), '.4g')} | "
                         f"{p['params']:,} |")
        lines.append("")
    lines += ["## Results", "", markdown_table(rows), "", "## Plots", ""]
    lines += _images(plots) if plots else ["(matplotlib is not installed: no plots; pip install \"tpp[demo]\")"]
    path = Path(out_dir) / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
