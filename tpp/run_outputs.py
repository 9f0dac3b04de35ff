"""What a ``tpp prune``/``tpp train`` run writes into its folder besides checkpoints: the settings files, the
per-epoch and per-iteration tables, and the results — ``metrics.json`` (with the paper's numbers beside ours),
``pruned.pt``, ``report.md`` with plots, ``ranks/rank<r>.json`` digests. Every file is written atomically
(:mod:`tpp.files`); ``layout`` is the command's :class:`tpp.command.Layout`.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["write_settings", "write_tables", "write_results", "SUMMARY_COLUMNS", "REGULARIZE_COLUMNS"]


def write_settings(out: Path, layout, settings: dict, env) -> None:
    """The resolved settings into each of ``layout.settings_files`` (rank 0)."""
    if not env.is_main:
        return
    from .files import write_json, write_text_atomic
    from .train.logs import to_yaml

    for name in layout.settings_files:
        if name.endswith(".yaml"):
            write_text_atomic(out / name, to_yaml(settings))
        else:
            write_json(out / name, settings)


SUMMARY_COLUMNS = ("epoch", "lr", "train_loss", "val_top1", "val_top5", "val_loss", "time_s", "images_per_s")
REGULARIZE_COLUMNS = ("iteration", "phase", "strength", "penalty", "loss")


def write_tables(out: Path, history: dict, images_per_epoch: int) -> None:
    """``summary.csv`` (per finetuning epoch) and ``regularize.csv`` (per logged iteration) from a run's history."""
    from .train.logs import write_csv

    rows = []
    for r in history.get("finetune") or []:
        t = r.get("time_s")
        rows.append({"epoch": r["epoch"], "lr": r["lr"], "train_loss": r["train_loss"], "val_top1": r.get("test_acc"),
                     "val_top5": r.get("test_top5"), "val_loss": r.get("test_loss"), "time_s": t,
                     "images_per_s": images_per_epoch / t if t else None})
    write_csv(out / "summary.csv", rows, SUMMARY_COLUMNS)
    write_csv(out / "regularize.csv", history.get("regularize") or [], REGULARIZE_COLUMNS)


def _comparison(metrics: dict, expected) -> dict:
    acc = metrics["accuracy"]
    out = {"top1": acc.get("final"), "best_top1": acc.get("best"), "base_top1": acc.get("base"),
           "flops_speedup": metrics.get("flops", {}).get("speedup")}
    if expected.get("top1") is not None and acc.get("final") is not None:
        out["top1_minus_paper"] = acc["final"] - expected["top1"]
    if expected.get("base_top1") is not None and acc.get("base") is not None:
        out["base_minus_paper"] = acc["base"] - expected["base_top1"]
    return out


def write_results(out: Path, layout, result, recipe, settings: dict, images_per_epoch: int, env) -> None:
    """metrics.json, the tables, pruned.pt, report.md and plots (rank 0); ranks/ digests (every rank)."""
    from .files import write_json
    from .pruned_files import save_pruned
    from .report import format_table, plot_run, summary_row, write_run_report
    from .train import distributed as D

    mine = {"rank": env.rank, "world_size": env.world_size, "pruned_sha256": D.digest(result.pruned),
            "model_sha256": D.digest(result.model.state_dict()),
            "final_top1": result.metrics["accuracy"].get("final")}
    if layout.ranks:
        write_json(out / "ranks" / f"rank{env.rank}.json", mine)
    D.agree("the final weights", mine["model_sha256"], env)
    if not env.is_main:
        return
    data = result.to_dict()
    data.update({"recipe": recipe.name, "model": recipe.model, "data": recipe.data,
                 "expected": dict(recipe.expected), "comparison": _comparison(result.metrics, recipe.expected)})
    write_json(out / "metrics.json", data)
    write_tables(out, result.history, images_per_epoch)
    save_pruned(result.model, result.pruned, out / "pruned.pt", arch=recipe.model,
                model_args={"num_classes": settings["num_classes"], **settings["model_kwargs"]},
                extra={"num_classes": settings["num_classes"], "model_kwargs": settings["model_kwargs"],
                       "input_shape": settings["input_shape"], "data": recipe.data, "recipe": recipe.name,
                       "method": recipe.method, "ratio": recipe.ratio})
    if layout.report:
        write_run_report(out, settings, data, plot_run(data, out))
    print(format_table([summary_row(data, model=recipe.model)]))
    if recipe.expected.get("top1") is not None:
        acc = result.metrics["accuracy"]
        print(f"{recipe.name}: top-1 {acc.get('final', float('nan')):.2f}% (best {acc.get('best', float('nan')):.2f}%"
              f", top-5 {result.metrics['top5'].get('final', float('nan')):.2f}%); paper: "
              f"{recipe.expected['top1']:.2f}% (base {recipe.expected.get('base_top1')})")
    print(f"run folder: {out}")
