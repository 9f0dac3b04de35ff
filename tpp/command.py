"""The command core: ``tpp prune`` and ``tpp train`` are one flow, in one process or under torchrun.

    flags (tpp.arguments) → recipe → data → model and weights (tpp.weights) → one torch.fx trace, ratio resolved
    → run folder, resume checkpoint and its RunIdentity checked → [prune: pretraining] → tpp.pipeline.run_pruning
    with tpp.train.engine.Engine → metrics.json (latency included), summary.csv, regularize.csv, pruned.pt

Everything a user can get wrong — every flag, ``$TPP_BACKEND``, a dataset download, the run folder, a resume
checkpoint and its settings (:class:`~tpp.identity.RunIdentity`: a resume that would change the result is refused)
— is checked before the run folder is touched or anything trains, and reported as one line
(``tpp <cmd>: error: ...``, exit status 2). ``--overwrite`` starts from an empty run folder
(:mod:`tpp.run_folder`). The two commands differ only in their :class:`Layout`:

* ``tpp prune`` — settings in ``config.json``; one ``checkpoint.pt`` (removed at the end unless
  ``--keep-checkpoint``); without ``--weights`` the model is trained here first (``pretrained.pt``); ``report.md``
  with plots; fp32 by default.
* ``tpp train`` — settings in ``args.yaml``/``args.json``; ``checkpoints/ckpt-*.pt`` (the last ``--keep-last``) and
  ``best.pt``; ``ranks/rank<r>.json`` digests; ``--weights`` required (a recipe may name torchvision's); AMP and
  channels_last on GPUs by default.

Exit status: 0 done (also after ``--stop-after-iters``, with the command that resumes), 2 bad input (a corrupted
``--resume``/``--weights`` file included), 3 a non-finite loss, penalty, gradient or weight (one line naming the first
bad iteration and the last good checkpoint; no model is written from it).
"""
from __future__ import annotations

import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .arguments import EXIT_USAGE, UsageError, resolve_recipe
from .guard import EXIT_NON_FINITE, NonFiniteError

__all__ = ["Layout", "LAYOUTS", "run_command", "versions", "list_recipes", "resume_command", "command_line"]


@dataclass(frozen=True)
class Layout:
    """What a command's run folder holds besides the shared files."""

    command: str                        # "prune" | "train"
    settings_files: tuple[str, ...]     # where the resolved settings go
    checkpoints: str                    # "file": <out>/checkpoint.pt; "series": <out>/checkpoints/ckpt-*.pt
    ranks: bool                         # ranks/rank<r>.json digests
    pretrain: bool                      # train the model first when no --weights are given
    report: bool                        # report.md and its plots (matplotlib) besides metrics.json


LAYOUTS = {
    "prune": Layout("prune", ("config.json",), "file", ranks=False, pretrain=True, report=True),
    "train": Layout("train", ("args.yaml", "args.json"), "series", ranks=True, pretrain=False, report=False),
}


def versions(env=None) -> dict:
    """tpp, torch, Python and machine versions (and the process group and GPU under ``env``)."""
    import os

    import torch

    from . import __version__

    info = {"tpp": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()}
    if env is not None:
        info.update({"world_size": env.world_size, "backend": env.backend, "device": str(env.device)})
        if env.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(env.device)
            info["cuda"] = torch.version.cuda
    return info


def list_recipes() -> None:
    """One line per recipe: name, model, dataset, batch, the paper's top-1, description."""
    from .recipes import RECIPES

    for r in RECIPES.values():
        paper = f"paper top-1 {r.expected['top1']}" if "top1" in r.expected else ""
        print(f"{r.name:<26} {r.model or '-':<9} {r.data or '-':<11} bs {r.batch_size:<4} {paper:<20} "
              f"{r.description}")


def run_command(args, command: str, command_line: str, prog: str) -> int:
    """Run parsed ``tpp prune``/``tpp train`` arguments: ``--list``/``--show``, else initialise the processes, run,
    and always tear the process group down. A :class:`UsageError` is one line on stderr and exit status 2."""
    if getattr(args, "list", False):
        list_recipes()
        return 0
    if args.show:
        try:
            print(resolve_recipe(args, command).to_json())
        except UsageError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    from .train import distributed as D

    try:
        env = D.init_distributed(args.device, getattr(args, "dist_backend", None))
    except (ValueError, RuntimeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    log = D.setup_logging(env, args.quiet)
    try:
        code = _run(args, LAYOUTS[command], command_line, env, log)
        D.barrier(env)  # every rank is done communicating before any tears its connections down
        return code
    except UsageError as err:
        if env.is_main:
            print(f"{prog}: error: {err}", file=sys.stderr)
        else:
            log.error("%s: error: %s", prog, err)
        return EXIT_USAGE
    except NonFiniteError as err:
        if env.is_main:
            print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_NON_FINITE
    except BaseException as err:
        log.error("%s failed: %s: %s", prog, type(err).__name__, err)
        raise
    finally:
        D.shutdown(env)


def _check_recipe(recipe, world: int) -> None:
    from .baselines import METHODS
    from .data import list_datasets
    from .weights import check_model_name

    if recipe.method not in METHODS:
        raise UsageError(f"unknown method {recipe.method!r}; allowed: {', '.join(METHODS)}")
    if recipe.data not in list_datasets():
        raise UsageError(f"unknown dataset {recipe.data!r}; allowed: {', '.join(list_datasets())}")
    check_model_name(recipe.model)
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


def _run_config(args, recipe, num_classes: int, eval_batch: int, caller_settings: dict):
    """The typed settings of the run (``caller_settings``: the command's settings outside RunConfig that change the
    result); a ``--reg-iters`` the method ignores is refused with the flags to use."""
    from .baselines import METHODS
    from .pipeline import RunConfig

    total = recipe.schedule.total_iters
    if METHODS[recipe.method].regularizer == "tpp" and args.reg_iters not in (None, total):
        raise UsageError(f"--reg-iters applies to kernorth/orthconv; {recipe.method!r} runs the schedule's {total} "
                         "iterations (set --delta/--interval/--stabilize-iters)")
    iters = (total if args.reg_iters is None else args.reg_iters) if METHODS[recipe.method].regularizes else 0
    try:
        return RunConfig.from_recipe(
            recipe, reg_iters=args.reg_iters, orth_weight=args.orth_weight, jsv_samples=args.jsv_samples,
            log_every=args.log_every, seed=args.seed, backend=args.backend,
            checkpoint_every=args.checkpoint_every or max(1, min(1000, iters // 10 or 1)),
            finetune_checkpoint_every=args.finetune_checkpoint_every or None, num_classes=num_classes,
            caller_settings=caller_settings, latency_batch=max(1, min(64, eval_batch)),
            allow_inexact=args.allow_inexact)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def _image_size(recipe) -> Optional[int]:
    if recipe.image_size is None and recipe.data == "mnist" and recipe.model == "mlp7":
        return 32                        # MLP-7-Linear takes 32×32 MNIST (1024 inputs), as in the paper
    return recipe.image_size


def _run(args, layout: Layout, command_line: str, env, log) -> int:
    import random
    from dataclasses import replace

    import numpy as np
    import torch

    from .graph import analyze_model
    from .identity import CheckpointMismatch, RunIdentity
    from .recipes import RECIPES
    from .run_folder import clear_run_folder, resolve_out
    from .run_outputs import write_results, write_settings
    from .selection import layer_ratios, search_speedup
    from .train.data import build_datasets, build_loaders, default_workers, model_input, normalizer_of
    from .train.decode import PIXELS_OF, resolve_decode
    from .weights import load_weights, model_kwargs

    recipe = resolve_recipe(args, layout.command)
    _check_recipe(recipe, env.world_size)
    _check_backend(args.backend, recipe.method, env.device)
    from .train.engine import fp32_arithmetic, resolve_amp

    amp = resolve_amp(args.amp, env.device)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and env.device.type == "cuda")
    workers = args.workers if args.workers is not None else default_workers(env.device, env.local_world_size)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = args.deterministic
    if amp is None:                      # the paper's arithmetic: IEEE fp32, no TF32 convolutions or matmuls
        fp32_arithmetic()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ---- data, model, graph: every rank, nothing written yet
    if recipe.data not in ("digits",) and args.data_root is None:
        raise UsageError(f"--data {recipe.data} is read from a local folder: pass --data-root <folder>"
                         + (" (with --download to fetch it there)" if recipe.data != "imagefolder" else ""))
    if recipe.image_size and recipe.data == "digits":
        raise UsageError(f"--image-size {recipe.image_size}: the digits are 8×8 images (the size applies to mnist and "
                         "imagefolder)")
    decoder = resolve_decode(args.decode, env.device) if recipe.data == "imagefolder" else None
    try:
        pixels = PIXELS_OF[decoder] if decoder else "float"
        train_set, val_set = build_datasets(recipe.data, args.data_root, _image_size(recipe), args.download,
                                            seed=args.seed, pixels=pixels)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise UsageError(f"--data {recipe.data} --data-root {args.data_root}: {err}") from None
    except (OSError, RuntimeError) as err:          # a failed download, an unreadable file
        what = "--download failed" if args.download else "cannot be read"
        raise UsageError(f"--data {recipe.data} --data-root {args.data_root}: {what} ({type(err).__name__}: "
                         f"{' '.join(str(err).split())})"
                         + ("; check the network, or put the dataset files there yourself" if args.download
                            else "")) from None
    from .data import num_classes_of

    num_classes = num_classes_of(recipe.data, train_set)
    sample = model_input(val_set)           # float, as the model takes it (uint8 images normalized)
    kwargs = model_kwargs(recipe.model, sample)
    caller_settings = {"batch_size": recipe.batch_size, "eval_batch_size": recipe.eval_batch_size,
                       "data": recipe.data, "image_size": _image_size(recipe), "amp": _amp_name(amp),
                       "label_smoothing": recipe.label_smoothing}
    if decoder:                         # the training pixels: PIL's, or decode_jpeg's (cpu-tensor and gpu: the same)
        caller_settings["decode"] = "cpu" if decoder == "cpu" else "cpu-tensor|gpu"
    named = recipe.name in RECIPES and RECIPES[recipe.name].complete
    out, resume = resolve_out(args, layout, recipe.name if named else f"{recipe.model}-{recipe.data}-{recipe.method}",
                              env)
    if args.resume == "auto" and resume is None and out.is_dir() and any(out.iterdir()):
        log.warning("--resume auto: %s holds a run stopped before its first checkpoint; it starts again", out)
    weights = recipe.weights or None
    pretrain_epochs = 0                  # a resumed run restores its weights from the checkpoint
    if layout.pretrain and resume is None:
        explicit = getattr(args, "pretrain_epochs", None)
        pretrain_epochs = explicit if explicit is not None else (recipe.pretrain_epochs if weights is None else 0)
        if weights is None and pretrain_epochs == 0:
            raise UsageError("no model to prune: pass --weights <state_dict> (or --weights torchvision), or "
                             "--pretrain-epochs N to train one here first")
        if pretrain_epochs and not recipe.pretrain_lr > 0:
            raise UsageError(f"--pretrain-lr must be > 0, got {recipe.pretrain_lr}")
    elif weights is None and resume is None:
        raise UsageError(f"recipe {recipe.name!r} has no pretrained weights: pass --weights <state_dict file> "
                         "(the model to prune), or --weights none for a smoke test from random initialization")
    model, weights_from = load_weights(recipe.model, weights, num_classes, kwargs, sample, recipe.data, env)
    speedup = None
    try:
        graph = analyze_model(model, allow_inexact=args.allow_inexact)  # the run's one torch.fx trace
        if recipe.ratio is None:                                     # --speedup: the ratios are searched here
            if layout.pretrain and weights is None and args.speedup_mode == "global":
                raise UsageError("--speedup-mode global ranks the scores of the weights to prune: pass --weights "
                                 "(this run would pretrain them after the search), or use --speedup-mode uniform")
            speedup = search_speedup(model, args.speedup, sample.unsqueeze(0), mode=args.speedup_mode,
                                     skip=recipe.skip, graph=graph)
            recipe = replace(recipe, ratio=speedup.ratio_spec(graph))
            for line in speedup.describe().splitlines():
                log.info("%s", line)
        chosen = layer_ratios(graph, recipe.ratio, recipe.skip)
    except (TypeError, ValueError) as err:
        skip = f" --skip {','.join(recipe.skip)!r}" if recipe.skip else ""
        what = f"--speedup {args.speedup:g}" if recipe.ratio is None else f"--ratio {recipe.ratio!r}"
        raise UsageError(f"{what}{skip} on --model {recipe.model}: {err}") from None
    if not chosen:
        raise UsageError(f"--ratio {recipe.ratio!r} prunes no layer of --model {recipe.model} (every ratio is 0 or "
                         "skipped)")
    config = _run_config(args, recipe, num_classes, recipe.eval_batch_size // env.world_size, caller_settings)
    per_rank, eval_per_rank = recipe.batch_size // env.world_size, recipe.eval_batch_size // env.world_size
    train_loader, val_loader = build_loaders(
        train_set, val_set, per_rank, eval_per_rank, rank=env.rank, world_size=env.world_size, seed=args.seed,
        workers=workers, pin_memory=env.device.type == "cuda")
    if len(train_loader) == 0:
        raise UsageError(f"{len(train_set)} training samples make no batch of {per_rank} per process "
                         f"(--batch-size {recipe.batch_size} over {env.world_size} processes)")

    # ---- checkpoints, resume state and its identity
    identity = RunIdentity.of_config(model, config)      # what the pipeline stores in and checks against checkpoints
    engine, checkpoints, images_per_epoch = _engine(args, layout, out, env, amp, channels_last, recipe, per_rank,
                                                    len(train_loader))
    engine.normalize = normalizer_of(val_set)       # uint8 batches are normalized on the device
    resume_state = None
    if resume is not None:
        try:
            resume_state = engine.load(resume)
        except FileNotFoundError:
            raise UsageError(f"[{env.tag}] checkpoint {resume} is not visible on this process: put --out on a "
                             "filesystem every node can read") from None
        except Exception as err:  # noqa: BLE001 - unreadable file
            raise UsageError(f"--resume {resume}: cannot be read ({type(err).__name__}: {err})") from None
        try:
            identity.check(resume_state, f"--resume {resume}")
        except CheckpointMismatch as err:
            raise UsageError(str(err)) from None

    # ---- from here on the run folder is written
    if resume is None:
        if env.is_main:
            try:
                clear_run_folder(out)    # --overwrite: a new run starts from an empty folder (checked in resolve_out)
            except FileExistsError as err:
                raise UsageError(f"--overwrite: {err}") from None
        checkpoints.reset()          # forget what the store saw of an earlier run
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if layout.ranks:
            (out / "ranks").mkdir(exist_ok=True)
        from .files import remove_stale_temporaries

        remove_stale_temporaries(out, ("checkpoints", "ranks"))     # left by a killed earlier run
    from .train import distributed as D

    D.barrier(env)
    settings = {
        "command": command_line, "recipe": recipe.to_dict(), "model": recipe.model, "model_kwargs": kwargs,
        "data": recipe.data, "data_root": args.data_root, "method": recipe.method, "ratio": recipe.ratio,
        "skip": list(recipe.skip), "weights": weights, "weights_from": weights_from, "seed": args.seed,
        "device": str(env.device), "out": str(out), "resume": str(resume) if resume else None,
        "num_classes": num_classes, "input_shape": list(sample.shape), "world_size": env.world_size,
        "batch_size": recipe.batch_size,
        "speedup": None if speedup is None else {"target": speedup.target, "mode": speedup.mode,
                                                 "reached": speedup.speedup, "ratios": speedup.ratios},
        "batch_size_per_process": per_rank, "pretrain_epochs": pretrain_epochs,
        "amp": _amp_name(amp), "channels_last": channels_last, "backend": args.backend,
        "workers": workers, "deterministic": args.deterministic, "checkpoint_every": config.checkpoint_every,
        "finetune_checkpoint_every": config.finetune_checkpoint_every,
        "keep_last": getattr(args, "keep_last", None), "jsv_samples": args.jsv_samples,
        "regularization_iterations": config.reg_iters, "iterations_per_epoch": len(train_loader),
        "train_samples": len(train_set), "val_samples": len(val_set), "versions": versions(env),
    }
    write_settings(out, layout, settings, env)
    from .progress import Progress
    from .train.engine import StopRequested, stop_after
    from .train.logs import TensorBoard

    tb = None
    if env.is_main and args.tensorboard:
        tb, why = TensorBoard.open(out / "tb")
        if tb is None:
            log.warning("--tensorboard: torch.utils.tensorboard is unavailable (%s); install tensorboard", why)
    log.info("%s: %s (%s) on %s × %s, global batch %d, amp %s, channels_last %s → %s", recipe.name, recipe.model,
             weights_from, env.world_size, env.device.type, recipe.batch_size, settings["amp"], channels_last, out)
    progress = Progress(env.is_main and not args.quiet, recipe.batch_size, interval=args.log_interval,
                        tensorboard=tb)
    if resume is not None:
        log.info("resuming from %s (stage %s, iteration %s, epoch %s)", resume, resume_state["stage"],
                 resume_state["iteration"], resume_state["epoch"])
    try:
        if pretrain_epochs:
            settings["pretrain"] = _pretrain(model, recipe, pretrain_epochs, train_loader, val_loader, engine, env,
                                             progress, out, log)
            write_settings(out, layout, settings, env)
        from .pipeline import run_pruning

        result = run_pruning(model, train_loader, val_loader, config=config, device=env.device,
                             progress=stop_after(progress, args.stop_after_iters), inplace=True,
                             checkpoint=checkpoints.path if layout.checkpoints == "file" else out / "checkpoints",
                             resume=resume_state, hooks=engine, graph=graph)
    except StopRequested as stop:
        log.warning("%s; continue with: %s", stop, resume_command(command_line, None if args.out else out))
        return 0
    finally:
        if tb is not None:
            tb.close()
        engine.close()                   # the checkpoint being written is on disk (or its error raised)
    settings["run"] = result.config
    write_settings(out, layout, settings, env)
    write_results(out, layout, result, recipe, settings, images_per_epoch, env)
    if layout.checkpoints == "file" and not getattr(args, "keep_checkpoint", False):
        checkpoints.reset()
    return 0


def _engine(args, layout, out, env, amp, channels_last, recipe, per_rank: int, batches_per_epoch: int):
    """The run's :class:`~tpp.train.engine.Engine`, its checkpoint store, and images per finetuning epoch."""
    from .train.checkpoint import CheckpointFile, CheckpointManager
    from .train.engine import Engine

    images_per_epoch = batches_per_epoch * recipe.batch_size
    if layout.checkpoints == "file":
        checkpoints = CheckpointFile(out / "checkpoint.pt", is_main=env.is_main, background=True)
    else:
        from .run_outputs import write_tables

        def on_saved(path: Path, state, event: str) -> None:      # rank 0, after each checkpoint
            write_tables(out, state.get("history") or {}, images_per_epoch)

        checkpoints = CheckpointManager(out / "checkpoints", keep_last=max(1, args.keep_last), is_main=env.is_main,
                                        on_saved=on_saved, background=True)
    engine = Engine(env, amp=amp, channels_last=channels_last, label_smoothing=recipe.label_smoothing,
                    checkpoints=checkpoints, batch_size=per_rank, seed=args.seed, static_graph=args.static_graph,
                    compile=args.compile, checkpoint_minutes=args.checkpoint_minutes)
    return engine, checkpoints, images_per_epoch


def _pretrain(model, recipe, epochs: int, train_loader, val_loader, engine, env, progress, out: Path, log) -> dict:
    """``tpp prune`` without ``--weights``: train the model here first; ``pretrained.pt`` holds it."""
    from .files import atomic_save
    from .loop import train

    log.info("pretraining %s on %s for %d epochs", recipe.model, recipe.data, epochs)
    model = engine.place(model, env.device)
    history = train(model, train_loader, epochs, recipe.pretrain_lr, momentum=recipe.momentum,
                    weight_decay=recipe.weight_decay, milestones=recipe.pretrain_milestones, device=env.device,
                    progress=progress, phase="pretrain", hooks=engine, net=engine.wrap(model))
    acc = engine.evaluate(model, val_loader, env.device)["acc"]
    if env.is_main:
        atomic_save(model.state_dict(), out / "pretrained.pt")
    log.info("pretrained: test accuracy %.2f%%", acc)
    return {"epochs": epochs, "lr": recipe.pretrain_lr, "test_acc": acc,
            "train_loss": history[-1]["train_loss"] if history else None}


def _amp_name(amp) -> str:
    """``"none"``, ``"bfloat16"`` or ``"float16"``: the autocast dtype as the settings record it."""
    return str(amp or "none").replace("torch.", "")


def _check_backend(requested: str, method: str, device) -> None:
    """``--backend`` (and ``$TPP_BACKEND``, which overrides it) names a backend; for a method with the TPP
    regularizer, one that runs on ``device`` here."""
    import os

    from .backends import BACKENDS, resolve_backend
    from .baselines import METHODS

    env = os.environ.get("TPP_BACKEND")
    source = f"$TPP_BACKEND={env!r}" if env is not None else f"--backend {requested}"
    name = env or requested or "auto"
    if name not in BACKENDS:
        raise UsageError(f"{source}: unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    if METHODS[method].regularizer == "tpp":
        try:
            resolve_backend(requested, device)
        except ValueError as err:
            raise UsageError(f"{source}: {err}") from None


def resume_command(command_line: str, out: Optional[Path]) -> str:
    """The command that continues a stopped run: ``command_line`` with ``--resume auto`` (and ``--out out`` when
    given), without ``--resume``/``--stop-after-iters``/``--overwrite`` of its own."""
    words, kept, drop = shlex.split(command_line), [], 0
    for word in words:
        if drop:
            drop -= 1
        elif word in ("--resume", "--stop-after-iters"):
            drop = 1
        elif word.startswith(("--resume=", "--stop-after-iters=")) or word == "--overwrite":
            continue
        else:
            kept.append(word)
    if out is not None:
        kept += ["--out", str(out)]
    return " ".join(shlex.quote(w) for w in kept + ["--resume", "auto"])


def command_line(prog: str, argv: Sequence[str]) -> str:
    """The command as typed (quoted), for the settings files and the resume hint."""
    return " ".join([prog] + [shlex.quote(a) for a in argv])
