"""Deprecated alias of :mod:`tpp_kernels.cuda` (the bindings of csrc/); import that instead."""
import warnings

from tpp_kernels.cuda import *  # noqa: F401,F403
from tpp_kernels.cuda import __all__  # noqa: F401

warnings.warn("tpp.cuda_ops moved to tpp_kernels.cuda", DeprecationWarning, stacklevel=2)
