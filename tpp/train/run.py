"""`tpp train` / ``python -m tpp.train``: a paper setting (or your own) end to end, on one process or under torchrun.

    tpp train --list                                          # the recipes
    tpp train resnet56-cifar10-0.9 --data-root ~/data --weights resnet56.pt --out runs/r56-0.9
    torchrun --nproc_per_node 8 -m tpp.train resnet50-imagenet-2.31x --data-root /data/imagenet --out runs/r50
    torchrun ... -m tpp.train resnet50-imagenet-2.31x --data-root /data/imagenet --out runs/r50 --resume auto

The flow is :mod:`tpp.command`'s (the same as ``tpp prune``'s): measure the given model → regularize (growing
schedule) → stabilize with the layer-wise zero-out → remove (the same filters on every rank, checked) → rebuild DDP
and the optimizer → finetune (epochs) → evaluate top-1/top-5 over all ranks, with :class:`tpp.train.engine.Engine`.

The run folder (``--out``):

    args.yaml, args.json   every resolved setting, the command, the world size, versions
    checkpoints/           ckpt-<n>-<stage>-<position>.pt (the newest --keep-last), best.pt
    summary.csv            one row per finetuning epoch: lr, train loss, val top-1/top-5/loss, time, images/s
    regularize.csv         strength, penalty, loss over the regularization iterations
    metrics.json           all measurements (latency included), the pruned filter sets, the paper's numbers beside ours
    pruned.pt              the pruned, finetuned model (tpp.load_pruned(path))
    ranks/rank<r>.json     each rank's digest of its pruned sets and final weights (all equal, or the run failed)
    tb/                    TensorBoard scalars with --tensorboard

Exit status: 0 done (also when stopped by ``--stop-after-iters``: torchrun treats any other status as a crash),
2 bad input (nothing written).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "add_arguments", "cmd_train"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `tpp train` flags (:func:`tpp.arguments.add_run_arguments`)."""
    from ..arguments import add_run_arguments

    add_run_arguments(p, "train")


def build_parser(prog: str = "tpp train") -> argparse.ArgumentParser:
    from ..arguments import HelpFormatter

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_arguments(p)
    return p


def cmd_train(args, argv: Sequence[str], prog: str = "tpp train") -> int:
    """Run parsed `tpp train` arguments (``argv``: the flags as typed, for the settings and the resume hint)."""
    from ..command import command_line, run_command

    return run_command(args, "train", command_line(prog, argv), prog)


def main(argv: Optional[Sequence[str]] = None, prog: str = "tpp train") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cmd_train(build_parser(prog).parse_args(argv), argv, prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
