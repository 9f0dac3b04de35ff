"""The pure-PyTorch TPP penalties, re-exported from :mod:`tpp_kernels.reference` (where they live beside the
kernels they check): ``from tpp import reference`` keeps working."""
from tpp_kernels.reference import *  # noqa: F401,F403
from tpp_kernels.reference import __all__  # noqa: F401
