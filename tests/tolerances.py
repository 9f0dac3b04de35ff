"""Parity tolerances by dtype, stated once for every test that compares a result against a float64 reference.

``(rtol, atol)`` where ``atol`` is relative to the largest magnitude of the reference, so that entries near zero
(which cancellation leaves with only absolute accuracy) are judged on the scale of the whole tensor.
fp32: a few ulps of fp32 accumulation over D terms; fp16/bf16: one rounding of the result (2^-11 / 2^-8) on top.
"""
import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}


# The fused kernels (tests/test_kernels.py): (loss, gradients), each an absolute tolerance relative to the largest
# magnitude of the float64 reference. Products of fp16/bf16 operands are exact in fp32 and accumulate in fp32, so the
# loss keeps fp32 accuracy in every dtype; gradients are rounded into the weight dtype: half an ulp is 2^-11 (fp16),
# 2^-8 (bf16; the interpreter truncates fp32 -> bf16 instead of rounding: up to 2^-7). Comparisons use "ieee" dots,
# except the tf32 test (operands rounded to 10 bits).
KERNEL_TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 1e-3), torch.bfloat16: (1e-5, 8e-3)}
KERNEL_TF32_TOLERANCE = (5e-3, 5e-3)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """``actual`` (computed for ``dtype`` inputs) against a float64 ``expected``, within ``TOLERANCES[dtype]``."""
    rtol, atol_rel = TOLERANCES[dtype]
    actual, expected = actual.detach(), expected.detach().double()
    atol = atol_rel * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")
