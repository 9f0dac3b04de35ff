"""`tpp train` / ``python -m tpp.train``: a paper setting (or your own) end to end, on one process or under torchrun.

    tpp train --list                                          # the recipes
    tpp train resnet56-cifar10-0.9 --data-root ~/data --weights resnet56.pt --out runs/r56-0.9
    torchrun --nproc_per_node 8 -m tpp.train resnet50-imagenet-2.31x --data-root /data/imagenet --out runs/r50
    torchrun ... -m tpp.train resnet50-imagenet-2.31x --data-root /data/imagenet --out runs/r50 --resume auto

Phases (:func:`tpp.pipeline.run_pruning` with :class:`tpp.train.engine.Engine`): measure the given model →
regularize (iteration-based growing schedule) → stabilize with the layer-wise zero-out → remove (the same filters
on every rank, checked) → rebuild DDP and the optimizer → finetune (epochs) → evaluate top-1/top-5 over all ranks.

The run folder (``--out``):

    args.yaml, args.json   every resolved setting, the command, the world size, versions
    checkpoints/           ckpt-<n>-<stage>-<position>.pt (the newest --keep-last), best.pt
    summary.csv            one row per finetuning epoch: lr, train loss, val top-1/top-5/loss, time, images/s
    regularize.csv         strength, penalty, loss over the regularization iterations
    metrics.json           all measurements, the pruned filter sets, the paper's expected numbers beside ours
    pruned.pt              the pruned, finetuned model (tpp.load_pruned)
    ranks/rank<r>.json     each rank's digest of its pruned sets and final weights (all equal, or the run failed)
    tb/                    TensorBoard scalars with --tensorboard

Exit status: 0 done, 2 bad input (nothing written), 3 stopped by ``--stop-after-iters``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from ..arguments import EXIT_USAGE, UsageError, add_schedule_arguments, count, epoch_list, number, parse_ratio

__all__ = ["main", "build_parser", "UsageError"]

EXIT_STOPPED = 3


# ---------------------------------------------------------------------------------------------------- parser
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `tpp train` arguments (shared by ``tpp train`` and ``python -m tpp.train``)."""
    p.add_argument("recipe", nargs="?", help="recipe name (--list), or omit and give --config or "
                                             "--model/--data/--ratio")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--show", action="store_true", help="print the resolved recipe as JSON and exit")
    p.add_argument("--config", help="JSON file with recipe fields (on top of the named recipe, if any)")

    g = p.add_argument_group("what to prune (defaults: the recipe's)")
    g.add_argument("--model", help="model name (tpp list) or torchvision:<name>")
    g.add_argument("--data", help="imagefolder, cifar10, cifar100, mnist, digits")
    g.add_argument("--data-root", help="dataset folder (imagefolder: with train/ and val/)")
    g.add_argument("--download", action="store_true", help="download cifar/mnist into --data-root if missing")
    g.add_argument("--image-size", type=count, help="training crop / evaluation size (imagefolder, mnist)")
    g.add_argument("--ratio", help="pruning ratio: a number or 'pattern:ratio,...'")
    g.add_argument("--skip", help="comma-separated layer patterns never pruned")
    g.add_argument("--method", help="tpp (default) or another method of `tpp list`")
    g.add_argument("--weights", help="the model to prune: a state_dict file, 'torchvision[:ENUM]' for torchvision's "
                                     "weights (recipes: IMAGENET1K_V1), or 'none' (random init, smoke tests only)")

    g = p.add_argument_group("schedule and optimization (defaults: the recipe's)")
    add_schedule_arguments(g)
    g.add_argument("--reg-lr", type=number, help="pruning-phase SGD learning rate")
    g.add_argument("--momentum", type=number)
    g.add_argument("--weight-decay", type=number)
    g.add_argument("--batch-size", type=count, help="global training batch (split over the processes)")
    g.add_argument("--eval-batch-size", type=count, help="global evaluation batch")
    g.add_argument("--finetune-epochs", type=count)
    g.add_argument("--finetune-lr", type=number)
    g.add_argument("--lr-schedule", choices=("step", "cosine"))
    g.add_argument("--lr-milestones", type=epoch_list,
                   help="epochs where the step schedule multiplies lr by --lr-gamma")
    g.add_argument("--lr-gamma", type=number)
    g.add_argument("--label-smoothing", type=number)

    g = p.add_argument_group("speed")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast dtype; fp16 adds a GradScaler; auto: bf16 on GPUs, none on CPU")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last memory format (auto: on GPUs)")
    g.add_argument("--backend", default="auto", help="TPPRegularizer backend: auto, torch, triton, cuda")
    g.add_argument("--workers", type=count, default=None,
                   help="DataLoader workers per process (default: 8 on GPUs, 0 on CPU)")
    g.add_argument("--threads", type=count, default=0,
                   help="torch CPU threads per process (0: torch's default; torchrun sets 1 unless OMP_NUM_THREADS)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic cuDNN/CUDA kernels (slower; default: cudnn.benchmark)")

    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder (default runs/<recipe>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="start a new run in a non-empty --out")
    g.add_argument("--resume", help="'auto' (the newest checkpoint in --out, if any) or a checkpoint file")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available); under torchrun each process "
                                    "uses cuda:LOCAL_RANK")
    g.add_argument("--dist-backend", choices=("nccl", "gloo"), help="default: nccl on cuda, gloo on cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=count, help="checkpoint every this many regularization "
                                                           "iterations (default: 1000, at most a tenth of them)")
    g.add_argument("--finetune-checkpoint-every", type=count, default=None,
                   help="also checkpoint every this many finetuning iterations (default: 1000 on ImageNet-size "
                        "epochs, else per epoch only; 0: per epoch only)")
    g.add_argument("--keep-last", type=count, default=2, help="numbered checkpoints kept (best.pt besides)")
    g.add_argument("--jsv-samples", type=count, default=0, help="samples for the mean Jacobian singular value "
                                                                  "(one backward per class each; 0: skip)")
    g.add_argument("--log-every", type=count, default=None,
                   help="record strength, penalty and loss every this many regularization iterations (default: "
                        "~200 records per run)")
    g.add_argument("--log-interval", type=number, default=30.0, help="seconds between progress lines in logs")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars to <out>/tb")
    g.add_argument("--quiet", action="store_true", help="warnings and errors only")
    g.add_argument("--stop-after-iters", type=count, help="debugging: stop (as if killed) after this many "
                                                           "training iterations; exit status 3")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpp train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


# ---------------------------------------------------------------------------------------------- the recipe
def resolve_recipe(args):
    """The recipe of ``args``: named or from --config/--model..., with every given flag applied."""
    from .recipes import get_recipe, recipe_from_dict

    base = None
    if args.recipe:
        try:
            base = get_recipe(args.recipe)
        except ValueError as err:
            raise UsageError(str(err)) from None
    values: dict = {}
    if args.config:
        try:
            values.update(json.loads(Path(args.config).read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise UsageError(f"--config {args.config}: {err}") from None
        if not isinstance(values, dict):
            raise UsageError(f"--config {args.config}: expected a JSON object of recipe fields")
    for key in ("model", "data", "method", "image_size", "reg_lr", "momentum", "weight_decay",
                "batch_size", "eval_batch_size", "finetune_epochs", "finetune_lr", "lr_schedule", "lr_milestones",
                "lr_gamma", "label_smoothing"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if args.ratio is not None:
        values["ratio"] = parse_ratio(args.ratio)
    if args.skip is not None:
        values["skip"] = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    sched = {k: getattr(args, k) for k in ("delta", "interval", "ceiling", "stabilize_iters", "zero_out_interval")
             if getattr(args, k) is not None}
    if sched:
        values["schedule"] = {**(values.get("schedule") or {}), **sched}
    if base is None and not args.config:
        values.setdefault("name", "custom")
    try:
        recipe = recipe_from_dict(values, base)
    except (TypeError, ValueError) as err:
        msg = str(err)
        if "GrowingSchedule." in msg:
            msg = msg.replace("GrowingSchedule.", "--").replace("_", "-")
        elif base is None and "needs" in msg:
            msg += " (give a recipe name, --config, or --model/--data/--ratio)"
        raise UsageError(msg) from None
    if isinstance(recipe.ratio, str):
        recipe = replace(recipe, ratio=parse_ratio(recipe.ratio))
    return recipe


def _check_recipe(recipe, world: int) -> None:
    from ..baselines import METHODS
    from ..data import list_datasets

    if recipe.method not in METHODS:
        raise UsageError(f"unknown method {recipe.method!r}; allowed: {', '.join(METHODS)}")
    if recipe.data not in list_datasets():
        raise UsageError(f"unknown dataset {recipe.data!r}; allowed: {', '.join(list_datasets())}")
    if recipe.lr_schedule not in ("step", "cosine"):
        raise UsageError(f"lr_schedule must be step or cosine, got {recipe.lr_schedule!r}")
    for key in ("batch_size", "eval_batch_size"):
        value = getattr(recipe, key)
        if value < world or value % world:
            raise UsageError(f"--{key.replace('_', '-')} {value} (global) must be a positive multiple of the "
                             f"{world} processes")
    for key in ("reg_lr", "finetune_lr"):
        if not getattr(recipe, key) > 0:
            raise UsageError(f"--{key.replace('_', '-')} must be > 0")
    if not 0 <= recipe.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must lie in [0, 1), got {recipe.label_smoothing}")


# ----------------------------------------------------------------------------------------------- the model
def _torchvision_name(model: str) -> Optional[str]:
    from ..models import _TORCHVISION_ALIASES

    if model.startswith("torchvision:"):
        return model.removeprefix("torchvision:")
    return model if model in _TORCHVISION_ALIASES else None


def build_model_with_weights(recipe, weights: str, num_classes: int, env):
    """The model to prune and a description of where its weights came from."""
    import torch

    from ..models import build_model
    from . import distributed as D

    if not weights:
        raise UsageError(f"recipe {recipe.name!r} has no pretrained weights: pass --weights <state_dict file> "
                         "(the model to prune), or --weights none for a smoke test from random initialization")
    if weights == "none":
        try:
            return build_model(recipe.model, num_classes=num_classes), "random initialization"
        except (TypeError, ValueError) as err:
            raise UsageError(f"--model {recipe.model}: {err}") from None
    if weights == "torchvision" or weights.startswith("torchvision:"):
        name = _torchvision_name(recipe.model)
        if name is None:
            raise UsageError(f"--weights {weights}: {recipe.model!r} is not a torchvision model")
        enum = weights.split(":", 1)[1] if ":" in weights else "DEFAULT"
        import torchvision

        def load():
            return torchvision.models.get_model(name, weights=enum)

        error = None
        model = None
        if env.local_rank == 0:        # one download per node, the others read torchvision's cache
            try:
                model = load()
            except Exception as err:  # noqa: BLE001 - no network, unknown enum, ...
                error = f"{type(err).__name__}: {err}"
        D.barrier(env)
        if env.local_rank != 0:
            try:
                model = load()
            except Exception as err:  # noqa: BLE001
                error = f"{type(err).__name__}: {err}"
        if error is not None:
            raise UsageError(f"--weights {weights} for {name}: {error}. Without network access, save the weights "
                             "with torch.save(model.state_dict(), 'w.pt') elsewhere and pass --weights w.pt")
        out = model.fc.out_features if hasattr(model, "fc") else None
        if out is not None and out != num_classes:
            raise UsageError(f"--weights {weights}: {name} has {out} classes, the data has {num_classes}")
        return model, f"torchvision {name} weights {enum}"
    path = Path(weights)
    if not path.is_file():
        raise UsageError(f"--weights {weights}: no such file (expected a state_dict saved with torch.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"--weights {weights}: cannot be read as a state_dict ({type(err).__name__}: {err})") \
            from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "hooks" in state and "signature" in state:
        raise UsageError(f"--weights {weights} is a `tpp train` checkpoint; continue it with --resume")
    if isinstance(state, dict) and state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}     # saved from DataParallel/DDP
    try:
        model = build_model(recipe.model, num_classes=num_classes)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError) as err:
        lines = str(err).strip().splitlines()
        raise UsageError(f"--weights {weights} does not fit --model {recipe.model} with {num_classes} classes: "
                         f"{' '.join(lines[:3])[:600]}") from None
    return model, f"state_dict {path}"


# ------------------------------------------------------------------------------------------------- helpers
def _versions(env) -> dict:
    import torch

    from .. import __version__

    info = {"tpp": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "world_size": env.world_size, "backend": env.backend,
            "device": str(env.device)}
    if env.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(env.device)
        info["cuda"] = torch.version.cuda
    return info


def _ratio_key(ratio) -> str:
    from ..pipeline import _ratio_key as key

    return key(ratio)


def _resolve_out(args, recipe, env) -> tuple[Path, Optional[Path]]:
    """Run folder and the checkpoint to resume (rank 0 decides; every rank gets the same answer)."""
    from . import distributed as D
    from .checkpoint import list_checkpoints

    answer: dict = {}
    if env.is_main:
        try:
            if args.out:
                out = Path(args.out)
            elif args.resume and args.resume != "auto":
                out = Path(args.resume).resolve().parent.parent
            else:
                out = Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            if out.exists() and not out.is_dir():
                raise UsageError(f"--out {out} exists and is not a folder")
            resume = None
            existing = list_checkpoints(out / "checkpoints")
            if args.resume == "auto":
                resume = existing[-1] if existing else None
            elif args.resume:
                resume = Path(args.resume)
                if not resume.is_file():
                    raise UsageError(f"--resume {resume}: no such file (a checkpoints/ckpt-*.pt of a run folder, "
                                     "or --resume auto)")
            elif out.is_dir() and any(out.iterdir()) and not args.overwrite:
                hint = ("it holds checkpoints of a run: pass --resume auto to continue it, or --overwrite to start "
                        "over" if existing else "choose another folder, or pass --overwrite")
                raise UsageError(f"--out {out} exists and is not empty; {hint}")
            answer = {"out": str(out), "resume": str(resume) if resume else None}
        except UsageError as err:
            answer = {"error": str(err)}
    answer = D.broadcast_object(answer, env)
    if "error" in answer:
        raise UsageError(answer["error"])
    return Path(answer["out"]), Path(answer["resume"]) if answer["resume"] else None


# ---------------------------------------------------------------------------------------------------- run
def run(args, argv: Sequence[str], env) -> int:
    import random

    import numpy as np
    import torch

    from ..graph import analyze_model
    from ..pipeline import run_pruning
    from ..selection import layer_ratios
    from ..surgery import save_pruned
    from . import distributed as D
    from .checkpoint import CheckpointManager, CheckpointMismatch
    from .data import build_datasets, build_loaders, num_classes_of
    from .engine import Engine, StopRequested, resolve_amp, wrap_progress
    from .logs import Progress, TensorBoard, to_yaml, write_csv, write_json, write_text_atomic

    log = D.logger
    recipe = resolve_recipe(args)
    _check_recipe(recipe, env.world_size)
    try:
        amp = resolve_amp(args.amp, env.device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and env.device.type == "cuda")
    workers = args.workers if args.workers is not None else (8 if env.device.type == "cuda" else 0)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
        if args.deterministic:
            torch.backends.cudnn.deterministic = True
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ---- data and model (every rank; nothing written yet)
    try:
        train_set, val_set = build_datasets(recipe.data, args.data_root, recipe.image_size, args.download,
                                            seed=args.seed)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise UsageError(f"--data {recipe.data} --data-root {args.data_root}: {err}") from None
    num_classes = num_classes_of(recipe.data, train_set)
    weights = args.weights if args.weights is not None else recipe.weights
    model, weights_from = build_model_with_weights(recipe, weights, num_classes, env)
    try:
        chosen = layer_ratios(analyze_model(model), recipe.ratio, recipe.skip)
    except (TypeError, ValueError) as err:
        raise UsageError(f"ratio {recipe.ratio!r} on model {recipe.model}: {err}") from None
    if not chosen:
        raise UsageError(f"ratio {recipe.ratio!r} prunes no layer of {recipe.model}")
    per_rank, eval_per_rank = recipe.batch_size // env.world_size, recipe.eval_batch_size // env.world_size
    train_loader, val_loader = build_loaders(
        train_set, val_set, per_rank, eval_per_rank, rank=env.rank, world_size=env.world_size, seed=args.seed,
        workers=workers, pin_memory=env.device.type == "cuda")
    if len(train_loader) == 0:
        raise UsageError(f"{len(train_set)} training samples make no batch of {per_rank} per process "
                         f"(--batch-size {recipe.batch_size} over {env.world_size} processes)")

    # ---- run folder, checkpoints, resume state
    out, resume = _resolve_out(args, recipe, env)
    identity = {"model": recipe.model, "num_classes": num_classes, "method": recipe.method,
                "ratio": _ratio_key(recipe.ratio), "skip": list(recipe.skip)}
    history_rows: dict = {"images_per_epoch": len(train_loader) * recipe.batch_size}

    def on_saved(path: Path, state, event: str) -> None:      # rank 0, after each checkpoint
        _write_tables(out, state.get("history") or {}, history_rows["images_per_epoch"], write_csv)

    checkpoints = CheckpointManager(out / "checkpoints", keep_last=max(1, args.keep_last), is_main=env.is_main,
                                    on_saved=on_saved)
    engine = Engine(env, amp=amp, channels_last=channels_last, label_smoothing=recipe.label_smoothing,
                    checkpoints=checkpoints, identity=identity, batch_size=per_rank, seed=args.seed)
    resume_state = None
    if resume is not None:
        try:
            resume_state = engine.load(resume)
        except CheckpointMismatch as err:
            raise UsageError(str(err)) from None
        except FileNotFoundError:
            raise UsageError(f"[{env.tag}] checkpoint {resume} is not visible on this process: put --out on a "
                             "filesystem every node can read") from None
        except Exception as err:  # noqa: BLE001 - unreadable file
            raise UsageError(f"--resume {resume}: cannot be read ({type(err).__name__}: {err})") from None

    # ---- from here on the run folder is written
    if resume is None:
        checkpoints.reset()          # --overwrite: checkpoints of an earlier run must not be resumed or kept as best
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ranks").mkdir(exist_ok=True)
    D.barrier(env)
    schedule = recipe.schedule
    from ..baselines import METHODS

    reg_iters = schedule.total_iters if METHODS[recipe.method].regularizes else 0
    checkpoint_every = args.checkpoint_every or max(1, min(1000, reg_iters // 10 or 1))
    ft_every = args.finetune_checkpoint_every
    if ft_every is None:
        ft_every = 1000 if len(train_loader) > 2000 else 0
    settings = {
        "command": " ".join([getattr(args, "prog", "tpp train")] + [shlex.quote(a) for a in argv]),
        "recipe": recipe.to_dict(), "weights": weights, "weights_from": weights_from, "data_root": args.data_root,
        "out": str(out), "resume": str(resume) if resume else None, "num_classes": num_classes,
        "world_size": env.world_size, "batch_size_per_process": per_rank,
        "amp": str(amp or "none").replace("torch.", ""),
        "channels_last": channels_last, "backend": args.backend, "workers": workers, "seed": args.seed,
        "deterministic": args.deterministic, "checkpoint_every": checkpoint_every,
        "finetune_checkpoint_every": ft_every, "keep_last": args.keep_last, "jsv_samples": args.jsv_samples,
        "regularization_iterations": reg_iters, "iterations_per_epoch": len(train_loader),
        "train_samples": len(train_set), "val_samples": len(val_set), "versions": _versions(env),
    }
    tb = None
    if env.is_main:
        write_text_atomic(out / "args.yaml", to_yaml(settings))
        write_json(out / "args.json", settings)
        if args.tensorboard:
            tb, why = TensorBoard.open(out / "tb")
            if tb is None:
                log.warning("--tensorboard: torch.utils.tensorboard is unavailable (%s); install tensorboard", why)
    log.info("%s: %s (%s) on %s × %s, global batch %d, amp %s, channels_last %s → %s", recipe.name, recipe.model,
             weights_from, env.world_size, env.device.type, recipe.batch_size, settings["amp"], channels_last, out)
    if resume is not None:
        log.info("resuming from %s (stage %s, iteration %s, epoch %s)", resume, resume_state["stage"],
                 resume_state["iteration"], resume_state["epoch"])
    progress = Progress(env.is_main and not args.quiet, recipe.batch_size, interval=args.log_interval,
                        tensorboard=tb)
    try:
        result = run_pruning(
            model, train_loader, val_loader, recipe.method, recipe.ratio, skip=recipe.skip, schedule=schedule,
            reg_lr=recipe.reg_lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
            finetune_epochs=recipe.finetune_epochs, finetune_lr=recipe.finetune_lr,
            lr_milestones=recipe.lr_milestones, lr_gamma=recipe.lr_gamma, lr_schedule=recipe.lr_schedule,
            device=env.device, jsv_samples=args.jsv_samples, progress=wrap_progress(progress, args.stop_after_iters),
            log_every=args.log_every or None,
            seed=args.seed, inplace=True, backend=args.backend, checkpoint=out / "checkpoints",
            checkpoint_every=checkpoint_every, finetune_checkpoint_every=ft_every or None,
            resume=resume_state, hooks=engine)
    except StopRequested as stop:
        log.warning("%s; continue with --resume auto", stop)
        return EXIT_STOPPED
    finally:
        if tb is not None:
            tb.close()

    # ---- results
    from .distributed import digest

    mine = {"rank": env.rank, "world_size": env.world_size, "pruned_sha256": digest(result.pruned),
            "model_sha256": digest(result.model.state_dict()),
            "final_top1": result.metrics["accuracy"].get("final")}
    write_json(out / "ranks" / f"rank{env.rank}.json", mine)
    D.agree("the final weights", mine["model_sha256"], env)
    if env.is_main:
        data = result.to_dict()
        data.update({"recipe": recipe.name, "model": recipe.model, "data": recipe.data,
                     "expected": dict(recipe.expected), "comparison": _comparison(result.metrics, recipe.expected)})
        write_json(out / "metrics.json", data)
        _write_tables(out, result.history, history_rows["images_per_epoch"], write_csv)
        save_pruned(result.model, result.pruned, out / "pruned.pt", arch=recipe.model,
                    extra={"num_classes": num_classes, "recipe": recipe.name, "method": recipe.method,
                           "ratio": recipe.ratio})
        acc = result.metrics["accuracy"]
        line = (f"{recipe.name}: top-1 {acc.get('final', float('nan')):.2f}% (best {acc.get('best', float('nan')):.2f}%"
                f", top-5 {result.metrics['top5'].get('final', float('nan')):.2f}%), base {acc['base']:.2f}%, "
                f"FLOPs ×{result.metrics['flops']['speedup']:.3f}")
        if recipe.expected.get("top1") is not None:
            line += f"; paper: {recipe.expected['top1']:.2f}% (base {recipe.expected.get('base_top1')})"
        print(line)
        print(f"run folder: {out}")
    return 0


def _comparison(metrics: dict, expected) -> dict:
    acc = metrics["accuracy"]
    out = {"top1": acc.get("final"), "best_top1": acc.get("best"), "base_top1": acc.get("base"),
           "flops_speedup": metrics.get("flops", {}).get("speedup")}
    if expected.get("top1") is not None and acc.get("final") is not None:
        out["top1_minus_paper"] = acc["final"] - expected["top1"]
    if expected.get("base_top1") is not None and acc.get("base") is not None:
        out["base_minus_paper"] = acc["base"] - expected["base_top1"]
    return out


SUMMARY_COLUMNS = ("epoch", "lr", "train_loss", "val_top1", "val_top5", "val_loss", "time_s", "images_per_s")
REGULARIZE_COLUMNS = ("iteration", "phase", "strength", "penalty", "loss")


def _write_tables(out: Path, history: dict, images_per_epoch: int, write_csv) -> None:
    rows = []
    for r in history.get("finetune") or []:
        t = r.get("time_s")
        rows.append({"epoch": r["epoch"], "lr": r["lr"], "train_loss": r["train_loss"], "val_top1": r.get("test_acc"),
                     "val_top5": r.get("test_top5"), "val_loss": r.get("test_loss"), "time_s": t,
                     "images_per_s": images_per_epoch / t if t else None})
    write_csv(out / "summary.csv", rows, SUMMARY_COLUMNS)
    write_csv(out / "regularize.csv", history.get("regularize") or [], REGULARIZE_COLUMNS)


# ---------------------------------------------------------------------------------------------------- main
def _list_recipes() -> None:
    from .recipes import RECIPES

    for r in RECIPES.values():
        exp = r.expected
        paper = f"paper top-1 {exp['top1']}" if "top1" in exp else ""
        print(f"{r.name:<26} {r.model:<9} {r.data:<11} bs {r.batch_size:<4} {paper:<20} {r.description}")


def main(argv: Optional[Sequence[str]] = None, prog: str = "tpp train") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.prog = prog
    args = parser.parse_args(argv)
    return run_command(args, argv, prog)


def run_command(args, argv: Sequence[str], prog: str = "tpp train") -> int:
    """Run parsed `tpp train` arguments: initialise the process group, run, always tear it down."""
    if args.list:
        _list_recipes()
        return 0
    if args.show:
        try:
            print(resolve_recipe(args).to_json())
        except UsageError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    from . import distributed as D

    try:
        env = D.init_distributed(args.device, args.dist_backend)
    except (ValueError, RuntimeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    log = D.setup_logging(env, args.quiet)
    args.prog = prog
    try:
        code = run(args, argv, env)
        D.barrier(env)  # every rank is done communicating before any tears its connections down
        return code
    except UsageError as err:
        log.error("%s: error: %s", prog, err)
        return EXIT_USAGE
    except BaseException as err:
        log.error("%s failed: %s: %s", prog, type(err).__name__, err)
        raise
    finally:
        D.shutdown(env)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
