"""tpp_kernels against float64 references (tpp.reference).

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
and TPP_AUTOTUNE=0); with one, the same tests run the compiled kernels on CUDA tensors.
"""
import pytest
import torch
from tolerances import KERNEL_TF32_TOLERANCE as TF32_TOL
from tolerances import KERNEL_TOLERANCES as TOL

import tpp_kernels
from tpp import reference
from tpp_kernels import bn, config, gram, tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On CPU without the interpreter, the ops run tpp.reference: the kernel-specific tests are skipped.
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not config.INTERPRET, reason="CPU ops run tpp.reference")



def assert_close(actual, expected, tol, what=""):
    """|actual − expected| ≤ tol · max|expected| elementwise (exact match when the reference is all zeros)."""
    atol = tol * expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def random_layer(gen, n, shape, p, dtype=torch.float32, channels_last=False):
    w = torch.randn((n, *shape), generator=gen).to(device=DEVICE, dtype=dtype)
    if channels_last:
        w = w.to(memory_format=torch.channels_last)
    idx = torch.randperm(n, generator=gen)[:p].sort().values.to(DEVICE)
    return w.requires_grad_(), idx


def random_layers(seed, dtype=torch.float32):
    """1-3 layers, conv or linear, N and D not multiples of the block, p among 0, 1, N−1 and random."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(int(torch.randint(1, 4, (), generator=gen))):
        n = int(torch.randint(1, 49, (), generator=gen))
        if torch.rand((), generator=gen) < 0.5:
            shape = (int(torch.randint(1, 7, (), generator=gen)), 3, 3)
        else:
            shape = (int(torch.randint(1, 71, (), generator=gen)),)
        p = [0, 1, n - 1, int(torch.randint(0, n + 1, (), generator=gen))][int(torch.randint(0, 4, (), generator=gen))]
        layers.append(random_layer(gen, n, shape, max(p, 0), dtype, channels_last=len(shape) == 3 and n % 2 == 1))
    return [w for w, _ in layers], [idx for _, idx in layers]


def reference_gram(weights, idxs, reduction="mean", variant="decorrelate"):
    """(loss, grads) of Σ_i gram penalty in float64."""
    w64 = [w.detach().double().requires_grad_() for w in weights]
    loss = sum(reference.gram_penalty(w, idx, variant, reduction) for w, idx in zip(w64, idxs))
    return loss.detach(), torch.autograd.grad(loss, w64, allow_unused=True, materialize_grads=True)


def kernel_gram(weights, idxs, **kwargs):
    loss = tpp_kernels.gram_penalty_multi(weights, idxs, **kwargs)
    return loss, torch.autograd.grad(loss, weights)


def check_gram(weights, idxs, tol, **kwargs):
    loss, grads = kernel_gram(weights, idxs, **kwargs)
    ref_loss, ref_grads = reference_gram(weights, idxs, kwargs.get("reduction", "mean"),
                                         kwargs.get("variant", "decorrelate"))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref_loss, tol[0], "loss")
    for i, (g, ref_g, w) in enumerate(zip(grads, ref_grads, weights)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close(g, ref_g, tol[1], f"grad {i}")


# --- gram: values and gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", range(12))
def test_gram_random_shapes(seed, reduction):
    weights, idxs = random_layers(seed)
    check_gram(weights, idxs, TOL[torch.float32], reduction=reduction, input_precision="ieee")


@pytest.mark.parametrize("p", ["empty", "one", "all_but_one", "all"])
@pytest.mark.parametrize("n, shape", [(1, (5,)), (17, (3, 3, 3)), (33, (40,))])
def test_gram_pruned_set_sizes(n, shape, p):
    p = {"empty": 0, "one": 1, "all_but_one": n - 1, "all": n}[p]
    w, idx = random_layer(torch.Generator().manual_seed(n + p), n, shape, p)
    check_gram([w], [idx], TOL[torch.float32], input_precision="ieee")


def test_gram_long_reduction():
    """D spans many BLOCK_K chunks; N several row and column blocks."""
    w, idx = random_layer(torch.Generator().manual_seed(1), 50, (37, 3, 3), 21)
    check_gram([w], [idx], TOL[torch.float32], input_precision="ieee")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gram_half_precision(dtype):
    weights, idxs = random_layers(3, dtype)
    check_gram(weights, idxs, TOL[dtype], input_precision="ieee")


def test_tf32():
    weights, idxs = random_layers(4)
    check_gram(weights, idxs, TF32_TOL, input_precision="tf32")


def test_mixed_dtypes():
    gen = torch.Generator().manual_seed(5)
    layers = [random_layer(gen, 20, (9,), 7), random_layer(gen, 13, (2, 3, 3), 4, torch.float16),
              random_layer(gen, 9, (30,), 0), random_layer(gen, 24, (11,), 23, torch.float16)]
    weights, idxs = [w for w, _ in layers], [i for _, i in layers]
    check_gram(weights, idxs, TOL[torch.float16], input_precision="ieee")
    grads = [torch.zeros_like(w) for w in weights]
    tpp_kernels.add_gram_penalty_grad_([w.detach() for w in weights], grads, idxs, 1.0, input_precision="ieee")
    for g, ref_g in zip(grads, reference_gram(weights, idxs)[1]):
        assert_close(g, ref_g, TOL[torch.float16][1])


def test_non_dense_weight():
    base = torch.randn(19, 40, device=DEVICE, requires_grad=True)
    idx = torch.tensor([0, 7, 18], device=DEVICE)
    check_gram([base[:, ::2]], [idx], TOL[torch.float32], input_precision="ieee")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_diagonal_variant_uses_reference(reduction):
    weights, idxs = random_layers(6)
    check_gram(weights, idxs, TOL[torch.float32], variant="diagonal", reduction=reduction)
    grads = [torch.zeros_like(w) for w in weights]
    tpp_kernels.add_gram_penalty_grad_([w.detach() for w in weights], grads, idxs, 2.0, variant="diagonal",
                                       reduction=reduction)
    for g, ref_g in zip(grads, reference_gram(weights, idxs, reduction, "diagonal")[1]):
        assert_close(g, 2 * ref_g, TOL[torch.float32][1])


# --- gram: grouped launch, in-place path ------------------------------------------------------------------------


def test_grouped_equals_per_layer():
    weights, idxs = random_layers(7)
    weights += random_layers(8)[0]
    idxs += random_layers(8)[1]
    loss, grads = kernel_gram(weights, idxs, input_precision="ieee")
    per_layer = [tpp_kernels.gram_penalty(w, idx, input_precision="ieee") for w, idx in zip(weights, idxs)]
    torch.testing.assert_close(loss, sum(per_layer), rtol=1e-6, atol=0)
    for w, g, term in zip(weights, grads, per_layer):
        assert torch.equal(g, torch.autograd.grad(term, w, allow_unused=True, materialize_grads=True)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_add_grad_equals_autograd(dtype, scale_kind, reduction):
    weights, idxs = random_layers(9, dtype)
    w, idx = random_layer(torch.Generator().manual_seed(10), 21, (4, 3, 3), 8, dtype, channels_last=True)
    weights, idxs = weights + [w], idxs + [idx]
    scale = 0.37 if scale_kind == "float" else torch.tensor(0.37, device=DEVICE)
    initial = [torch.randn_like(w) for w in weights]
    for w, g in zip(weights, initial):
        w.grad = g.clone()
    (scale * tpp_kernels.gram_penalty_multi(weights, idxs, reduction=reduction, input_precision="ieee")).backward()
    grads = [g.clone() for g in initial]
    tpp_kernels.add_gram_penalty_grad_([w.detach() for w in weights], grads, idxs, scale, reduction=reduction,
                                       input_precision="ieee")
    for w, g, g0 in zip(weights, grads, initial):
        assert g.stride() == g0.stride()
        if dtype == torch.float32:  # same fp32 arithmetic, one rounding each: bitwise equal
            assert torch.equal(g, w.grad)
        else:  # autograd rounds the penalty gradient before adding it: one more rounding
            assert_close(g, w.grad, TOL[dtype][1])


def test_add_grad_into_grad_of_other_layout():
    w, idx = random_layer(torch.Generator().manual_seed(11), 19, (6, 3, 3), 5, channels_last=True)
    grad = torch.zeros(w.shape, device=DEVICE)  # contiguous, unlike the weight
    tpp_kernels.add_gram_penalty_grad_([w.detach()], [grad], [idx], 1.0, input_precision="ieee")
    assert_close(grad, reference_gram([w], [idx])[1][0], TOL[torch.float32][1])


# --- BN ---------------------------------------------------------------------------------------------------------


def random_bn(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(1, 1), (17, 0), (40, 13), (33, 32)]
    gammas = [torch.randn(c, generator=gen).to(DEVICE, dtype).requires_grad_() for c, _ in sizes]
    betas = [torch.randn(c, generator=gen).to(DEVICE, dtype).requires_grad_() for c, _ in sizes]
    idxs = [torch.randperm(c, generator=gen)[:p].sort().values.to(DEVICE) for c, p in sizes]
    return gammas, betas, idxs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bn_values_and_grads(dtype):
    gammas, betas, idxs = random_bn(12, dtype)
    loss = tpp_kernels.bn_penalty(gammas, betas, idxs)
    grads = torch.autograd.grad(loss, gammas + betas)
    ref_loss = sum(reference.bn_penalty(g.double(), b.double(), i) for g, b, i in zip(gammas, betas, idxs))
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, TOL[dtype][0], "loss")
    for x, g, idx in zip(gammas + betas, grads, idxs + idxs):
        expected = torch.zeros_like(x, dtype=torch.float64)
        expected[idx] = 2 * x.detach().double()[idx]
        assert g.dtype == x.dtype
        assert_close(g, expected, TOL[dtype][1])


@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_bn_add_grad_equals_autograd(scale_kind):
    gammas, betas, idxs = random_bn(13)
    scale = 0.5 if scale_kind == "float" else torch.tensor(0.5, device=DEVICE)
    initial = [torch.randn_like(x) for x in gammas + betas]
    for x, g in zip(gammas + betas, initial):
        x.grad = g.clone()
    (scale * tpp_kernels.bn_penalty(gammas, betas, idxs)).backward()
    grads = [g.clone() for g in initial]
    n = len(gammas)
    tpp_kernels.add_bn_penalty_grad_([g.detach() for g in gammas], [b.detach() for b in betas], grads[:n],
                                     grads[n:], idxs, scale)
    for x, g, g0, idx in zip(gammas + betas, grads, initial, idxs + idxs):
        assert torch.equal(g, x.grad)
        kept = torch.ones(x.shape[0], dtype=torch.bool, device=DEVICE)
        kept[idx] = False
        assert torch.equal(g[kept], g0[kept])  # untouched, bit for bit


# --- no launch when nothing is pruned, validation before any launch ---------------------------------------------


class _Forbidden:
    def __getitem__(self, grid):
        raise AssertionError("kernel launched")


@pytest.fixture
def no_launch(monkeypatch):
    for module, name in [(gram, "_gram_fwd_kernel"), (gram, "_gram_bwd_kernel"), (bn, "_bn_fwd_kernel"),
                         (bn, "_bn_bwd_kernel")]:
        monkeypatch.setattr(module, name, _Forbidden())


def test_nothing_pruned_launches_nothing(no_launch):
    gen = torch.Generator().manual_seed(14)
    weights = [random_layer(gen, 9, (5,), 0)[0], random_layer(gen, 6, (2, 3, 3), 0)[0]]
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


def _i(*values):
    return torch.tensor(values, device=DEVICE)


def _w(*shape, dtype=torch.float32):
    return torch.randn(shape, device=DEVICE).to(dtype)


_GRAM_BAD = [
    # (weights, pruned_idxs, kwargs, exception, message)
    (_w(8, 4), [_i(1)], {}, TypeError, "weights must be a list"),
    ([_w(8, 4), "w"], [_i(1), _i(2)], {}, TypeError, r"weights\[1\] must be a tensor"),
    ([_w(8, 4)], [_i(1), _i(2)], {}, ValueError, "same length"),
    ([_w(8, 4), torch.ones(8, 4, dtype=torch.int64, device=DEVICE)], [_i(1), _i(2)], {}, TypeError, r"weights\[1\]"),
    ([_w(8, 4, dtype=torch.float64)], [_i(1)], {}, TypeError, r"weights\[0\] must be float32"),
    ([_w(8, 4), _w(8)], [_i(1), _i(2)], {}, ValueError, r"weights\[1\] must have at least 2 dims"),
    ([_w(8, 4)], [torch.tensor([1.0], device=DEVICE)], {}, TypeError, r"pruned_idxs\[0\] must be an integer"),
    ([_w(8, 4)], [_i(1, 2).reshape(1, 2)], {}, ValueError, r"pruned_idxs\[0\] must be a 1-D"),
    ([_w(8, 4), _w(3, 4)], [_i(1), _i(0, 1, 2, 0)], {}, ValueError, r"pruned_idxs\[1\] has 4 indices"),
    ([_w(8, 4), _w(3, 4)], [_i(1), _i(0, 3)], {}, ValueError, r"pruned_idxs\[1\]: filter indices must lie in \[0, 3\)"),
    ([_w(8, 4)], [_i(-1, 2)], {}, ValueError, r"pruned_idxs\[0\]: filter indices must lie"),
    ([_w(8, 4), _w(3, 4)], [_i(1), _i(2, 2)], {}, ValueError, r"pruned_idxs\[1\]: filter indices must be distinct"),
    ([_w(8, 4), _w(3, 4, dtype=torch.float16)], [_i(1), _i(1, 1)], {}, ValueError, r"pruned_idxs\[1\].*distinct"),
    ([_w(8, 4), torch.randn(3, 4, device="meta")], [_i(1), _i(2)], {}, ValueError, r"weights\[1\] is on meta"),
    ([_w(8, 4)], [torch.tensor([1], device="meta")], {}, ValueError, r"pruned_idxs\[0\] is on meta"),
    ([_w(8, 4)], [_i(1)], {"variant": "orth"}, ValueError, "variant must be one of"),
    ([_w(8, 4)], [_i(1)], {"reduction": "none"}, ValueError, "reduction must be one of"),
    ([_w(8, 4)], [_i(1)], {"input_precision": "tf32x3"}, ValueError, "input_precision must be"),
]


@pytest.mark.parametrize("weights, idxs, kwargs, error, message", _GRAM_BAD)
def test_gram_bad_inputs_raise_before_launch(no_launch, weights, idxs, kwargs, error, message):
    with pytest.raises(error, match=message):
        tpp_kernels.gram_penalty_multi(weights, idxs, **kwargs)
    if isinstance(weights, list) and all(isinstance(w, torch.Tensor) for w in weights) and len(weights) == len(idxs):
        grads = [torch.zeros_like(w) for w in weights]
        with pytest.raises(error, match=message):
            tpp_kernels.add_gram_penalty_grad_(weights, grads, idxs, 1.0, **kwargs)
        assert all(not g.any() for g in grads if g.device.type != "meta")


_ADD_GRAD_BAD = [
    # (grads, scale, exception, message) for weights [_w(8, 4), _w(3, 2, 3, 3)]
    ([torch.zeros(8, 4, device=DEVICE)], 1.0, ValueError, "same length"),
    ([torch.zeros(8, 4, device=DEVICE), torch.zeros(3, 18, device=DEVICE)], 1.0, ValueError, r"grads\[1\] has shape"),
    ([torch.zeros(8, 4, device=DEVICE, dtype=torch.float16), torch.zeros(3, 2, 3, 3, device=DEVICE)], 1.0, TypeError,
     r"grads\[0\] has dtype"),
    ([torch.zeros(8, 8, device=DEVICE)[:, :4], torch.zeros(3, 2, 3, 3, device=DEVICE)], 1.0, ValueError,
     r"grads\[0\] must be dense"),
    ([torch.zeros(8, 4, device=DEVICE), torch.zeros(3, 2, 3, 3, device="meta")], 1.0, ValueError, r"grads\[1\] is on"),
    ([torch.zeros(8, 4, device=DEVICE), torch.zeros(3, 2, 3, 3, device=DEVICE)], torch.ones(1, device=DEVICE),
     ValueError, "0-d"),
    ([torch.zeros(8, 4, device=DEVICE), torch.zeros(3, 2, 3, 3, device=DEVICE)], "1", TypeError, "scale"),
    ([torch.zeros(8, 4, device=DEVICE), torch.zeros(3, 2, 3, 3, device=DEVICE)], float("nan"), TypeError, "finite"),
]


@pytest.mark.parametrize("grads, scale, error, message", _ADD_GRAD_BAD)
def test_add_grad_bad_inputs_raise_before_launch(no_launch, grads, scale, error, message):
    with pytest.raises(error, match=message):
        tpp_kernels.add_gram_penalty_grad_([_w(8, 4), _w(3, 2, 3, 3)], grads, [_i(1), _i(2)], scale)


_BN_BAD = [
    # (gammas, betas, pruned_idxs, exception, message)
    ([_w(8), _w(8, 1)], [_w(8), _w(8, 1)], [_i(1), _i(2)], ValueError, r"gammas\[1\] must have 1 dims"),
    ([_w(8), _w(5)], [_w(8), _w(4)], [_i(1), _i(2)], ValueError, r"betas\[1\] has shape"),
    ([_w(8)], [_w(8, dtype=torch.float16)], [_i(1)], TypeError, r"betas\[0\] has dtype"),
    ([_w(8), _w(5)], [_w(8), _w(5)], [_i(1), _i(5)], ValueError, r"pruned_idxs\[1\]: filter indices must lie"),
    ([_w(8), _w(5)], [_w(8)], [_i(1), _i(2)], ValueError, "same length"),
]


@pytest.mark.parametrize("gammas, betas, idxs, error, message", _BN_BAD)
def test_bn_bad_inputs_raise_before_launch(no_launch, gammas, betas, idxs, error, message):
    with pytest.raises(error, match=message):
        tpp_kernels.bn_penalty(gammas, betas, idxs)
    grads = [torch.zeros_like(g) for g in gammas]
    with pytest.raises(error, match=message):
        tpp_kernels.add_bn_penalty_grad_(gammas, betas, grads, [torch.zeros_like(g) for g in gammas], idxs, 1.0)
    assert all(not g.any() for g in grads)


# --- caching, autotuning ------------------------------------------------------------------------------------------


@needs_kernels
def test_layout_cached_until_pruned_set_changes(monkeypatch):
    calls = []
    monkeypatch.setattr(tables, "check_pruned_indices", lambda *args: calls.append(args[2]))
    gram._layouts.clear()
    weights, idxs = random_layers(15)
    for _ in range(2):
        check_gram(weights, idxs, TOL[torch.float32], input_precision="ieee")
    assert len(calls) == len(weights)  # validated once, at the first call
    idxs[0][...] = torch.randperm(weights[0].shape[0])[:idxs[0].numel()].to(DEVICE)  # in place: new version
    check_gram(weights, idxs, TOL[torch.float32], input_precision="ieee")
    assert len(calls) == 2 * len(weights)


def test_autotune_picks_fastest_once(monkeypatch):
    timings = {cfg: 1.0 + i for i, cfg in enumerate(config._CANDIDATES["gram_fwd"])}
    fastest = config._CANDIDATES["gram_fwd"][3]
    timings[fastest] = 0.5
    benched = []

    def bench(fn):
        fn()
        benched.append(1)
        return timings.get(launched[-1], 1.0)

    launched = []
    monkeypatch.setattr(config, "autotune_enabled", lambda: True)
    monkeypatch.setattr(config, "_bench", bench)
    monkeypatch.setattr(config, "_best", {})
    assert config.pick("gram_fwd", "sig", launched.append) == fastest
    assert config.pick("gram_fwd", "sig", launched.append) == fastest
    assert len(benched) == len(config._CANDIDATES["gram_fwd"])


@needs_kernels
def test_autotuned_launches_stay_correct(monkeypatch):
    """Tuning launches every candidate (large blocks) into scratch buffers: results and .grad stay exact."""
    monkeypatch.setattr(config, "autotune_enabled", lambda: True)
    monkeypatch.setattr(config, "_bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(config, "_best", {})
    weights, idxs = random_layers(16)
    check_gram(weights, idxs, TOL[torch.float32], input_precision="ieee")
    grads = [torch.zeros_like(w) for w in weights]
    tpp_kernels.add_gram_penalty_grad_([w.detach() for w in weights], grads, idxs, 1.0, input_precision="ieee")
    for g, ref_g in zip(grads, reference_gram(weights, idxs)[1]):
        assert_close(g, ref_g, TOL[torch.float32][1])


# --- torch.library, torch.compile -------------------------------------------------------------------------------


def _op_samples():
    gen = torch.Generator().manual_seed(17)
    w1, i1 = random_layer(gen, 20, (3, 3, 3), 6)
    w2, i2 = random_layer(gen, 9, (7,), 8, torch.float16)
    weights, idxs = [w1, w2], [i1, i2]
    r_numel = 6 * 20 + 8 * 9
    detached = [w.detach() for w in weights]
    gammas, betas, bn_idxs = random_bn(18)
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


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    weights, idxs = random_layers(19)
    gammas, betas, bn_idxs = random_bn(20)

    def penalty(weights, gammas, betas):
        return 1000 * tpp_kernels.gram_penalty_multi(weights, idxs) + tpp_kernels.bn_penalty(gammas, betas, bn_idxs)

    def apply_gradients(weights, gammas, betas, grads, gamma_grads, beta_grads, strength):
        tpp_kernels.add_gram_penalty_grad_(weights, grads, idxs, 1000 * strength)
        tpp_kernels.add_bn_penalty_grad_(gammas, betas, gamma_grads, beta_grads, bn_idxs, strength)

    params = weights + gammas + betas
    eager = penalty(weights, gammas, betas)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(penalty, fullgraph=True, backend=backend)(weights, gammas, betas)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    for g, e in zip(torch.autograd.grad(compiled, params), eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)

    buffers = [torch.zeros_like(p) for p in params]
    n, m = len(weights), len(gammas)
    args = ([p.detach() for p in weights], [p.detach() for p in gammas], [p.detach() for p in betas],
            buffers[:n], buffers[n:n + m], buffers[n + m:], torch.tensor(1.0, device=DEVICE))
    torch.compile(apply_gradients, fullgraph=True, backend=backend)(*args)
    for b, e in zip(buffers, eager_grads):
        torch.testing.assert_close(b, e, rtol=1e-6, atol=1e-7)
