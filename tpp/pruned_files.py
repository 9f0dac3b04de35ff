"""Pruned models as files, without pickled code: ``save_pruned``, ``load_pruned``, ``build_unpruned``.

``save_pruned``/``load_pruned`` store ``{"format": "tpp-pruned", "version": 1, "arch", "model_args", "pruned",
"state_dict", "extra", "tpp_checksum"}`` with ``torch.save``, atomically (the checksum, SHA-256 of the rest, is
checked on load; tpp 0.1 files have none) (``model_args``, the unpruned model's constructor arguments, is optional:
tpp 0.1 files lack it and keep ``num_classes``/``model_kwargs`` in ``extra``); loading reads the file with
``torch.load(weights_only=True)``, builds the unpruned architecture — the one given, or the registry/torchvision/timm
model the file names — and shrinks it with :func:`tpp.surgery.prune_model`. The pruned-model format version is
:data:`PRUNED_FORMAT_VERSION` (run checkpoints have their own, :data:`tpp.identity.RUN_PRUNED_FORMAT_VERSION`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Union

from torch import Tensor, nn

from .attention import head_parameters
from .files import load_verified, save_verified
from .surgery import as_indices, prune_model

__all__ = ["save_pruned", "load_pruned", "build_unpruned", "PRUNED_FORMAT", "PRUNED_FORMAT_VERSION"]

PRUNED_FORMAT = "tpp-pruned"
PRUNED_FORMAT_VERSION = 1           # of pruned-model files; optional keys were added within version 1

PathLike = Union[str, os.PathLike]


def save_pruned(model: nn.Module, pruned: Mapping[str, Tensor | Sequence[int]], path: PathLike, *,
                arch: str | None = None, model_args: Mapping | None = None, extra=None) -> None:
    """Write the pruned ``model`` (the result of ``prune_model(unpruned, pruned)``) to ``path``, atomically.

    The file holds ``{"format": "tpp-pruned", "version": 1, "arch": arch, "model_args": model_args,
    "pruned": {name: [ints]}, "state_dict": model.state_dict(), "extra": extra}``: tensors and plain data only, so
    ``torch.load(weights_only=True)`` reads it, plus the SHA-256 checksum of all that
    (``tpp.files.DIGEST_KEY``), which :func:`load_pruned` checks. ``arch`` (a :func:`tpp.models.build_model` name, or
    ``"timm:<name>"``) with ``model_args`` (its keyword arguments, e.g. ``{"num_classes": 10}``) lets
    ``load_pruned(path)`` rebuild the model alone. ``extra`` and ``model_args`` may contain None, bool, int, float,
    str, tensors, and lists/tuples/dicts (string keys) of those; anything else raises ``TypeError`` before writing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_pruned expects an nn.Module, got {type(model).__name__}")
    if not isinstance(pruned, Mapping) or not all(isinstance(k, str) for k in pruned):
        raise TypeError("pruned must map layer names (str) to filter indices")
    if arch is not None and not isinstance(arch, str):
        raise TypeError(f"arch must be a string or None, got {type(arch).__name__}")
    _check_plain(extra, "extra")
    _check_plain(dict(model_args) if model_args is not None else None, "model_args")
    modules = dict(model.named_modules())
    for name in pruned:
        if not isinstance(modules.get(name), (nn.Conv2d, nn.Linear)) and head_parameters(modules.get(name)) is None:
            raise ValueError(f"pruned layer {name!r}: no Conv2d/Linear/MultiheadAttention of that name in "
                             f"{type(model).__name__}")
    spec = {name: as_indices(idx, None, f"pruned indices of layer {name!r}").tolist() for name, idx in pruned.items()}
    checkpoint = {"format": PRUNED_FORMAT, "version": PRUNED_FORMAT_VERSION, "arch": arch,
                  "model_args": dict(model_args) if model_args is not None else None, "pruned": spec,
                  "state_dict": model.state_dict(), "extra": extra}
    save_verified(checkpoint, path)


def _check_plain(value, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str, Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    else:
        raise TypeError(f"{where} is a {type(value).__name__}; a tpp-pruned checkpoint holds only None, bool, int, "
                        "float, str, tensors and lists/tuples/dicts of those (it is read with weights_only=True)")


def load_pruned(model: nn.Module | PathLike | Mapping, path_or_obj: PathLike | Mapping | None = None, *,
                arch: str | None = None) -> nn.Module:
    """The pruned model saved by :func:`save_pruned`: ``load_pruned(path)`` or ``load_pruned(unpruned, path)``.

    With one argument the unpruned architecture is built from the file (:func:`build_unpruned`: its ``arch`` and
    constructor arguments — tpp 0.1 files included); with two, ``model`` is an instance of the UNPRUNED
    architecture (not modified). A path is read with ``torch.load(weights_only=True)`` and checked against the
    checksum :func:`save_pruned` stored in it (files of tpp 0.1 have none); a loaded dict is accepted as it is
    (:func:`tpp.files.verify` checks one). The structure is ``prune_model(model, checkpoint["pruned"],
    allow_inexact=True)`` (the file says what was removed), then the weights are loaded strictly. Raises
    ``FileNotFoundError`` for a missing file, ``ValueError`` for a file that is not a tpp-pruned checkpoint or is
    corrupted (truncated, or its content not matching its checksum), an ``arch`` differing from the saved one (when
    both are given), a file naming no buildable architecture (one argument), or a checkpoint that does not fit
    ``model`` (naming the first mismatching layer, key or shape).
    """
    if path_or_obj is None and not isinstance(model, nn.Module):
        model, path_or_obj = None, model
    elif not isinstance(model, nn.Module):
        raise TypeError(f"load_pruned expects an nn.Module, got {type(model).__name__}")
    checkpoint, source = _read(path_or_obj)
    _check_checkpoint(checkpoint, source, arch)
    if model is None:
        model = build_unpruned(checkpoint, source)
    try:
        pruned_model = prune_model(model, checkpoint["pruned"], allow_inexact=True)  # the file says what was removed
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source} does not fit this {type(model).__name__}: {err}") from err
    expected, saved = pruned_model.state_dict(), checkpoint["state_dict"]
    for key, value in expected.items():
        if key not in saved:
            raise ValueError(f"{source} does not fit this {type(model).__name__}: state_dict key {key!r} is missing")
        if not isinstance(saved[key], Tensor) or saved[key].shape != value.shape:
            found = tuple(saved[key].shape) if isinstance(saved[key], Tensor) else type(saved[key]).__name__
            raise ValueError(f"{source} does not fit this {type(model).__name__}: {key!r} has shape {found} in the "
                             f"checkpoint, {tuple(value.shape)} in the pruned model")
    unexpected = [key for key in saved if key not in expected]
    if unexpected:
        raise ValueError(f"{source} does not fit this {type(model).__name__}: unexpected state_dict key "
                         f"{unexpected[0]!r}")
    pruned_model.load_state_dict(saved, strict=True)
    return pruned_model


def _read(path_or_obj) -> tuple[Mapping, str]:
    if isinstance(path_or_obj, Mapping):
        return path_or_obj, "checkpoint"
    if not isinstance(path_or_obj, (str, os.PathLike)):
        raise TypeError(f"path_or_obj must be a path or a loaded checkpoint dict, got {type(path_or_obj).__name__}")
    return load_verified(path_or_obj), str(path_or_obj)


def build_unpruned(checkpoint: Mapping, source: str = "checkpoint") -> nn.Module:
    """The unpruned architecture a tpp-pruned checkpoint names: ``arch`` built with ``model_args`` (tpp 0.1 files:
    ``extra["num_classes"]`` and ``extra["model_kwargs"]``) by :func:`tpp.models.build_model` (registry and
    torchvision names) or, for ``"timm:<name>"``, ``timm.create_model``."""
    arch = checkpoint.get("arch")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{source} names no architecture; pass the unpruned model: load_pruned(model, path)")
    args = checkpoint.get("model_args")
    if args is None:                                       # tpp 0.1: what tpp prune / tpp train put in extra
        extra = checkpoint.get("extra") if isinstance(checkpoint.get("extra"), Mapping) else {}
        args = dict(extra.get("model_kwargs") or {})
        if extra.get("num_classes") is not None:
            args["num_classes"] = extra["num_classes"]
    args = dict(args)
    try:
        if arch.startswith("timm:"):
            try:
                import timm
            except ImportError:
                raise ValueError(f"{source} holds a timm model ({arch}): pip install timm to rebuild it") from None
            return timm.create_model(arch.removeprefix("timm:"), pretrained=False, **args)
        from .models import build_model

        return build_model(arch, **args)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{source}: cannot build its architecture {arch!r} with {args}: {err}; pass the unpruned "
                         "model: load_pruned(model, path)") from err


def _check_checkpoint(checkpoint, source: str, arch: str | None) -> None:
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != PRUNED_FORMAT:
        found = f"format {checkpoint.get('format')!r}" if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"{source} is not a tpp-pruned checkpoint ({found}, expected format {PRUNED_FORMAT!r}); "
                         "save one with tpp.save_pruned")
    if checkpoint.get("version") != PRUNED_FORMAT_VERSION:
        raise ValueError(f"{source}: unsupported tpp-pruned checkpoint version {checkpoint.get('version')!r} "
                         f"(this tpp reads version {PRUNED_FORMAT_VERSION})")
    for key, kind in (("pruned", Mapping), ("state_dict", Mapping)):
        if not isinstance(checkpoint.get(key), kind):
            raise ValueError(f"{source}: malformed tpp-pruned checkpoint, {key!r} is not a dict")
    saved = checkpoint.get("arch")
    if arch is not None and saved is not None and arch != saved:
        raise ValueError(f"{source} holds a pruned {saved!r}, not a {arch!r}")
