"""The ``tpp`` command (console script and ``python -m tpp``).

    tpp prune --model resnet56 --data cifar10 --data-root ~/data --weights resnet56.pt \\
              --ratio "*layer*.conv1:0.5" --method tpp --out runs/resnet56-tpp-0.5
    tpp prune --model digits_cnn --data digits --ratio "features.3:0.7,features.7:0.7" --method l1
    tpp list                                  # models, datasets, methods, recipes
    tpp train resnet50-imagenet-2.31x --data-root /data/imagenet   # a paper setting; also under torchrun
                                                                   # (python -m tpp.train), see tpp.train.run

``tpp prune`` runs :func:`tpp.pipeline.run_pruning` — regularize → stabilize and zero-out → remove → finetune —
and writes a run folder (never overwriting a non-empty one unless ``--overwrite``):

    config.json            every setting, resolved (recipe + flags), the command line, versions
    metrics.json           accuracies, mean JSVs, params/FLOPs, strength/penalty/loss history, finetuning curve
    report.md              the same as a readable report, with the plots
    strength_penalty.png   strength r and the penalty over the regularization iterations (regularizing methods)
    accuracy.png, jsv.png  accuracy and mean JSV of the given model, before/after removal, after finetuning
    pruned.pt              the pruned, finetuned model (``tpp.surgery.save_pruned``; reload with ``load_pruned``)
    pretrained.pt          the model the run started from, when it was trained here (``--pretrain-epochs``)
    checkpoint.pt          while running (``--resume`` continues from it); removed at the end unless kept

Defaults come from a recipe chosen by the dataset (``--recipe`` overrides): ``cifar`` for mnist/cifar10/cifar100
(the paper's CIFAR runs), ``imagenet`` for imagefolder, ``demo`` (scaled down) for the embedded digits; every
number can be set by its own flag. Bad input — an unknown model/method/dataset, a ratio outside [0, 1), a missing
data root, a non-empty output folder, weights or a checkpoint for another architecture — is reported with the
allowed values and exit status 2, before anything is created.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from .arguments import EXIT_USAGE, UsageError, add_schedule_arguments, count, epoch_list, number, parse_ratio
from .files import write_text_atomic

__all__ = ["main", "build_parser", "UsageError"]


# ------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpp", description="Trainability Preserving Pruning (Wang & Fu, ICLR 2023)")
    sub = parser.add_subparsers(dest="command", metavar="{prune,list,train}")
    sub.required = True

    sub.add_parser("list", help="list models, datasets, methods and recipes")

    from .train.run import add_arguments as add_train_arguments

    add_train_arguments(sub.add_parser(
        "train", help="a paper setting (or your own) end to end: DDP under torchrun, AMP, resumable checkpoints",
        description="Run a recipe (tpp train --list) end to end; under torchrun use python -m tpp.train."))

    p = sub.add_parser("prune", help="prune a model: regularize → zero-out → remove → finetune, write a run folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to prune")
    g.add_argument("--model", required=True, help="model name (tpp list), or torchvision:<name>")
    g.add_argument("--data", required=True, help="dataset: digits (embedded), mnist, cifar10, cifar100, imagefolder")
    g.add_argument("--data-root", help="folder holding the dataset (not needed for digits)")
    g.add_argument("--download", action="store_true", help="download mnist/cifar into --data-root if missing")
    g.add_argument("--ratio", required=True,
                   help="pruning ratio: a number in [0, 1) for every prunable layer but the classifier, or "
                        "'pattern:ratio,...' (shell wildcards on layer names, last match wins)")
    g.add_argument("--skip", default="", help="comma-separated layer patterns never pruned")
    g.add_argument("--method", default="tpp", help="tpp, l1, greg, diagonal, no-bn, kernorth, orthconv, orthp, "
                                                  "scratch, l1-kernorth, l1-orthconv")
    g.add_argument("--weights", help="state_dict of the model to prune (or 'torchvision' for published weights)")
    g.add_argument("--pretrain-epochs", type=count,
                   help="train the model here first for this many epochs (default: the recipe's when no --weights)")
    g.add_argument("--pretrain-lr", type=number, help="pretraining learning rate (default: the recipe's)")

    g = p.add_argument_group("schedule and optimization (defaults: the recipe's; see tpp list)")
    g.add_argument("--recipe", help="cifar | imagenet | demo (default: by dataset)")
    add_schedule_arguments(g)
    g.add_argument("--reg-iters", type=count,
                   help="regularization iterations of kernorth/orthconv (default: the schedule's total)")
    g.add_argument("--orth-weight", type=number, help="λ of KernOrth/OrthConv")
    g.add_argument("--reg-lr", type=number, help="pruning-phase SGD learning rate (paper 1e-3)")
    g.add_argument("--momentum", type=number, help="SGD momentum (paper 0.9)")
    g.add_argument("--weight-decay", type=number, help="weight decay (paper 5e-4 CIFAR, 1e-4 ImageNet)")
    g.add_argument("--batch-size", type=count, help="training batch size")
    g.add_argument("--finetune-epochs", type=count, help="finetuning epochs")
    g.add_argument("--finetune-lr", type=number, help="finetuning learning rate (paper 1e-2)")
    g.add_argument("--lr-milestones", type=epoch_list, help="epochs at which the finetuning lr is multiplied by "
                                                          "--lr-gamma, e.g. 60,90")
    g.add_argument("--lr-gamma", type=number, help="lr decay factor")

    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (default runs/<model>-<data>-<method>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    g.add_argument("--resume", help="continue from a checkpoint.pt of an interrupted run (same settings)")
    g.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.pt after the run")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="random seed (data split, order, initialization)")
    g.add_argument("--workers", type=count, default=0, help="DataLoader worker processes")
    g.add_argument("--threads", type=count, default=0,
                   help="torch CPU threads (0: torch's default; 1 is often fastest for small models)")
    g.add_argument("--jsv-samples", type=count, default=64,
                   help="test samples for the mean Jacobian singular value (0: skip)")
    g.add_argument("--backend", default="auto", help="TPPRegularizer backend: auto, torch, triton, cuda")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


# ------------------------------------------------------------------------------------------------ helpers
def _allowed(values) -> str:
    return ", ".join(values)


def _check_names(args) -> None:
    from .baselines import METHODS
    from .data import list_datasets
    from .models import list_models
    from .pipeline import RECIPES

    if args.method not in METHODS:
        raise UsageError(f"unknown method {args.method!r}; allowed: {_allowed(METHODS)}")
    if args.data not in list_datasets():
        raise UsageError(f"unknown dataset {args.data!r}; allowed: {_allowed(list_datasets())}")
    if args.recipe is not None and args.recipe not in RECIPES:
        raise UsageError(f"unknown recipe {args.recipe!r}; allowed: {_allowed(RECIPES)}")
    if args.model.startswith("torchvision:"):
        import torchvision

        name = args.model.removeprefix("torchvision:")
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise UsageError(f"unknown model {args.model!r}: {name!r} is not a torchvision classifier; "
                             f"available: {_allowed(available)}")
    elif args.model not in list_models():
        raise UsageError(f"unknown model {args.model!r}; allowed: {_allowed(list_models())}, "
                         "or torchvision:<name>")


def _dataset_kwargs(data: str, model: str) -> dict:
    if data == "mnist" and model == "mlp7":
        return {"image_size": 32}  # MLP-7-Linear takes 32×32 MNIST (1024 inputs), as in the paper
    return {}


def _load_data(args, recipe):
    from .data import build_dataset, build_loader

    kwargs = _dataset_kwargs(args.data, args.model)
    if args.data == "digits":
        kwargs["seed"] = args.seed
    if args.data != "digits" and args.data_root is None:
        raise UsageError(f"--data {args.data} is read from a local folder: pass --data-root <folder>"
                         + (" (with --download to fetch it there)" if args.data != "imagefolder" else ""))
    try:
        train_set = build_dataset(args.data, args.data_root, train=True, download=args.download, **kwargs)
        test_set = build_dataset(args.data, args.data_root, train=False, download=args.download, **kwargs)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise UsageError(f"--data {args.data} --data-root {args.data_root}: {err}") from None
    bs = args.batch_size or recipe.batch_size
    train_loader = build_loader(train_set, bs, train=True, num_workers=args.workers, seed=args.seed)
    test_loader = build_loader(test_set, max(bs, 256), train=False, num_workers=args.workers)
    return train_set, test_set, train_loader, test_loader


def _num_classes(data: str, dataset) -> int:
    if data == "cifar100":
        return 100
    if data == "imagefolder":
        return len(dataset.classes)
    return 10


def _build_model(args, train_set):
    import torch

    from .models import build_model

    sample = train_set[0][0]
    kwargs = {}
    if args.model == "mlp7":
        kwargs["in_features"] = int(sample.numel())
    weights = args.weights
    pretrained = True if weights == "torchvision" else False
    if weights not in (None, "torchvision") and not Path(weights).is_file():
        raise UsageError(f"--weights {weights}: no such file (expected a state_dict saved with torch.save)")
    try:
        model = build_model(args.model, num_classes=_num_classes(args.data, train_set), pretrained=pretrained,
                            **kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    if weights not in (None, "torchvision"):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # not a torch file, or not loadable without pickled code
            raise UsageError(f"--weights {weights}: cannot be read as a state_dict ({type(err).__name__}: {err})") \
                from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if isinstance(state, dict) and "signature" in state and "model" in state:
            raise UsageError(f"--weights {weights} is a pipeline checkpoint; continue it with --resume")
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            first = str(err).strip().splitlines()
            raise UsageError(f"--weights {weights} was written for another architecture than --model "
                             f"{args.model}: {' '.join(first[:3])[:600]}") from None
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample.unsqueeze(0))
    except Exception as err:
        raise UsageError(f"--model {args.model} cannot take --data {args.data} inputs of shape "
                         f"{tuple(sample.shape)}: {type(err).__name__}: {err}") from None
    if out.dim() != 2:
        raise UsageError(f"--model {args.model} returns shape {tuple(out.shape)}, expected [batch, classes]")
    return model, kwargs


def _check_ratio_on_model(args, model, ratio) -> None:
    from .graph import analyze_model
    from .selection import layer_ratios

    try:
        chosen = layer_ratios(analyze_model(model), ratio, args.skip or ())
    except (TypeError, ValueError) as err:
        raise UsageError(f"--ratio {args.ratio!r}" + (f" --skip {args.skip!r}" if args.skip else "") +
                         f" on --model {args.model}: {err}") from None
    if not chosen:
        raise UsageError(f"--ratio {args.ratio!r} prunes no layer of --model {args.model} (every ratio is 0 or "
                         "skipped)")


def _recipe(args):
    from .pipeline import RECIPES, default_recipe
    from .schedule import GrowingSchedule

    recipe = RECIPES[args.recipe] if args.recipe else default_recipe(args.data, args.model)
    sched = recipe.schedule
    changes = {k: getattr(args, a) for k, a in (("delta", "delta"), ("interval", "interval"), ("ceiling", "ceiling"),
                                                  ("stabilize_iters", "stabilize_iters"),
                                                  ("zero_out_interval", "zero_out_interval"))
               if getattr(args, a) is not None}
    try:
        schedule = GrowingSchedule(**{**sched.state_dict(), **changes})
    except ValueError as err:
        raise UsageError(str(err).replace("GrowingSchedule.", "--").replace("_", "-")) from None
    updates = {k: getattr(args, k) for k in ("reg_lr", "momentum", "weight_decay", "finetune_epochs", "finetune_lr",
                                             "lr_milestones", "lr_gamma", "pretrain_lr")
               if getattr(args, k) is not None}
    for k in ("reg_lr", "finetune_lr"):
        if updates.get(k) == 0:
            raise UsageError(f"--{k.replace('_', '-')} must be > 0")
    return replace(recipe, schedule=schedule, **updates)


def _out_dir(args, resume: Optional[Path]) -> Path:
    if args.out:
        out = Path(args.out)
    elif resume is not None:
        out = resume.parent
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{args.model.replace(':', '_')}-{args.data}-{args.method}-{stamp}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    continuing = resume is not None and out.resolve() == resume.parent.resolve()
    if out.is_dir() and any(out.iterdir()) and not args.overwrite and not continuing:
        raise UsageError(f"--out {out} exists and is not empty; choose another folder, or pass --overwrite to "
                         "write into it (files of the same name are replaced)")
    return out


def _check_resume(args, model, ratio) -> Optional[Path]:
    if not args.resume:
        return None
    import torch

    from .pipeline import CHECKPOINT_VERSION, _check_signature

    path = Path(args.resume)
    if not path.is_file():
        raise UsageError(f"--resume {path}: no such file (expected the checkpoint.pt of a run folder)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"--resume {path}: cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "signature" not in state:
        raise UsageError(f"--resume {path} is not a tpp run checkpoint (checkpoint.pt of a run folder)")
    try:
        _check_signature(state["signature"], model, f"--resume {path}")
    except ValueError as err:
        raise UsageError(f"{err} (--model {args.model})") from None
    if state["method"] != args.method:
        raise UsageError(f"--resume {path} is a run of method {state['method']!r}, not --method {args.method!r}")
    from .pipeline import _ratio_key

    if state.get("ratio") != _ratio_key(ratio):
        raise UsageError(f"--resume {path} is a run at ratio {state.get('ratio')}, not --ratio {args.ratio!r}")
    skip = args.skip or ()
    if state.get("skip") != (skip if isinstance(skip, str) else list(skip)):
        raise UsageError(f"--resume {path} is a run with skip {state.get('skip')!r}, not --skip {args.skip!r}")
    args._resume_state = state
    return path


class _Progress:
    """A small progress printer on stderr: a rewritten line on a terminal, a line every 10% otherwise."""

    def __init__(self, stream=sys.stderr, min_interval: float = 0.25):
        self.stream, self.min_interval = stream, min_interval
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.last, self.phase, self.start, self.decile = 0.0, None, time.perf_counter(), -1

    def __call__(self, phase: str, done: int, total: int, info: dict) -> None:
        now = time.perf_counter()
        if phase != self.phase:
            if self.phase is not None and self.tty:
                self.stream.write("\n")
            self.phase, self.start, self.decile = phase, now, -1
        finished = total and done >= total
        decile = int(10 * done / total) if total else 0
        if self.tty and not finished and now - self.last < self.min_interval:
            return
        if not self.tty and not finished and decile == self.decile:
            return
        self.last, self.decile = now, decile
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if total and rate > 0 else 0
        bar = ""
        if total:
            filled = int(24 * done / total)
            bar = "[" + "#" * filled + "." * (24 - filled) + f"] {done}/{total}"
        details = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        line = f"{phase:>10} {bar} {details} {rate:.1f} it/s eta {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150) + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _versions() -> dict:
    import torch

    from . import __version__

    return {"tpp": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()}


def _write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


# -------------------------------------------------------------------------------------------------- prune
def cmd_prune(args, argv: Sequence[str]) -> int:
    from .baselines import METHODS

    _check_names(args)
    ratio = parse_ratio(args.ratio)
    recipe = _recipe(args)
    reg_iters = args.reg_iters
    if METHODS[args.method].regularizer == "tpp" and reg_iters is not None \
            and reg_iters != recipe.schedule.total_iters:
        raise UsageError(f"--reg-iters applies to kernorth/orthconv; {args.method!r} runs the schedule's "
                         f"{recipe.schedule.total_iters} iterations (set --delta/--interval/--stabilize-iters)")
    train_set, test_set, train_loader, test_loader = _load_data(args, recipe)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, model_kwargs = _build_model(args, train_set)
    _check_ratio_on_model(args, model, ratio)
    resume = _check_resume(args, model, ratio)
    pretrain_epochs = args.pretrain_epochs
    if pretrain_epochs is None or resume is not None:  # a resumed run restores its weights from the checkpoint
        pretrain_epochs = recipe.pretrain_epochs if args.weights is None and resume is None else 0
    if args.weights is None and resume is None and pretrain_epochs == 0:
        raise UsageError("no model to prune: pass --weights <state_dict> (or --weights torchvision), or "
                         "--pretrain-epochs N to train one here first")
    if args.device is not None:
        try:
            device = torch.device(args.device)
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as err:
            raise UsageError(f"--device {args.device}: {err}") from None
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = _out_dir(args, resume)

    # ---- everything checked: from here on, the run folder is written
    from .pipeline import evaluate, run_pruning, train
    from .report import plot_run, write_run_report
    from .surgery import save_pruned

    out.mkdir(parents=True, exist_ok=True)
    progress = None if args.quiet else _Progress()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    config = {
        "command": "tpp " + " ".join(shlex.quote(a) for a in argv),
        "model": args.model, "model_kwargs": model_kwargs, "data": args.data, "data_root": args.data_root,
        "method": args.method, "ratio": ratio, "skip": args.skip, "weights": args.weights, "seed": args.seed,
        "device": str(device), "batch_size": args.batch_size or recipe.batch_size, "pretrain_epochs": pretrain_epochs,
        "recipe": recipe.to_dict(), "resume": str(resume) if resume else None, "versions": _versions(),
    }
    _write_json(out / "config.json", config)
    model.to(device)
    if pretrain_epochs:
        say(f"pretraining {args.model} on {args.data} for {pretrain_epochs} epochs")
        hist = train(model, train_loader, pretrain_epochs, recipe.pretrain_lr, momentum=recipe.momentum,
                     weight_decay=recipe.weight_decay, milestones=recipe.pretrain_milestones,
                     device=device, progress=progress, phase="pretrain")
        acc, _ = evaluate(model, test_loader, device)
        config["pretrain"] = {"epochs": pretrain_epochs, "lr": recipe.pretrain_lr, "test_acc": acc,
                              "train_loss": hist[-1]["train_loss"] if hist else None}
        torch.save(model.state_dict(), out / "pretrained.pt")
        say(f"pretrained: test accuracy {acc:.2f}%")
    say(f"pruning {args.model} with {args.method} at ratio {ratio!r} → {out}")
    checkpoint = out / "checkpoint.pt"
    result = run_pruning(
        model, train_loader, test_loader, args.method, ratio, skip=args.skip or (), reg_iters=reg_iters,
        orth_weight=args.orth_weight, device=device, jsv_samples=args.jsv_samples, progress=progress,
        seed=args.seed, inplace=True, backend=args.backend, checkpoint=checkpoint,
        resume=getattr(args, "_resume_state", None), **recipe.run_kwargs())
    data = result.to_dict()
    data.update({"model": args.model, "data": args.data})
    config["run"] = result.config
    _write_json(out / "config.json", config)
    _write_json(out / "metrics.json", data)
    save_pruned(result.model, result.pruned, out / "pruned.pt", arch=args.model,
                extra={"num_classes": _num_classes(args.data, train_set), "model_kwargs": model_kwargs,
                       "data": args.data, "method": args.method, "ratio": ratio})
    plots = plot_run(data, out)
    write_run_report(out, config, data, plots)
    if not args.keep_checkpoint and checkpoint.exists():
        checkpoint.unlink()
    from .report import format_table, summary_row

    print(format_table([summary_row(data, model=args.model)]))
    print(f"run folder: {out}")
    return 0


def cmd_list(args, argv) -> int:
    from .baselines import METHODS
    from .data import list_datasets
    from .models import list_models
    from .pipeline import RECIPES

    print("models:   " + ", ".join(list_models()) + ", torchvision:<name>")
    print("datasets: " + ", ".join(list_datasets()))
    print("methods:")
    for m in METHODS.values():
        print(f"  {m.name:<12} {m.description}")
    print("recipes:")
    for r in RECIPES.values():
        print(f"  {r.name:<12} {r.description}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)   # argparse exits 2 on malformed flags
    try:
        if args.command == "prune":
            return cmd_prune(args, argv)
        if args.command == "train":
            from .train.run import run_command

            return run_command(args, argv[1:], prog="tpp train")
        return cmd_list(args, argv)
    except UsageError as err:
        print(f"tpp {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
