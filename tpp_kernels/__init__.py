"""Fused Triton kernels for the TPP penalties (see gram.py and bn.py for the math and the design).

Public functions (all layers of a model in one launch per stage):

* ``gram_penalty(weight, pruned_idx, ...)`` / ``gram_penalty_multi(weights, pruned_idxs, ...)`` — differentiable;
* ``add_gram_penalty_grad_(weights, grads, pruned_idxs, scale, ...)`` — the same gradient added into ``grads``;
* ``bn_penalty(gammas, betas, pruned_idxs)`` / ``add_bn_penalty_grad_(...)`` — the BatchNorm term.

They are backed by ``torch.ops.tpp.*`` custom ops (torch.compile-able); on CPU without ``TRITON_INTERPRET=1`` the
ops run ``tpp.reference``. Set ``TRITON_INTERPRET=1`` before importing to run the kernels on CPU tensors.
"""
from .bn import add_bn_penalty_grad_, bn_penalty
from .gram import add_gram_penalty_grad_, gram_penalty, gram_penalty_multi

__all__ = ["gram_penalty", "gram_penalty_multi", "add_gram_penalty_grad_", "bn_penalty", "add_bn_penalty_grad_"]
