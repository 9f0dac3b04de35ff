"""Triton-specific tests of tpp_kernels: dot precision, the grouped launch, launch tables, autotuning, op
registration. The backend contract (values and gradients against float64, every backend) is test_backend_contract.py.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
); with one, the same tests run the compiled kernels on CUDA tensors.
"""
import pytest
import torch
from test_backend_contract import random_bn, random_layer, random_layers, reference_gram
from tolerances import KERNEL_TF32_TOLERANCE as TF32_TOL
from tolerances import KERNEL_TOLERANCES as TOL
from tolerances import assert_same_arithmetic

pytest.importorskip("triton")

import tpp_kernels  # noqa: E402
from tpp_kernels import config, gram, kernels, plan  # noqa: E402

# the interpreter runs on CPU tensors, also on a GPU host where TRITON_INTERPRET=1 was set
DEVICE = "cuda" if torch.cuda.is_available() and not config.INTERPRET else "cpu"
# On CPU without the interpreter, the ops run tpp_kernels.reference: the kernel-specific tests are skipped.
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not config.INTERPRET, reason="CPU ops run the reference")


def assert_close(actual, expected, tol, what=""):
    """|actual − expected| ≤ tol · max|expected| elementwise (exact match when the reference is all zeros)."""
    atol = tol * expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def layers(seed, dtype=torch.float32, count=None):
    return random_layers(seed, dtype, DEVICE, count, max_n=49)


def kernel_gram(weights, idxs, **kwargs):
    loss = tpp_kernels.gram_penalty_multi(weights, idxs, **kwargs)
    return loss, torch.autograd.grad(loss, weights, allow_unused=True, materialize_grads=True)


def check_gram(weights, idxs, tol, **kwargs):
    loss, grads = kernel_gram(weights, idxs, **kwargs)
    ref_loss, ref_grads = reference_gram(weights, idxs, kwargs.get("reduction", "mean"))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref_loss, tol[0], "loss")
    for i, (g, ref_g, w) in enumerate(zip(grads, ref_grads, weights)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close(g, ref_g, tol[1], f"grad {i}")


# --- dot precision ------------------------------------------------------------------------------------------------


def test_tf32(seed):
    weights, idxs = layers(seed)
    check_gram(weights, idxs, TF32_TOL, input_precision="tf32")


def test_ieee_requested(seed):
    weights, idxs = layers(seed)
    check_gram(weights, idxs, TOL[torch.float32], input_precision="ieee")


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("setting, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_default_precision_follows_torch(monkeypatch, restore_matmul_precision, setting, expected):
    """Compiled kernels: fp32 dots at torch's fp32 matmul precision unless one is requested; the interpreter: ieee."""
    torch.set_float32_matmul_precision(setting)
    monkeypatch.setattr(config, "INTERPRET", False)
    assert config.input_precision(None) == expected
    assert config.input_precision("ieee") == "ieee" and config.input_precision("tf32") == "tf32"
    monkeypatch.setattr(config, "INTERPRET", True)
    assert config.input_precision(None) == "ieee"


def test_unknown_input_precision():
    with pytest.raises(ValueError, match="input_precision must be"):
        tpp_kernels.gram_penalty_multi([torch.randn(8, 4, device=DEVICE)], [torch.tensor([1], device=DEVICE)],
                                       input_precision="tf32x3")


# --- gram: grouped launch, in-place path ------------------------------------------------------------------------


def test_grouped_equals_per_layer(seed):
    """One launch for every layer computes each layer's tiles as its own launch would (bitwise on the CPU)."""
    weights, idxs = layers(seed)
    more = layers(seed + 1)
    weights, idxs = weights + more[0], idxs + more[1]
    loss, grads = kernel_gram(weights, idxs, input_precision="ieee")
    per_layer = [tpp_kernels.gram_penalty(w, idx, input_precision="ieee") for w, idx in zip(weights, idxs)]
    torch.testing.assert_close(loss, sum(per_layer), rtol=1e-6, atol=0)
    for w, g, term in zip(weights, grads, per_layer):
        assert_same_arithmetic(g, torch.autograd.grad(term, w, allow_unused=True, materialize_grads=True)[0])


@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_add_grad_same_arithmetic_as_autograd(scale_kind, reduction, seed):
    """fp32: the in-place path and autograd run the same fp32 arithmetic and round once each."""
    weights, idxs = layers(seed)
    w, idx = random_layer(torch.Generator().manual_seed(seed), 21, (4, 3, 3), 8, device=DEVICE, channels_last=True)
    weights, idxs = weights + [w], idxs + [idx]
    scale = 0.37 if scale_kind == "float" else torch.tensor(0.37, device=DEVICE)
    initial = [torch.randn_like(w) for w in weights]
    for w, g in zip(weights, initial):
        w.grad = g.clone()
    (scale * tpp_kernels.gram_penalty_multi(weights, idxs, reduction=reduction, input_precision="ieee")).backward()
    grads = [g.clone() for g in initial]
    tpp_kernels.add_gram_penalty_grad_([w.detach() for w in weights], grads, idxs, scale, reduction=reduction,
                                       input_precision="ieee")
    for w, g in zip(weights, grads):
        assert_same_arithmetic(g, w.grad)


# --- no launch when nothing is pruned -----------------------------------------------------------------------------


class _Forbidden:
    def __getitem__(self, grid):
        raise AssertionError("kernel launched")


@pytest.fixture
def no_launch(monkeypatch):
    for name in ("fwd_kernel", "bwd_kernel"):
        monkeypatch.setattr(kernels, name, _Forbidden())


def test_nothing_pruned_launches_nothing(no_launch, seed):
    weights, _ = layers(seed, count=2)
    empty = [torch.zeros(0, dtype=torch.int64, device=DEVICE)] * 2
    loss, grads = kernel_gram(weights, empty)
    assert loss.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    before = [torch.randn_like(w) for w in weights]
    after = [g.clone() for g in before]
    tpp_kernels.add_gram_penalty_grad_([w.detach() for w in weights], after, empty, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    gammas = [torch.randn(9, device=DEVICE, requires_grad=True)]
    betas = [torch.randn(9, device=DEVICE, requires_grad=True)]
    loss = tpp_kernels.bn_penalty(gammas, betas, empty[:1])
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros(9, device=DEVICE)) for g in torch.autograd.grad(loss, gammas + betas))
    before = [torch.randn(9, device=DEVICE), torch.randn(9, device=DEVICE)]
    after = [g.clone() for g in before]
    tpp_kernels.add_bn_penalty_grad_(gammas, betas, after[:1], after[1:], empty[:1], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


# --- caching, autotuning ------------------------------------------------------------------------------------------


@needs_kernels
def test_plan_cached_until_pruned_set_changes(monkeypatch, seed):
    built = []
    monkeypatch.setattr(gram, "PenaltyPlan", lambda *a, **k: built.append(1) or plan.PenaltyPlan(*a, **k))
    gram._plans.clear()
    weights, idxs = layers(seed)
    gen = torch.Generator().manual_seed(seed)
    n = weights[0].shape[0]
    idxs[0] = torch.randperm(n, generator=gen)[:max(1, n // 2)].to(DEVICE)  # at least one pruned filter
    for _ in range(2):
        check_gram(weights, idxs, TOL[torch.float32], input_precision="ieee")
    assert len(built) == 1  # built (and the indices validated) at the first call
    idxs[0][...] = torch.randperm(weights[0].shape[0])[:idxs[0].numel()].to(DEVICE)  # in place: new version
    check_gram(weights, idxs, TOL[torch.float32], input_precision="ieee")
    assert len(built) == 2


# --- torch.library, torch.compile -------------------------------------------------------------------------------


def _op_samples():
    gen = torch.Generator().manual_seed(17)
    w1, i1 = random_layer(gen, 20, (3, 3, 3), 6, device=DEVICE)
    w2, i2 = random_layer(gen, 9, (7,), 8, torch.float16, DEVICE)
    weights, idxs = [w1, w2], [i1, i2]
    r_numel = 6 * 20 + 8 * 9
    detached = [w.detach() for w in weights]
    gammas, betas, bn_idxs = random_bn(18, device=DEVICE)
    yield "gram_penalty_fwd", (weights, idxs, True, "ieee")
    yield "gram_penalty_bwd", (torch.tensor(1.5, device=DEVICE), detached, idxs, torch.randn(r_numel, device=DEVICE),
                               False, "ieee")
    yield "gram_penalty_add_grad", (detached, [torch.randn_like(w) for w in detached], idxs, 2.0,
                                    torch.tensor(0.5, device=DEVICE), True, "ieee")
    yield "bn_penalty_fwd", (gammas, betas, bn_idxs)
    yield "bn_penalty_bwd", (torch.tensor(0.5, device=DEVICE), [g.detach() for g in gammas],
                             [b.detach() for b in betas], bn_idxs)
    yield "bn_penalty_add_grad", ([g.detach() for g in gammas], [b.detach() for b in betas],
                                  [torch.randn_like(g) for g in gammas], [torch.randn_like(b) for b in betas],
                                  bn_idxs, 3.0, None)


@pytest.mark.parametrize("name, args", list(_op_samples()), ids=[name for name, _ in _op_samples()])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.tpp, name), args)


def test_compile_inductor(seed):
    """Inductor around the opaque custom ops (aot_eager: test_backend_contract.py): the eager values."""
    torch._dynamo.reset()
    weights, idxs = layers(seed)
    gammas, betas, bn_idxs = random_bn(seed, device=DEVICE)

    def penalty(weights, gammas, betas):
        return 1000 * tpp_kernels.gram_penalty_multi(weights, idxs) + tpp_kernels.bn_penalty(gammas, betas, bn_idxs)

    def apply_gradients(weights, gammas, betas, grads, gamma_grads, beta_grads, strength):
        tpp_kernels.add_gram_penalty_grad_(weights, grads, idxs, 1000 * strength)
        tpp_kernels.add_bn_penalty_grad_(gammas, betas, gamma_grads, beta_grads, bn_idxs, strength)

    params = weights + gammas + betas
    eager = penalty(weights, gammas, betas)
    compiled = torch.compile(penalty, fullgraph=True, backend="inductor")(weights, gammas, betas)
    assert_same_arithmetic(compiled, eager)
    for g, e in zip(torch.autograd.grad(compiled, params), torch.autograd.grad(eager, params)):
        assert_same_arithmetic(g, e)
    n, m = len(weights), len(gammas)
    buffers = {}
    for name, fn in (("eager", apply_gradients), ("compiled", torch.compile(apply_gradients, fullgraph=True))):
        buffers[name] = b = [torch.zeros_like(p) for p in params]
        fn([p.detach() for p in weights], [p.detach() for p in gammas], [p.detach() for p in betas],
           b[:n], b[n:n + m], b[n + m:], torch.tensor(1.0, device=DEVICE))
    for b, e in zip(buffers["compiled"], buffers["eager"]):
        assert_same_arithmetic(b, e)
