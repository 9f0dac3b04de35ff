"""The TPP penalty ops, self-contained (imports torch, never ``tpp``): one contract, three backends.

Public functions (the Triton backend; :mod:`tpp_kernels.cuda` has the same ones for the csrc/ extension):

* ``gram_penalty(weight, pruned_idx, ...)`` / ``gram_penalty_multi(weights, pruned_idxs, ...)`` — differentiable;
* ``add_gram_penalty_grad_(weights, grads, pruned_idxs, scale, ...)`` — the same gradient added into ``grads``;
* ``bn_penalty(gammas, betas, pruned_idxs)`` / ``add_bn_penalty_grad_(...)`` — the BatchNorm term.

They are backed by ``torch.ops.tpp.*`` custom ops (torch.compile-able). On CPU tensors the ops run
:mod:`tpp_kernels.reference`, or, with ``TRITON_INTERPRET=1`` set before import, the Triton kernels in the
interpreter. They are imported on first use (PEP 562), so ``tpp_kernels.reference`` and ``tpp_kernels.cuda`` work
without Triton installed.

Modules: ``reference.py`` (pure-PyTorch forms, the ground truth), ``gram.py`` and ``bn.py`` (Triton kernels →
launchers → ops → public functions, math and design in their docstrings), ``tables.py`` (host-built launch tables and
their caches), ``config.py`` (block sizes, precision, lazy autotuning), ``checks.py`` (argument validation shared by
every backend), ``cuda.py`` and ``cuda_build.py`` (the bindings of csrc/ and its build).
"""
import importlib

_TRITON_FUNCTIONS = {"gram_penalty": "gram", "gram_penalty_multi": "gram", "add_gram_penalty_grad_": "gram",
                     "bn_penalty": "bn", "add_bn_penalty_grad_": "bn"}

__all__ = list(_TRITON_FUNCTIONS)


def __getattr__(name: str):
    if name in _TRITON_FUNCTIONS:
        return getattr(importlib.import_module(f".{_TRITON_FUNCTIONS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
