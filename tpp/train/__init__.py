"""`tpp train`: the paper's settings end to end — one process or torchrun (DDP), AMP, channels_last, resumable
phases, every paper recipe by name.

* :mod:`tpp.train.run` — the command (``tpp train``, ``python -m tpp.train``) on :mod:`tpp.command`'s core;
* :mod:`tpp.train.engine` — :class:`Engine`, the DDP/AMP/channels_last hooks of :func:`tpp.pipeline.run_pruning`;
* :mod:`tpp.train.distributed` — torchrun environment, process group, rank agreement, rank-named logs;
* :mod:`tpp.train.checkpoint` — atomic checkpoint files, keep-last-k and best, RNG states;
* :mod:`tpp.train.data` — resumable distributed sampler, per-sample seeded augmentation, ImageFolder at any size;
* :mod:`tpp.train.prefetch` — uint8 images normalized on the device, batches copied on a side CUDA stream;
* :mod:`tpp.train.decode` — ``--decode gpu``: JPEGs decoded, cropped and flipped on the GPU;
* :mod:`tpp.train.logs` — args.yaml, summary.csv, TensorBoard.

The recipes are :mod:`tpp.recipes` (ResNet56/CIFAR-10, VGG19/CIFAR-100, ResNet34/50 ImageNet, and the generic ones);
``TrainRecipe`` is :class:`tpp.recipes.Recipe`.

Submodules are imported on first use (``tpp --help`` stays quick).
"""
import importlib

__all__ = ["main", "RECIPES", "TrainRecipe", "get_recipe", "list_recipes", "CheckpointManager", "CheckpointMismatch",
           "atomic_save", "Engine"]

_LAZY = {"RECIPES": "..recipes", "TrainRecipe": "..recipes", "get_recipe": "..recipes",
         "list_recipes": "..recipes", "CheckpointManager": ".checkpoint", "CheckpointMismatch": ".checkpoint",
         "atomic_save": ".checkpoint", "Engine": ".engine"}


def main(argv=None) -> int:
    """`tpp train` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from .run import main as _main

    return _main(argv)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), "Recipe" if name == "TrainRecipe" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
