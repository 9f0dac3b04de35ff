"""Turn a pytest-benchmark JSON of this suite into a markdown report and PNG plots beside it.

``python benchmarks/report.py results/<device>-<date>.json`` writes ``<device>-<date>.md`` and
``<device>-<date>-*.png``: tables (headline layer set, training steps, layer sets, the sweep) of medians, speedups
against the paper's algorithm and fractions of the floor; plots of the speedup against the pruning ratio and of the
fraction of the floor reached. "of floor" = floor / median: 100 % means the device limit (:mod:`roofline`).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

FORMS = ("paper", "masked-full", "pruned-row", "compiled", "triton-layer", "triton-grouped", "triton-plan", "cuda")
COLORS = dict(zip(FORMS, ("#7f7f7f", "#bcbd22", "#1f77b4", "#9467bd", "#ff7f0e", "#d62728", "#2ca02c")))
MODES = ("fwd", "fwd+bwd", "in-place")
HEADLINE = "resnet50-2.31x"
TARGETS = (("paper", 50.0), ("pruned-row", 3.0), ("compiled", 1.5))  # issue 7: triton-grouped speedup, H100
FLOOR_TARGET = 0.5  # within 2× of the floor


def rows(data: dict) -> list[dict]:
    """One flat dict per benchmark: its ``extra_info`` plus median, IQR and rounds (seconds)."""
    out = []
    for b in data["benchmarks"]:
        s = b["stats"]
        out.append({**b["extra_info"], "median": s["median"], "iqr": s["iqr"], "rounds": s["rounds"]})
    return out


def by_case(results: list[dict], kind: str, keys: tuple[str, ...], column: str = "form") -> dict[tuple, dict]:
    """``{case key: {form (or variant): row}}`` for the rows of ``kind``."""
    table: dict[tuple, dict] = defaultdict(dict)
    for r in results:
        if r["kind"] == kind:
            table[tuple(r[k] for k in keys)][r[column]] = r
    return table


def speedup(cells: dict, form: str, baseline: str) -> float | None:
    """time(baseline) / time(form) within one case, None if either is missing."""
    if form in cells and baseline in cells:
        return cells[baseline]["median"] / cells[form]["median"]
    return None


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}×"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.2g} %" if fraction < 0.1 else f"{fraction * 100:.0f} %"


def _forms_in(table: dict) -> list[str]:
    present = {f for cells in table.values() for f in cells}
    return [f for f in FORMS if f in present]


# --------------------------------------------------------------------------------------------------- markdown
def _header(data: dict) -> list[str]:
    t = data["machine_info"]["tpp"]
    commit = data.get("commit_info", {})
    device = t["device"] + (f" (driver {t['driver']}, CUDA {t['cuda_runtime']}, compute capability "
                            f"{t['compute_capability']}, {t['device_memory_gib']} GiB)"
                            if t["device_type"] == "cuda" else "")
    lines = [f"# tpp benchmarks — {t['device']} — {data['datetime'][:10]}", "",
             f"- Device: {device}; CPU {t['cpu']}, {t['torch_threads']} torch threads; load average "
             f"{' → '.join(f'{v:.1f}' for v in t['load_average'])}",
             f"- Software: torch {t['torch']}, triton {t['triton']}, Python {t['python']}; float32 matmul precision "
             f"`{t['float32_matmul_precision']}`" + (" (TF32)" if t["device_type"] == "cuda" else ""),
             f"- Suite `{t['suite']}`; commit {commit.get('id', '?')[:10]}{' (dirty)' if commit.get('dirty') else ''}"]
    if t.get("roofline"):
        rl = t["roofline"]
        rates = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in rl["matmul_flops_per_s"].items())
        lines.append(f"- Roofline, measured in this run: copy {rl['copy_bytes_per_s'] / 1e9:.4g} GB/s; matmul {rates}")
    for form, why in t.get("unavailable", {}).items():
        lines.append(f"- Not run: `{form}` — {why}")
    lines += ["", "Times are medians of device-synchronized calls after warm-up (`benchmarks/timing.py`). Floor = "
              "max(bytes / copy bandwidth, FLOPs / matmul rate) with the minimal bytes and FLOPs of tpp-method §2 "
              "(`benchmarks/roofline.py`); *of floor* = floor / median (100 % = at the device limit). Speedups are "
              "against `paper`, the paper's algorithm (full gram, Python loop over pruned indices), in the same "
              "mode; for *in-place* against the paper's fwd+bwd, its way to the same gradient.", ""]
    return lines


def _headline(results: list[dict]) -> list[str]:
    table = by_case(results, "layer_set", ("layer_set", "mode"))
    modes = {m: table.get((HEADLINE, m), {}) for m in MODES}
    fb = modes["fwd+bwd"]
    if not fb:
        return []
    any_row = next(iter(fb.values()))
    lines = [f"## Headline: ResNet50 2.31× layer set ({any_row['layers']} layers, {any_row['pruned']} pruned "
             f"filters, float32)", "",
             "| form | fwd ms | fwd+bwd ms | in-place ms | vs paper | vs pruned-row | vs compiled | of floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in _forms_in({0: fb}):
        cells = [ms(modes[m][f]["median"]) if f in modes[m] else "–" for m in MODES]
        lines.append(f"| {f} | {' | '.join(cells)} | {_x(speedup(fb, f, 'paper'))} | "
                     f"{_x(speedup(fb, f, 'pruned-row'))} | {_x(speedup(fb, f, 'compiled'))} | "
                     f"{_pct(fb[f]['floor_s'] / fb[f]['median'])} |")
    lines += ["", "Speedups and floor fraction of fwd+bwd.", ""]
    for form in ("triton-plan", "triton-grouped"):
        if form not in fb:
            continue
        lines += [f"Issue 7 targets for `{form}` (H100; fwd+bwd):", ""]
        for baseline, target in TARGETS:
            got = speedup(fb, form, baseline)
            if got is not None:
                lines.append(f"- ≥ {target:g}× `{baseline}`: {got:.3g}× {'met' if got >= target else 'missed'}")
        frac = fb[form]["floor_s"] / fb[form]["median"]
        lines += [f"- within 2× of the floor: {1 / frac:.3g}× the floor {'met' if frac >= FLOOR_TARGET else 'missed'}",
                  ""]
    return lines


def _steps(results: list[dict]) -> list[str]:
    table = by_case(results, "step", ("model", "batch", "layer_set"), column="variant")
    if not table:
        return []
    lines = ["## Training step", "",
             "One SGD step (bf16 autocast + channels_last on CUDA), the regularizer at strength 1 on the layer set "
             "named. Each regularized step is paired with an unregularized one run just before it: *regularizer* = "
             "median of the per-pair differences, *share* = regularizer / step.", "",
             "| model | batch | layer set | variant | step ms | IQR ms | plain step ms | regularizer ms | share |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for (model, batch, layer_set), cells in table.items():
        for variant, r in cells.items():
            plain = extra = share = "–"
            if "paired_overhead_s" in r:
                plain, extra = ms(r["paired_none_s"]), f"{r['paired_overhead_s'] * 1e3:.3g}"
                share = f"{r['paired_overhead_s'] / r['median'] * 100:.2g} %"
            lines.append(f"| {model} | {batch} | {layer_set} | {variant} | {ms(r['median'])} | {ms(r['iqr'])} | "
                         f"{plain} | {extra} | {share} |")
    return lines + [""]


def _layer_sets(results: list[dict]) -> list[str]:
    table = by_case(results, "layer_set", ("layer_set", "mode"))
    if not table:
        return []
    forms = _forms_in(table)
    lines = ["## Layer sets", "", "Median ms (speedup against `paper`); float32 weights.", ""]
    for mode in MODES:
        cases = {k[0]: v for k, v in table.items() if k[1] == mode}
        if not cases:
            continue
        lines += [f"### {mode}", "", "| layer set | layers | pruned | floor ms | " + " | ".join(forms) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(forms)]
        for name, cells in cases.items():
            paper = table.get((name, "fwd+bwd" if mode == "in-place" else mode), {}).get("paper")
            r0 = next(iter(cells.values()))
            row = [f"{ms(cells[f]['median'])} ({_x(paper['median'] / cells[f]['median'] if paper else None)})"
                   if f in cells else "–" for f in forms]
            lines.append(f"| {name} | {r0['layers']} | {r0['pruned']} | {ms(r0['floor_s'])} | {' | '.join(row)} |")
        lines.append("")
    return lines


def _sweep(results: list[dict]) -> list[str]:
    table = by_case(results, "sweep", ("dtype", "n", "d", "ratio", "mode"))
    if not table:
        return []
    forms = _forms_in(table)
    lines = ["## Per-layer sweep", "", "One N×D layer, ⌈ratio·N⌉ filters pruned; median ms per form.", "",
             "<details><summary>All cases</summary>", "",
             "| dtype | N | D | ratio | p | mode | floor ms | " + " | ".join(forms) + " |",
             "|---|---:|---:|---:|---:|---|---:|" + "---:|" * len(forms)]
    for (dtype, n, d, ratio, mode), cells in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1:4],
                                                                                    MODES.index(kv[0][4]))):
        r0 = next(iter(cells.values()))
        row = [ms(cells[f]["median"]) if f in cells else "–" for f in forms]
        lines.append(f"| {dtype} | {n} | {d} | {ratio} | {r0['p']} | {mode} | {ms(r0['floor_s'])} | "
                     f"{' | '.join(row)} |")
    return lines + ["", "</details>", ""]


def markdown(data: dict, plots: list[str]) -> str:
    results = rows(data)
    lines = _header(data) + _headline(results) + _steps(results) + _layer_sets(results) + _sweep(results)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plots
def _log_axis(axis, suffix: str) -> None:
    """Log scale labelled 1, 2, 3, 5, 10, ... with ``suffix`` (e.g. "×")."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
    axis.set_minor_formatter(NullFormatter())


def _speedup_panel(ax, points: dict[str, list[tuple[float, float]]], title: str) -> None:
    for f in FORMS:
        if points.get(f):
            xs, ys = zip(*sorted(points[f]))
            ax.plot(xs, ys, "o-", color=COLORS[f], label=f, markersize=4)
    ax.axhline(1.0, color=COLORS["paper"], lw=0.8, ls="--")
    ax.set_yscale("log")
    _log_axis(ax.yaxis, "×")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


def _legend_below(fig, height_in: float) -> None:
    """One legend for all panels, under them; ``height_in`` is the figure height in inches."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = [f for f in FORMS if f in entries]
    fig.legend([entries[f] for f in labels], labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.45 / height_in, 1, 1))


def plot_sweep_speedup(results: list[dict], path: Path, dtype: str) -> bool:
    """Speedup against ``paper`` vs pruning ratio (fwd+bwd), one panel per (D, N) of the sweep in ``dtype``."""
    table = {k: v for k, v in by_case(results, "sweep", ("dtype", "n", "d", "ratio", "mode")).items()
             if k[0] == dtype and k[4] == "fwd+bwd"}
    if not table:
        return False
    ns, ds = sorted({k[1] for k in table}), sorted({k[2] for k in table})
    height = 2.6 * len(ds) + 1.2
    fig, axes = plt.subplots(len(ds), len(ns), figsize=(3.2 * len(ns) + 1, height), squeeze=False, sharex=True,
                             sharey=True)
    for i, d in enumerate(ds):
        for j, n in enumerate(ns):
            points = defaultdict(list)
            for (_, kn, kd, ratio, _), cells in table.items():
                if (kn, kd) == (n, d):
                    for f in cells:
                        if f != "paper" and (s := speedup(cells, f, "paper")) is not None:
                            points[f].append((ratio, s))
            _speedup_panel(axes[i][j], points, f"N={n}, D={d}")
    for ax in axes[-1]:
        ax.set_xlabel("pruning ratio")
    for row in axes:
        row[0].set_ylabel("speedup vs paper")
    fig.suptitle(f"Gram term fwd+bwd, one layer, {dtype}: speedup against the paper's algorithm", fontsize=11)
    _legend_below(fig, height)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_layer_set_speedup(results: list[dict], path: Path) -> bool:
    """Speedup against ``paper`` vs pruning ratio (fwd+bwd) of the ResNet56 and VGG19 settings with ≥ 2 ratios."""
    table = by_case(results, "layer_set", ("layer_set", "mode"))
    models = defaultdict(lambda: defaultdict(list))
    for (name, mode), cells in table.items():
        model, _, ratio = name.rpartition("-")
        if mode != "fwd+bwd" or model == "resnet50":
            continue
        for f in cells:
            if f != "paper" and (s := speedup(cells, f, "paper")) is not None:
                models[model][f].append((float(ratio), s))
    models = {m: pts for m, pts in models.items() if len({x for p in pts.values() for x, _ in p}) >= 2}
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models) + 1, 4.2), squeeze=False)
    for ax, (model, points) in zip(axes[0], sorted(models.items())):
        _speedup_panel(ax, points, f"{model} layer set, fwd+bwd, float32")
        ax.set_xlabel("pruning ratio")
    axes[0][0].set_ylabel("speedup vs paper")
    _legend_below(fig, 4.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_floor(results: list[dict], path: Path) -> bool:
    """Fraction of the floor reached (fwd+bwd): bars per layer set and form; the sweep's cases against FLOPs."""
    sets = {k[0]: v for k, v in by_case(results, "layer_set", ("layer_set", "mode")).items() if k[1] == "fwd+bwd"}
    sweep = [r for r in results if r["kind"] == "sweep" and r["mode"] == "fwd+bwd"]
    if not sets and not sweep:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(13.0, 0.8 * len(sets) + 6), 4.8),
                                      gridspec_kw={"width_ratios": [1.4, 1]})
    forms = _forms_in(sets)
    width = 0.8 / max(len(forms), 1)
    for i, f in enumerate(forms):
        xs = [k for k, name in enumerate(sets) if f in sets[name]]
        ys = [sets[name][f]["floor_s"] / sets[name][f]["median"] for name in sets if f in sets[name]]
        left.bar([x + i * width for x in xs], ys, width, color=COLORS[f], label=f)
    left.set_xticks([k + 0.4 - width / 2 for k in range(len(sets))], list(sets), rotation=30, ha="right",
                    fontsize=8)
    left.set_title("Layer sets, fwd+bwd, float32", fontsize=10)
    left.set_ylabel("fraction of floor (floor / median)")
    for f in FORMS:
        pts = [(r["flops"], r["floor_s"] / r["median"]) for r in sweep if r["form"] == f]
        if pts:
            right.scatter(*zip(*pts), s=10, color=COLORS[f], label=f, alpha=0.7)
    right.set_xscale("log")
    right.set_xlabel("FLOPs of the case")
    right.set_title("Sweep (one layer), fwd+bwd, every dtype", fontsize=10)
    for ax in (left, right):
        ax.set_yscale("log")
        _log_axis(ax.yaxis, "")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.grid(True, which="both", alpha=0.3)
    _legend_below(fig, 4.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(json_path: Path) -> list[Path]:
    """Write ``<stem>.md`` and ``<stem>-*.png`` beside ``json_path``; returns the paths written."""
    data = json.loads(Path(json_path).read_text())
    results = rows(data)
    stem = Path(json_path).with_suffix("")
    plots = []
    for dtype in sorted({r["dtype"] for r in results if r["kind"] == "sweep"}):
        path = stem.with_name(f"{stem.name}-speedup-sweep-{dtype}.png")
        if plot_sweep_speedup(results, path, dtype):
            plots.append(path)
    for name, plot in (("speedup-layer-sets", plot_layer_set_speedup), ("floor", plot_floor)):
        path = stem.with_name(f"{stem.name}-{name}.png")
        if plot(results, path):
            plots.append(path)
    md = stem.with_suffix(".md")
    md.write_text(markdown(data, [p.name for p in plots]))
    return [md, *plots]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, help="pytest-benchmark JSON of the tpp benchmarks")
    for path in write_report(ap.parse_args().json):
        print(path)


if __name__ == "__main__":
    main()
