"""The ``tpp`` command (console script and ``python -m tpp``).

    tpp prune --model resnet56 --data cifar10 --data-root ~/data --weights resnet56.pt \\
              --ratio "*layer*.conv1:0.5" --method tpp --out runs/resnet56-tpp-0.5
    tpp prune --model digits_cnn --data digits --ratio "features.3:0.7,features.7:0.7" --method l1
    tpp list                                  # models, datasets, methods, recipes
    tpp train resnet50-imagenet-2.31x --data-root /data/imagenet   # a paper setting; under torchrun:
                                                                   # python -m tpp.train
    tpp export runs/r56-0.9 --format torchscript                   # the pruned model, checked against PyTorch
    tpp inspect resnet50 --speedup 2.3                             # units, refusals, ratios for a speedup

``tpp prune`` and ``tpp train`` are one flow (:mod:`tpp.command`) with the flags of :mod:`tpp.arguments`; a
``tpp prune`` run folder (a non-empty one is refused; ``--overwrite`` empties an earlier run's folder first, and
refuses one holding files a run does not write):

    config.json            every setting, resolved (recipe + flags), the command line, versions
    metrics.json           accuracies, mean JSVs, params/FLOPs, latency, strength/penalty/loss, finetuning curve
    report.md              the same as a readable report, with the plots
    strength_penalty.png   strength r and the penalty over the regularization iterations (regularizing methods)
    accuracy.png, jsv.png  accuracy and mean JSV of the given model, before/after removal, after finetuning
    summary.csv            per finetuning epoch; regularize.csv: strength, penalty, loss per logged iteration
    pruned.pt              the pruned, finetuned model (``tpp.load_pruned(path)``)
    pretrained.pt          the model the run started from, when it was trained here (``--pretrain-epochs``)
    checkpoint.pt          while running (``--resume auto`` continues from it); removed at the end unless kept

Defaults come from a recipe (``--recipe``; by default the dataset's: ``cifar`` for mnist/cifar10/cifar100,
``imagenet`` for imagefolder, ``demo`` for the embedded digits); every number can be set by its own flag. Bad input
— an unknown model/method/dataset, a ratio outside [0, 1), a missing data root, a non-empty output folder, weights
or a checkpoint for another architecture — is reported in one line with the allowed values and exit status 2,
before anything is created.

Subcommands live in :data:`COMMANDS` (one :class:`Command` line each: a help line and the functions that add its
flags and run it). Building the parser imports no torch, so ``tpp --help`` is quick.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple, Optional, Sequence

from .arguments import EXIT_USAGE, HelpFormatter, UsageError

__all__ = ["main", "build_parser", "UsageError", "COMMANDS", "Command"]

class Command(NamedTuple):
    """A subcommand: its help line and ``"module:function"`` names of ``add(parser)`` and
    ``run(args, argv, prog) -> exit status`` (imported only when that subcommand is built or run)."""

    help: str
    add: str
    run: str


def _load(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "prune": Command("prune a model: regularize → zero-out → remove → finetune, write a run folder",
                     "tpp.cli:add_prune_arguments", "tpp.cli:cmd_prune"),
    "list": Command("list models, datasets, methods and recipes", "tpp.cli:add_no_arguments", "tpp.cli:cmd_list"),
    "train": Command("a paper setting (or your own) end to end: DDP under torchrun, AMP, resumable checkpoints",
                     "tpp.train.run:add_arguments", "tpp.train.run:cmd_train"),
    "export": Command("write a run's pruned model as TorchScript or ONNX, checked against PyTorch's output",
                      "tpp.export:add_arguments", "tpp.export:cmd_export"),
    "inspect": Command("what tpp can prune in a model: units, sizes, FLOPs shares, refusals; a ratio's speedup",
                       "tpp.cli:add_inspect_arguments", "tpp.cli:cmd_inspect"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpp", description="Trainability Preserving Pruning (Wang & Fu, ICLR 2023)")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    for name, command in COMMANDS.items():
        _load(command.add)(sub.add_parser(name, help=command.help, description=command.help,
                                          formatter_class=HelpFormatter))
    return parser


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    from .arguments import add_run_arguments

    add_run_arguments(p, "prune")


def add_no_arguments(p: argparse.ArgumentParser) -> None:
    """``tpp list`` takes none."""


def cmd_prune(args, argv: Sequence[str], prog: str = "tpp prune") -> int:
    from .command import command_line, run_command

    return run_command(args, "prune", command_line(prog, argv), prog)


def cmd_list(args, argv, prog: str = "tpp list") -> int:
    from .baselines import METHODS
    from .data import list_datasets
    from .models import list_models
    from .recipes import RECIPES

    print("models:   " + ", ".join(list_models()) + ", torchvision:<name>")
    print("datasets: " + ", ".join(list_datasets()))
    print("methods:")
    for m in METHODS.values():
        print(f"  {m.name:<12} {m.description}")
    print("recipes:")
    for r in RECIPES.values():
        print(f"  {r.name:<26} {r.description}")
    return 0


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``tpp inspect``."""
    from .arguments import number, parse_ratio

    p.add_argument("model", help="a registry, torchvision or timm:<name> model (tpp list), built with random weights")
    p.add_argument("--ratio", type=parse_ratio, help="also show what this ratio prunes (as tpp prune --ratio)")
    p.add_argument("--speedup", type=number, help="also find the ratios reaching this FLOPs speedup (> 1)")
    p.add_argument("--speedup-mode", choices=("uniform", "global"), default="uniform",
                   help="one ratio for every unit, or a global ranking of normalized scores")
    p.add_argument("--skip", default="", help="patterns never pruned, comma-separated")
    p.add_argument("--input-shape", help="C,H,W (or F) of one example; default: the model's (tpp.models.input_shape)")
    p.add_argument("--num-classes", type=int, help="outputs of the classifier (default: the model's)")
    p.add_argument("--allow-inexact", action="store_true", help="also prune channels a LayerNorm normalizes with "
                   "kept ones (a ViT's embedding): removal then changes the output; with --ratio it is measured")


def cmd_inspect(args, argv, prog: str = "tpp inspect") -> int:
    import torch

    from .graph import analyze_model
    from .inspect import inspect_model
    from .models import build_model, input_shape
    from .selection import search_speedup

    if args.ratio is not None and args.speedup is not None:
        raise UsageError("--ratio and --speedup exclude each other")
    try:
        shape = tuple(int(x) for x in args.input_shape.split(",")) if args.input_shape else input_shape(args.model)
        model = build_model(args.model, args.num_classes).eval()
    except (KeyError, ValueError, ImportError) as err:
        raise UsageError(f"{args.model}: {err}") from None
    skip = tuple(s for s in args.skip.split(",") if s)
    example = torch.randn(1, *shape)
    try:
        if args.speedup is not None:
            graph = analyze_model(model, allow_inexact=args.allow_inexact)
            print(search_speedup(model, args.speedup, example, mode=args.speedup_mode, skip=skip,
                                 graph=graph).describe() + "\n")
            print(inspect_model(model, example, skip=skip, allow_inexact=args.allow_inexact))
        else:
            print(inspect_model(model, example, args.ratio, skip, allow_inexact=args.allow_inexact))
    except (TypeError, ValueError) as err:
        raise UsageError(f"{args.model}: {err}") from None
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)   # argparse exits 2 on malformed flags
    prog = f"tpp {args.command}"
    try:
        return _load(COMMANDS[args.command].run)(args, argv[1:], prog)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
