"""What makes a run checkpoint resumable by a run: :class:`RunIdentity` — the architecture (name, classes, and the
shape of every tensor), the method and the pruning spec — and the run-checkpoint format version.

Every run checkpoint (``checkpoint.pt`` of ``tpp prune``, ``checkpoints/ckpt-*.pt`` of ``tpp train``) stores its
identity; resuming compares it with the new run's and refuses a mismatch, naming what differs, before anything is
written. Checkpoints of tpp 0.1 (identity spread over top-level ``method``/``ratio``/``skip``/``signature`` keys, and
``hooks.identity`` for ``tpp train``) are read the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

__all__ = ["RunIdentity", "CheckpointMismatch", "RUN_CHECKPOINT_VERSION", "model_signature", "ratio_key",
           "skip_patterns"]

#: format version of run checkpoints (a different thing from tpp.surgery.PRUNED_FORMAT_VERSION, the pruned model's)
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


@dataclass(frozen=True)
class RunIdentity:
    """Who wrote a run checkpoint. ``model``/``num_classes`` may be unknown (``None``: a library call that did not
    name them); unknown fields are not compared. ``signature`` is :func:`model_signature` of the unpruned model."""

    method: str
    ratio: str                                   # ratio_key() of the spec
    skip: tuple[str, ...] = ()
    signature: Mapping[str, list[int]] = field(default_factory=dict, compare=False)
    model: Optional[str] = None
    num_classes: Optional[int] = None

    @classmethod
    def of(cls, model, method: str, ratio: Any, skip=(), *, arch: Optional[str] = None,
           num_classes: Optional[int] = None) -> "RunIdentity":
        """The identity of a run pruning the (unpruned) module ``model``."""
        return cls(method, ratio_key(ratio), skip_patterns(skip), model_signature(model), arch, num_classes)

    def to_state(self) -> dict:
        """The keys a run checkpoint stores (the 0.1 top-level keys, plus ``identity``)."""
        return {"method": self.method, "ratio": self.ratio, "skip": list(self.skip), "signature": dict(self.signature),
                "identity": {"model": self.model, "num_classes": self.num_classes, "method": self.method,
                             "ratio": self.ratio, "skip": list(self.skip)}}

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
                   state.get("signature") or {}, ident.get("model"), ident.get("num_classes"))

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
