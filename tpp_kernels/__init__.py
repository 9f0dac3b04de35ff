"""Fused Triton kernels for the TPP penalties: every layer of a model in one launch per stage.

Public functions:

* ``gram_penalty(weight, pruned_idx, ...)`` / ``gram_penalty_multi(weights, pruned_idxs, ...)`` — differentiable;
* ``add_gram_penalty_grad_(weights, grads, pruned_idxs, scale, ...)`` — the same gradient added into ``grads``;
* ``bn_penalty(gammas, betas, pruned_idxs)`` / ``add_bn_penalty_grad_(...)`` — the BatchNorm term.

They are backed by ``torch.ops.tpp.*`` custom ops (torch.compile-able). On CPU tensors the ops run
``tpp.reference``, or, with ``TRITON_INTERPRET=1`` set before import, the Triton kernels in the interpreter.

Modules: ``gram.py`` and ``bn.py`` (kernels → launchers → ops → public functions, math and design in their
docstrings), ``tables.py`` (host-built launch tables and their caches), ``config.py`` (block sizes, precision,
lazy autotuning), ``checks.py`` (argument validation).
"""
from .bn import add_bn_penalty_grad_, bn_penalty
from .gram import add_gram_penalty_grad_, gram_penalty, gram_penalty_multi

__all__ = ["gram_penalty", "gram_penalty_multi", "add_gram_penalty_grad_", "bn_penalty", "add_bn_penalty_grad_"]
