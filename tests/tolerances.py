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


# The penalty ops of every backend (tests/test_backend_contract.py): (loss, gradients), each an absolute tolerance
# relative to the largest magnitude of the float64 reference. Products of fp16/bf16 operands are exact in fp32 and
# accumulate in fp32, so the loss keeps fp32 accuracy in every dtype; gradients are rounded into the weight dtype: half
# an ulp is 2^-11 (fp16), 2^-8 (bf16; the interpreter truncates fp32 -> bf16 instead of rounding: up to 2^-7).
# With "ieee" fp32 dots; "tf32" dots (fp32 weights on a GPU unless torch.get_float32_matmul_precision() is
# "highest") round the operands to 10 bits: KERNEL_TF32_TOLERANCE.
KERNEL_TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 1e-3), torch.bfloat16: (1e-5, 8e-3)}
KERNEL_TF32_TOLERANCE = (5e-3, 5e-3)

# Two evaluations of the same arithmetic (grouped launch vs one launch per layer, in-place path vs autograd): bitwise
# equal on the CPU (interpreter, ATen); on a GPU the compiler contracts multiply-adds into fmas differently in
# different kernels, so a few fp32 ulps apart: (rtol, atol relative to the largest magnitude).
SAME_ARITHMETIC_TOLERANCE = {"cpu": (0.0, 0.0), "cuda": (1e-6, 1e-6)}


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """``actual`` (computed for ``dtype`` inputs) against a float64 ``expected``, within ``TOLERANCES[dtype]``."""
    rtol, atol_rel = TOLERANCES[dtype]
    actual, expected = actual.detach(), expected.detach().double()
    atol = atol_rel * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def parity_precision(device) -> str:
    """The dot precision of fp32 weights on ``device`` under the precision policy of every backend: "tf32" on a GPU
    unless ``torch.get_float32_matmul_precision()`` is "highest", else "ieee"."""
    on_gpu = torch.device(device).type == "cuda"
    return "tf32" if on_gpu and torch.get_float32_matmul_precision() != "highest" else "ieee"


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str,
                  precision: str = "ieee", msg: str = "") -> None:
    """A penalty op's ``kind`` ("loss" or "grad") result for ``dtype`` weights against a float64 ``expected``: within
    ``KERNEL_TOLERANCES`` (or the tf32 one for fp32 weights with tf32 dots) and ``TOLERANCES[dtype]`` both."""
    if precision == "tf32" and dtype == torch.float32:
        tol = KERNEL_TF32_TOLERANCE[kind == "grad"]
    else:
        tol = KERNEL_TOLERANCES[dtype][kind == "grad"]
        # the loss accumulates in fp32 whatever the weight dtype
        assert_close_to_reference(actual, expected, torch.float32 if kind == "loss" else dtype, msg)
    actual, expected = actual.detach().double(), expected.detach().double()
    atol = tol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{msg}\n{m}")


def assert_same_arithmetic(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Two evaluations of the same arithmetic on ``expected``'s device, within ``SAME_ARITHMETIC_TOLERANCE``."""
    rtol, atol_rel = SAME_ARITHMETIC_TOLERANCE[expected.device.type]
    atol = atol_rel * float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def assert_backends_agree(regs, nets) -> None:
    """Two regularizers (the torch backend's first) of two copies of a float32 model: the same penalty and the same
    gradients from ``apply_gradients()``, every parameter, within the fp32 tolerance."""
    assert_close_to_reference(regs[1].penalty(), regs[0].penalty(), torch.float32)
    for reg in regs:
        reg.apply_gradients()
    for (n, p), q in zip(nets[1].named_parameters(), nets[0].parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if q.grad is not None:
            assert_close_to_reference(p.grad, q.grad, torch.float32, msg=n)


def assert_apply_gradients_is_autograd(reg, model) -> dict:
    """``reg.apply_gradients()`` adds exactly ``∂reg.penalty()/∂θ`` (float64 model) to every parameter that has one;
    returns those gradients by parameter name."""
    reg.penalty().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    reg.apply_gradients()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected) and got
    for n, g in expected.items():
        assert_close_to_reference(got[n], g, torch.float64, n)
    return got
