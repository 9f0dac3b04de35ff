"""Guarded training: a non-finite loss, gradient or weight stops a run at the next point that reads the host anyway,
naming the first bad iteration exactly, before anything computed from it is written.

The per-step check runs on the device: :meth:`FiniteGuard.watch` folds ``isfinite`` of the loss and of the
gradients' largest magnitude (one fused ``_foreach_norm(inf)`` over every gradient) into a two-element tensor
``[first bad iteration, what]`` with ``torch.where`` — no host sync per step. :meth:`FiniteGuard.check` reads it
(and, given a model, checks its weights and buffers) at points that synchronize already: log records, checkpoints,
epoch and phase ends. Under fp16 with a GradScaler, non-finite gradients are normal (the scaler skips that step and
lowers its scale): the hooks say so (``TrainHooks.skips_nonfinite_steps``) and only the loss is watched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:       # torch is imported where a guard is used: the command line imports this module without it
    import torch
    from torch import Tensor, nn

__all__ = ["FiniteGuard", "NonFiniteError", "EXIT_NON_FINITE"]

#: exit status of ``tpp prune``/``tpp train`` stopped by a non-finite loss, gradient or weight
EXIT_NON_FINITE = 3

_WHAT = {1: "the training loss", 2: "a gradient", 3: "the weights"}


class NonFiniteError(RuntimeError):
    """The run met a non-finite loss, gradient or weight; ``iteration`` is the first (1-based) of its phase."""

    def __init__(self, message: str, phase: str, iteration: int):
        super().__init__(message)
        self.phase, self.iteration = phase, iteration


class FiniteGuard:
    """Tracks, on ``device``, the first iteration whose loss or gradients were not finite.

    ``last_good`` describes the last checkpoint written (set by the run; part of the error message).
    """

    def __init__(self, device: "torch.device"):
        import torch

        self.state = torch.full((2,), -1, dtype=torch.int64, device=device)     # [iteration, what]; -1: none yet
        self.last_good = "none was written"

    def watch(self, iteration: int, loss: Tensor, grads: Optional[Iterable[Tensor]] = None) -> None:
        """Record ``iteration`` as the first bad one if ``loss`` or any of ``grads`` is NaN/inf (device ops only)."""
        import torch

        with torch.no_grad():
            what = torch.where(torch.isfinite(loss.detach()).all(), 0, 1)
            grads = [g for g in grads if g is not None] if grads is not None else []
            if grads:
                what = torch.where((what == 0) & ~torch.isfinite(_largest(grads)), 2, what)
            first = (self.state[0] < 0) & (what > 0)
            self.state[0] = torch.where(first, iteration, self.state[0])
            self.state[1] = torch.where(first, what, self.state[1])

    def check(self, phase: str, hooks=None, model: Optional[nn.Module] = None, iteration: Optional[int] = None,
              describe: Callable[[int], str] = lambda i: f"iteration {i}") -> None:
        """Raise :class:`NonFiniteError` when a watched step was not finite (on any rank: ``hooks.sum`` makes every
        process agree), or when ``model``'s parameters or floating buffers are not finite now (after ``iteration``).
        One host sync; every rank must call it at the same point."""
        import torch

        state = self.state
        if model is not None:
            tensors = [t.detach() for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
            if tensors:
                bad_now = (state[0] < 0) & ~torch.isfinite(_largest(tensors))
                state = torch.stack([torch.where(bad_now, -2, state[0]), torch.where(bad_now, 3, state[1])])
        flags = torch.stack([(state[0] != -1).double(), state[0].double(), state[1].double()])
        if hooks is not None:
            total = hooks.sum(flags[:1].clone())
            flags = torch.cat([total, flags[1:]])
        bad_ranks, first, what = flags.tolist()
        if not bad_ranks:
            return
        first, what = int(first), int(what)
        if first == -1:
            where, first = "on another process", iteration or 0
        elif first == -2:
            where, first = f"after {describe(iteration)}" if iteration else "now", iteration or 0
        else:
            where = f"at {describe(first)}"
        raise self.error(_WHAT.get(what, "a value"), where, phase, first)

    def error(self, what: str, where: str, phase: str, iteration: int) -> NonFiniteError:
        """The one-line error: what became non-finite, where, and the last good checkpoint."""
        return NonFiniteError(f"{what} became non-finite (NaN or inf) {where} ({phase} phase); the run stopped and "
                              f"wrote no model from it. Last good checkpoint: {self.last_good}. Lower the learning "
                              "rate or momentum and start again", phase, iteration)


def _largest(tensors: list[Tensor]) -> Tensor:
    """The largest magnitude over ``tensors`` (one fused ``_foreach_norm(inf)``), a float32 scalar on their device:
    NaN or inf when any element is."""
    import torch

    return torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))]).max()
