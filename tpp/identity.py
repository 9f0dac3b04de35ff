"""What makes a run checkpoint resumable by a run: :class:`RunIdentity` — the architecture (name, classes, and the
shape of every tensor), the method, the pruning spec and every setting that changes the result — and the
run-checkpoint format version.

Every run checkpoint (``checkpoint.pt`` of ``tpp prune``, ``checkpoints/ckpt-*.pt`` of ``tpp train``) stores its
identity; resuming compares it with the new run's and refuses a mismatch, naming what differs, before anything is
written. The settings (:func:`run_settings`) are named as the command's flags: the seed (data split, order,
initialization), the optimization (lr's, momentum, weight decay, schedule, finetuning), the measurements (JSV
samples) and the caller's own (``RunConfig.caller_settings``: global batch, dataset, image size, AMP, label
smoothing). What only changes how a run is executed or logged — device, backend, workers, threads, number of
processes, checkpoint cadence, logging — is not part of it. Checkpoints of tpp 0.1 (identity spread over top-level
``method``/``ratio``/``skip``/``signature`` keys, and ``hooks.identity`` for ``tpp train``) are read the same way; a
setting a checkpoint does not record is not compared.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

__all__ = ["RunIdentity", "CheckpointMismatch", "RUN_CHECKPOINT_VERSION", "model_signature", "ratio_key",
           "skip_patterns", "run_settings", "CONFIG_SETTINGS"]

#: format version of run checkpoints (a different thing from tpp.pruned_files.PRUNED_FORMAT_VERSION, the pruned model's)
RUN_CHECKPOINT_VERSION = 1


class CheckpointMismatch(ValueError):
    """A checkpoint written by a run with another model or pruning specification."""


def model_signature(model) -> dict[str, list[int]]:
    """``{parameter/buffer name: shape}``: what a checkpoint for another architecture fails to match."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def ratio_key(ratio: Any) -> str:
    """The canonical text of a ratio spec (what checkpoints store and compare)."""
    return json.dumps(ratio, sort_keys=True) if isinstance(ratio, Mapping) else repr(ratio)


def skip_patterns(skip: Union[str, Iterable[str], None]) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b"]`` → ``("a", "b")`` (empty entries dropped)."""
    if skip is None:
        return ()
    items = skip.split(",") if isinstance(skip, str) else list(skip)
    return tuple(s.strip() for s in items if isinstance(s, str) and s.strip())


#: RunConfig fields that change a run's result (its schedule's fields besides, see :func:`run_settings`)
CONFIG_SETTINGS = ("seed", "reg_iters", "reg_lr", "momentum", "weight_decay", "orth_weight", "finetune_epochs",
                   "finetune_lr", "lr_schedule", "lr_milestones", "lr_gamma", "jsv_samples", "bn_map", "allow_inexact")


def _plain(value: Any) -> Any:
    """``value`` as what a checkpoint stores and compares: mappings → dicts, tuples → lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_settings(config) -> dict[str, Any]:
    """The settings of ``config`` (a :class:`tpp.pipeline.RunConfig`) that change the result, by flag name (``_``
    for ``-``): :data:`CONFIG_SETTINGS`, the schedule's fields (``delta``, ``interval``, ...), and
    ``config.caller_settings``."""
    values = {name: _plain(getattr(config, name)) for name in CONFIG_SETTINGS}
    values.update(_plain(config.schedule.state_dict()))
    values.update(_plain(getattr(config, "caller_settings", None) or {}))
    return values


@dataclass(frozen=True)
class RunIdentity:
    """Who wrote a run checkpoint. ``model``/``num_classes`` may be unknown (``None``: a library call that did not
    name them); unknown fields are not compared. ``signature`` is :func:`model_signature` of the unpruned model;
    ``settings`` is :func:`run_settings` (only the settings both identities record are compared)."""

    method: str
    ratio: str                                   # ratio_key() of the spec
    skip: tuple[str, ...] = ()
    signature: Mapping[str, list[int]] = field(default_factory=dict, compare=False)
    model: Optional[str] = None
    num_classes: Optional[int] = None
    settings: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, model, method: str, ratio: Any, skip=(), *, arch: Optional[str] = None,
           num_classes: Optional[int] = None, settings: Optional[Mapping[str, Any]] = None) -> "RunIdentity":
        """The identity of a run pruning the (unpruned) module ``model``."""
        return cls(method, ratio_key(ratio), skip_patterns(skip), model_signature(model), arch, num_classes,
                   _plain(settings or {}))

    @classmethod
    def of_config(cls, model, config) -> "RunIdentity":
        """The identity of a :func:`tpp.pipeline.run_pruning` run of ``config`` (a ``RunConfig``) on ``model``."""
        return cls.of(model, config.method, config.ratio, config.skip, arch=config.arch,
                      num_classes=config.num_classes, settings=run_settings(config))

    def to_state(self) -> dict:
        """The keys a run checkpoint stores (the 0.1 top-level keys, plus ``identity``)."""
        return {"method": self.method, "ratio": self.ratio, "skip": list(self.skip), "signature": dict(self.signature),
                "identity": {"model": self.model, "num_classes": self.num_classes, "method": self.method,
                             "ratio": self.ratio, "skip": list(self.skip), "settings": dict(self.settings)}}

    @classmethod
    def from_state(cls, state: Mapping) -> Optional["RunIdentity"]:
        """The identity stored in a run checkpoint (any version), ``None`` if it holds none."""
        if not isinstance(state, Mapping):
            return None
        ident = state.get("identity") or (state.get("hooks") or {}).get("identity") or {}
        method = ident.get("method", state.get("method"))
        if method is None or "signature" not in state and not ident:
            return None
        return cls(method, ident.get("ratio", state.get("ratio")), skip_patterns(ident.get("skip", state.get("skip"))),
                   state.get("signature") or {}, ident.get("model"), ident.get("num_classes"),
                   ident.get("settings") or {})

    def check(self, state: Mapping, source: str) -> None:
        """Raise :class:`CheckpointMismatch` unless the run checkpoint ``state`` (loaded from ``source``) was written
        by a run of this identity (same architecture, method and pruning spec) in a format this tpp reads."""
        if not isinstance(state, Mapping) or state.get("version") != RUN_CHECKPOINT_VERSION:
            found = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise CheckpointMismatch(f"{source} is not a tpp run checkpoint (version {found!r}, expected "
                                     f"{RUN_CHECKPOINT_VERSION}; a run folder's checkpoint.pt or "
                                     "checkpoints/ckpt-*.pt)")
        saved = RunIdentity.from_state(state)
        if saved is None:
            raise CheckpointMismatch(f"{source} is not a tpp run checkpoint (no run identity in it)")
        arch = [f"{k}: checkpoint {getattr(saved, k)!r}, this run {getattr(self, k)!r}"
                for k in ("model", "num_classes") if None not in (getattr(saved, k), getattr(self, k))
                and getattr(saved, k) != getattr(self, k)]
        arch += _signature_diff(saved.signature, self.signature)
        if arch:
            raise CheckpointMismatch(f"{source} was written for another architecture — {'; '.join(arch)}. Resume "
                                     "it with the same settings, or start a new run in another --out folder")
        spec = [f"{k}: checkpoint {getattr(saved, k)!r}, this run {getattr(self, k)!r}"
                for k in ("method", "ratio", "skip") if getattr(saved, k) != getattr(self, k)]
        if spec:
            raise CheckpointMismatch(f"{source} was written by a run with another pruning spec — {'; '.join(spec)}. "
                                     "Resume it with the same settings, or start a new run in another --out folder")
        changed = [f"--{k.replace('_', '-')}: checkpoint {saved.settings[k]!r}, this run {self.settings[k]!r}"
                   for k in self.settings if k in saved.settings and saved.settings[k] != self.settings[k]]
        if changed:
            raise CheckpointMismatch(f"{source} was written by a run with other settings, which change the result — "
                                     f"{'; '.join(changed)}. Resume it with the same values, or start a new run in "
                                     "another --out folder")


def _signature_diff(saved: Mapping, mine: Mapping) -> list[str]:
    if not saved or not mine:
        return []
    if set(saved) != set(mine):
        missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
        return [f"tensors missing from it: {missing[:5]}, tensors the model does not have: {extra[:5]}"]
    for k, shape in mine.items():
        if list(saved[k]) != list(shape):
            return [f"{k!r} has shape {list(saved[k])} there and {list(shape)} in the model"]
    return []
