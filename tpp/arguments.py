"""The flags of ``tpp prune`` and ``tpp train``, declared once, and the one path from flags to a :class:`Recipe`.

:func:`add_run_arguments` adds every flag a run takes to a parser (the few that belong to one command are marked
so in :data:`FLAGS`); :func:`resolve_recipe` turns parsed flags into the run's recipe: a base recipe (a name, or the
generic one of the dataset), a ``--config`` JSON file on top, then each flag given. Help texts show the real
defaults: a value, or the recipe's values. Bad input raises :class:`UsageError` (one line, exit status 2).
Pure Python: building the parser imports neither torch nor the pipeline.
"""
from __future__ import annotations

import argparse
import json
import math
import textwrap
from dataclasses import replace
from pathlib import Path

__all__ = ["EXIT_USAGE", "UsageError", "count", "seed", "number", "epoch_list", "parse_ratio", "add_run_arguments",
           "resolve_recipe", "HelpFormatter", "SCHEDULE_FLAGS", "RECIPE_FLAGS", "RESUME_RULES",
           "FIELD_TYPES", "TEXT_FIELDS", "OBJECT_FIELDS"]

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input: printed as ``tpp <cmd>: error: <message>``, exit status ``EXIT_USAGE``."""


def _typed(text: str, convert, ok, expected: str):
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def count(text: str) -> int:
    """An integer >= 0."""
    return _typed(text, int, lambda v: v >= 0, "an integer >= 0")


def seed(text: str) -> int:
    """An integer in [0, 2³²): what every RNG the run seeds (Python, NumPy, torch) takes."""
    return _typed(text, int, lambda v: 0 <= v < 2**32, "an integer in [0, 4294967295]")


def number(text: str) -> float:
    """A finite number >= 0."""
    return _typed(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def epoch_list(text: str) -> tuple[int, ...]:
    """Comma-separated epochs, e.g. ``30,60,75``."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs like 30,60,75, got {text!r}") from None


#: the kind of each numeric recipe field: the type of its flag, and the check of its value in a --config file
FIELD_TYPES = {"image_size": count, "reg_lr": number, "momentum": number, "weight_decay": number,
               "batch_size": count, "eval_batch_size": count, "finetune_epochs": count, "finetune_lr": number,
               "lr_milestones": epoch_list, "lr_gamma": number, "label_smoothing": number, "pretrain_epochs": count,
               "pretrain_lr": number, "pretrain_milestones": epoch_list}
#: recipe fields that are text, and those that are JSON objects
TEXT_FIELDS = ("name", "model", "data", "method", "weights", "lr_schedule", "description")
OBJECT_FIELDS = ("schedule", "expected")


def _config_value(path: str, key: str, value):
    """``value`` of recipe field ``key`` read from the --config file ``path``, checked as its flag checks it."""
    kind = FIELD_TYPES.get(key)
    if value is None and key == "image_size":       # the dataset's own size, as --show prints it
        return None
    expected = "text" if key in TEXT_FIELDS else "a JSON object" if key in OBJECT_FIELDS else None
    if key in TEXT_FIELDS and not isinstance(value, str) or key in OBJECT_FIELDS and not isinstance(value, dict):
        raise UsageError(f"--config {path}: {key} must be {expected}, got {json.dumps(value)}")
    if kind is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str, list)):
        raise UsageError(f"--config {path}: {key} must be a number, got {json.dumps(value)}")
    try:
        return kind(",".join(map(str, value)) if isinstance(value, list) else str(value))
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"--config {path}: {key}: {err}") from None


def parse_ratio(text):
    """``--ratio``: a number in [0, 1), or a ``'pattern:ratio,...'`` spec whose ratios lie in [0, 1); else
    :class:`UsageError`. Numbers (e.g. from a JSON config) pass through the same check."""
    from .selection import parse_ratio_spec

    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None
    if value is not None:
        if not (math.isfinite(value) and 0 <= value < 1):
            raise UsageError(f"--ratio {text!r}: the pruning ratio must lie in [0, 1) (0 keeps every filter, "
                             "1 would remove all)")
        return value
    try:
        parse_ratio_spec(text)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--ratio {text!r}: {err}; expected a number in [0, 1) or 'pattern:ratio,...' with "
                         "ratios in [0, 1)") from None
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` where a flag has a real default; flags defaulting to the recipe say so themselves."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def _from_recipe(field: str) -> str:
    """"from the recipe: cifar 0.001, imagenet 0.001, demo 0.01" — the generic recipes' values of ``field``."""
    from .recipes import GENERIC

    def show(v):
        v = v.state_dict() if hasattr(v, "state_dict") else v
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    values = {r.name: show(getattr(r, field)) for r in GENERIC}
    if len(set(values.values())) == 1:
        return f"default: from the recipe, {next(iter(values.values()))} in each"
    return "default: from the recipe: " + ", ".join(f"{k} {v}" for k, v in values.items())


def _schedule_default(key: str) -> str:
    from .recipes import GENERIC

    return "default: from the recipe: " + ", ".join(f"{r.name} {getattr(r.schedule, key)}" for r in GENERIC)


#: flag → GrowingSchedule field
SCHEDULE_FLAGS = {"delta": "Δ, strength added every --interval iterations",
                  "interval": "K_u, iterations between strength increments",
                  "ceiling": "strength at which growth stops",
                  "stabilize_iters": "iterations at the ceiling before removal",
                  "zero_out_interval": "iterations between zeroing consecutive layers"}
#: flags that set a recipe field of the same name
RECIPE_FLAGS = ("model", "data", "method", "image_size", "reg_lr", "momentum", "weight_decay", "batch_size",
                "eval_batch_size", "finetune_epochs", "finetune_lr", "lr_schedule", "lr_milestones", "lr_gamma",
                "label_smoothing", "weights", "pretrain_epochs", "pretrain_lr")


#: the "run" group's description in --help: what a resume may change and what it refuses
RESUME_RULES = textwrap.fill(
    "--resume continues a run where its checkpoint left it: with any --workers, and the same --threads, --device, "
    "--backend, --channels-last and number of processes (on GPUs with --deterministic), the result equals the "
    "uninterrupted run's bit for bit. Settings that change the result (--seed, the schedule and optimization flags, "
    "--batch-size, --eval-batch-size, --data, --image-size, --amp, --label-smoothing, --jsv-samples, --decode (cpu, "
    "or cpu-tensor/gpu), --model, --method, --ratio, --skip, --allow-inexact) must be as before: a resume that "
    "changes one is refused, naming it. These may change: --workers, --threads, --device, --backend, --channels-last, "
    "--deterministic, --compile, --static-graph (floating-point rounding may then differ), the number of processes "
    "(the same global batches; rounding and per-process BatchNorm statistics differ: a warning says so), "
    "--checkpoint-every, --finetune-checkpoint-every, --checkpoint-minutes, --keep-last, --keep-checkpoint, "
    "--log-every, --log-interval, --tensorboard, --quiet, --stop-after-iters, --data-root; --weights and "
    "--pretrain-* are unused (the checkpoint holds the model).", width=100, break_on_hyphens=False,
    break_long_words=False)


def add_run_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """Every flag of a run, for ``command`` (``"prune"`` or ``"train"``): the shared ones and the command's own."""
    prune, train = command == "prune", command == "train"
    if train:
        p.add_argument("recipe", nargs="?", help="recipe name (--list), or omit and give --config or "
                                                 "--model/--data/--ratio")
        p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--show", action="store_true", help="print the resolved recipe as JSON and exit")
    p.add_argument("--config", help="JSON file of recipe fields (on top of the named recipe, if any)")

    g = p.add_argument_group("what to prune" + (" (defaults: the recipe's)" if train else ""))
    if prune:
        g.add_argument("--recipe", help="recipe whose settings the flags change (tpp list; default: by dataset — "
                                        "cifar for mnist/cifar10/cifar100, imagenet for imagefolder, demo for digits)")
    g.add_argument("--model", help="model name (tpp list), or torchvision:<name>")
    g.add_argument("--data", help="dataset: digits (embedded), mnist, cifar10, cifar100, imagefolder")
    g.add_argument("--data-root", help="folder holding the dataset (not needed for digits; imagefolder: with train/ "
                                       "and val/)")
    g.add_argument("--download", action="store_true", help="download mnist/cifar into --data-root if missing")
    g.add_argument("--image-size", type=FIELD_TYPES["image_size"],
                   help="training crop / evaluation size (imagefolder, mnist; default: the dataset's, 32 for mnist "
                        "with mlp7)")
    g.add_argument("--ratio", help="pruning ratio: a number in [0, 1) for every prunable layer but the classifier, "
                                   "or 'pattern:ratio,...' (shell wildcards on layer names, last match wins)")
    g.add_argument("--speedup", type=number,
                   help="instead of --ratio: the FLOPs speedup (> 1) to reach within 2%%; the ratios are searched on "
                        "the weights to prune (tpp.search_speedup) and printed")
    g.add_argument("--speedup-mode", choices=("uniform", "global"), default="uniform",
                   help="--speedup by one ratio for every unit, or by a global ranking of normalized scores (needs "
                        "--weights)")
    g.add_argument("--skip", help="comma-separated layer patterns never pruned")
    g.add_argument("--allow-inexact", action="store_true", help="also prune channels a LayerNorm normalizes with "
                   "kept ones (a ViT's embedding, tpp-method.md §12): removal then changes the output; the change "
                   "is measured on a test batch and recorded (metrics.json: removal_deviation)")
    g.add_argument("--method", help="tpp, l1, greg, diagonal, no-bn, kernorth, orthconv, orthp, scratch, "
                                    "l1-kernorth, l1-orthconv (default: tpp)")
    g.add_argument("--weights", help="the model to prune: a state_dict file, 'torchvision[:ENUM]' for torchvision's "
                                     "weights, or 'none' (random initialization)"
                                     + (" (default: train one here, see --pretrain-epochs)" if prune
                                        else " (default: the recipe's, IMAGENET1K_V1 for ImageNet)"))
    if prune:
        g.add_argument("--pretrain-epochs", type=FIELD_TYPES["pretrain_epochs"],
                       help=f"without --weights, train the model here first ({_from_recipe('pretrain_epochs')})")
        g.add_argument("--pretrain-lr", type=FIELD_TYPES["pretrain_lr"],
                       help=f"pretraining learning rate ({_from_recipe('pretrain_lr')})")

    g = p.add_argument_group("schedule and optimization")
    for key, text in SCHEDULE_FLAGS.items():
        g.add_argument("--" + key.replace("_", "-"), type=count if key.endswith(("interval", "iters")) else number,
                       help=f"{text} ({_schedule_default(key)})")
    g.add_argument("--reg-iters", type=count, help="regularization iterations of kernorth/orthconv (default: the "
                                                   "schedule's total)")
    g.add_argument("--orth-weight", type=number, help="λ of KernOrth/OrthConv (default: 1e-3 kernorth, 1e-2 "
                                                      "orthconv)")
    for flag, text in (("reg-lr", "pruning-phase SGD learning rate"),
                       ("momentum", "SGD momentum"),
                       ("weight-decay", "weight decay"),
                       ("batch-size", "global training batch (split over the processes)"),
                       ("eval-batch-size", "global evaluation batch"),
                       ("finetune-epochs", "finetuning epochs"),
                       ("finetune-lr", "finetuning learning rate"),
                       ("lr-milestones", "epochs where the step schedule multiplies the finetuning lr by --lr-gamma, "
                                         "e.g. 60,90"),
                       ("lr-gamma", "lr decay factor"),
                       ("label-smoothing", "of the training cross-entropy")):
        field = flag.replace("-", "_")
        g.add_argument("--" + flag, type=FIELD_TYPES[field], help=f"{text} ({_from_recipe(field)})")
    g.add_argument("--lr-schedule", choices=("step", "cosine"), help="finetuning lr per epoch ("
                                                                    + _from_recipe("lr_schedule") + ")")

    g = p.add_argument_group("speed")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="none" if prune else "auto",
                   help="autocast dtype; fp16 adds a GradScaler; auto: bf16 on GPUs, none on CPU")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="off" if prune else "auto",
                   help="channels_last memory format (auto: on GPUs)")
    g.add_argument("--backend", default="auto", help="TPPRegularizer backend: auto, torch, triton, cuda")
    g.add_argument("--workers", type=count, help="DataLoader workers per process (default on GPUs: the CPUs this "
                                                 "process may use / processes per node − 1; 0 on CPU)")
    g.add_argument("--decode", choices=("cpu", "cpu-tensor", "gpu"), default="cpu-tensor",
                   help="how imagefolder training JPEGs are decoded and cropped: cpu-tensor "
                        "(torchvision.io.decode_jpeg and uint8 tensor resize in the loader workers: 1.5x PIL's "
                        "images/s, pixels within 2 levels of PIL's), cpu (PIL in the workers: the reference pixels) "
                        "or gpu (decode and crop on the device); the same crops per sample seed; falls back to cpu, "
                        "logged, where unavailable")
    g.add_argument("--threads", type=count, default=0,
                   help="torch CPU threads per process (0: torch's default; 1 is often fastest for small models)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic cuDNN/CUDA kernels (slower; off: cudnn.benchmark)")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the training module (--compile: inductor; --compile aot_eager etc.); the "
                        "regularizer's step runs outside it and the pruned model is compiled again after removal")
    g.add_argument("--static-graph", action="store_true",
                   help="DistributedDataParallel(static_graph=True): the graph is the same every step")

    g = p.add_argument_group("run", RESUME_RULES)
    g.add_argument("--out", help="run folder (default: runs/<recipe or model-data-method>-<time>)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in --out from an empty folder: the earlier run's files are removed "
                        "(refused if --out holds files a tpp run does not write)")
    g.add_argument("--resume", help="'auto' (the newest checkpoint in --out, if any) or a checkpoint file of a "
                                    "run folder")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available); under torchrun each "
                                    "process uses cuda:LOCAL_RANK")
    if train:
        g.add_argument("--dist-backend", choices=("nccl", "gloo"), help="default: nccl on cuda, gloo on cpu")
    g.add_argument("--seed", type=seed, default=0, help="random seed (data split, order, initialization)")
    g.add_argument("--checkpoint-every", type=count, help="checkpoint every this many regularization iterations "
                                                          "(default: 1000, at most a tenth of them)")
    g.add_argument("--finetune-checkpoint-every", type=count,
                   help="also checkpoint every this many finetuning iterations (default: 1000 on ImageNet-size "
                        "epochs, else per epoch only; 0: per epoch only)")
    g.add_argument("--checkpoint-minutes", type=number, default=10.0,
                   help="also checkpoint when this many minutes have passed since the last checkpoint, whichever "
                        "of the two cadences comes first (0: by iterations only); written in the background")
    if train:
        g.add_argument("--keep-last", type=count, default=2, help="numbered checkpoints kept (best.pt besides)")
    else:
        g.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.pt after the run")
    g.add_argument("--jsv-samples", type=count, default=64 if prune else 0,
                   help="test samples for the mean Jacobian singular value (one backward per class each; 0: skip)")
    g.add_argument("--log-every", type=count, help="record strength, penalty and loss every this many "
                                                   "regularization iterations (default: ~200 records per run)")
    g.add_argument("--log-interval", type=number, default=30.0,
                   help="seconds between progress lines in logs (a line at every tenth of a phase besides)")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars to <out>/tb")
    g.add_argument("--quiet", action="store_true", help="warnings and errors only")
    g.add_argument("--stop-after-iters", type=count, help="debugging: stop (as if killed) after this many training "
                                                          "iterations, exit status 0 and the command to resume")


def resolve_recipe(args, command: str):
    """The run's :class:`tpp.recipes.Recipe`: the base recipe (the named one — ``tpp train RECIPE`` or
    ``--recipe`` — else the generic recipe of the dataset), ``--config`` on top, then every flag given."""
    from .recipes import default_recipe, get_recipe, recipe_from_dict

    values: dict = {}
    if args.config:
        try:
            loaded = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UsageError(f"--config {args.config}: {err}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--config {args.config}: expected a JSON object of recipe fields")
        values.update((k, _config_value(args.config, k, v)) for k, v in loaded.items())
    for key in RECIPE_FLAGS:
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    speedup = getattr(args, "speedup", None)
    if speedup is not None and args.ratio is not None:
        raise UsageError("--ratio and --speedup exclude each other")
    if args.ratio is not None:
        values["ratio"] = args.ratio
    if args.skip is not None:
        values["skip"] = args.skip
    schedule = {k: getattr(args, k) for k in SCHEDULE_FLAGS if getattr(args, k) is not None}
    if schedule:
        values["schedule"] = {**(values.get("schedule") or {}), **schedule}
    try:
        base = get_recipe(args.recipe) if args.recipe else None
    except ValueError as err:
        raise UsageError(str(err)) from None
    if base is None:
        base = default_recipe(values.get("data", ""), values.get("model", ""))
    try:
        recipe = recipe_from_dict(values, base)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err).replace("GrowingSchedule.", "--").replace("_", "-")) from None
    what = (("model", recipe.model), ("data", recipe.data)) + ((("ratio", recipe.ratio),) if speedup is None else ())
    missing = [f"--{k}" for k, v in what if v in ("", None)]
    if missing:
        raise UsageError(f"recipe {recipe.name!r} does not say what to prune: give {', '.join(missing)} "
                         f"(or a recipe that does: {'tpp train --list' if command == 'train' else 'tpp list'})")
    if speedup is not None:     # the ratio is searched by tpp.command once the model is built
        return replace(recipe, ratio=None)
    return replace(recipe, ratio=parse_ratio(recipe.ratio))
