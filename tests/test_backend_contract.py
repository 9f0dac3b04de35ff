"""The backend contract: every backend of the penalty ops against float64 references (tpp_kernels.reference).

Backends: ``torch`` (the pure-PyTorch multi-layer ops of ``tpp.backends``), ``triton`` (``tpp_kernels``: compiled
kernels on CUDA tensors, the Triton interpreter on CPU tensors without a GPU) and ``cuda`` (``tpp_kernels.cuda``, the
csrc/ extension built just in time: its CPU ops here, its CUDA kernels too on a GPU host; skipped without a CUDA
toolkit). Each runs the same tests on random odd shapes (p = 0, 1, N − 1, N), every float dtype and both reductions.
Backend-specific tests (launch tables, autotuning, the build, op registration) live in test_kernels.py and
test_cuda_ops.py.
"""
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tolerances import assert_parity, parity_precision

from tpp_kernels import config, cuda_build, reference

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _torch_ops():
    from tpp.backends import TORCH_BACKEND as b

    return types.SimpleNamespace(gram_penalty_multi=b.gram_penalty, add_gram_penalty_grad_=b.add_gram_grad_,
                                 bn_penalty=b.bn_penalty, add_bn_penalty_grad_=b.add_bn_grad_)


def _triton_ops():
    pytest.importorskip("triton")
    import tpp_kernels

    return tpp_kernels


def cuda_extension_available() -> bool:
    """Whether ``tpp_kernels.cuda`` has a library to load: one built into the checkout (``TPP_BUILD_CUDA=1 pip
    install -e .``: ``tpp_kernels/_C*.so``) or a CUDA toolkit for the just-in-time build. Without either the cuda
    backend's tests are skipped; with either, a failing import fails them."""
    return cuda_build.cuda_home() is not None or importlib.util.find_spec("tpp_kernels._C") is not None


def cuda_ops():
    if not cuda_extension_available():
        pytest.skip("no tpp_kernels/_C library and no CUDA toolkit (nvcc, CUDA_HOME): the tpp_cuda extension is "
                    "not built here")
    import tpp_kernels.cuda  # builds the extension on first use (a minute), then loads it from the cache

    return tpp_kernels.cuda


# (backend, device): the Triton kernels run on CUDA tensors, or on CPU tensors in the interpreter; the other
# backends run on the CPU and, on a GPU host, on CUDA too.
CASES = [("torch", "cpu"), ("cuda", "cpu")] + ([("torch", "cuda"), ("cuda", "cuda")] if HAS_CUDA else [])
CASES.insert(1, ("triton", "cuda" if HAS_CUDA and not config.INTERPRET else "cpu"))
KERNEL_CASES = [c for c in CASES if c[0] != "torch"]  # the backends that validate their arguments
_LOADERS = {"torch": _torch_ops, "triton": _triton_ops, "cuda": cuda_ops}


class Case(types.SimpleNamespace):
    """One backend on one device: ``ops`` (the four functions), ``name``, ``device``."""


def _case(request) -> Case:
    name, device = request.param
    if name == "triton" and device == "cpu" and not config.INTERPRET:
        pytest.skip("without TRITON_INTERPRET=1 the triton backend on CPU tensors runs the reference")
    return Case(name=name, device=device, ops=_LOADERS[name]())


@pytest.fixture(params=CASES, ids=[f"{n}-{d}" for n, d in CASES])
def case(request):
    return _case(request)


@pytest.fixture(params=KERNEL_CASES, ids=[f"{n}-{d}" for n, d in KERNEL_CASES])
def kernel_case(request):
    return _case(request)


def test_tpp_kernels_never_imports_tpp():
    """tpp_kernels is self-contained: importing every module of it (the CUDA binding only when a toolkit can build
    it) loads no module of the tpp package."""
    modules = ["tpp_kernels", "tpp_kernels.reference", "tpp_kernels.checks", "tpp_kernels.config",
               "tpp_kernels.tables", "tpp_kernels.cuda_build", "tpp_kernels.gram", "tpp_kernels.bn"]
    if cuda_extension_available():
        modules.append("tpp_kernels.cuda")
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'tpp' or m.startswith('tpp.')))")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --- random layers ----------------------------------------------------------------------------------------------


def random_layer(gen, n, shape, p, dtype=torch.float32, device="cpu", channels_last=False):
    w = torch.randn((n, *shape), generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        w = w.to(memory_format=torch.channels_last)
    idx = torch.randperm(n, generator=gen)[:p].to(device)  # unsorted on purpose
    return w.requires_grad_(), idx


def random_layers(seed, dtype=torch.float32, device="cpu", count=None, max_n=80):
    """Conv or linear layers with odd N and D, p among 0, 1, N−1, N and random, the odd-N convs channels-last."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(count or int(torch.randint(1, 5, (), generator=gen))):
        n = int(torch.randint(1, max_n, (), generator=gen))
        conv = bool(torch.rand((), generator=gen) < 0.5)
        shape = (int(torch.randint(1, 9, (), generator=gen)), 3, 3) if conv else \
            (int(torch.randint(1, 90, (), generator=gen)),)
        choice = int(torch.randint(0, 5, (), generator=gen))
        p = [0, 1, n - 1, n, int(torch.randint(0, n + 1, (), generator=gen))][choice]
        layers.append(random_layer(gen, n, shape, p, dtype, device, channels_last=conv and n % 2 == 1))
    return [w for w, _ in layers], [idx for _, idx in layers]


def reference_gram(weights, idxs, reduction="mean", variant="decorrelate"):
    """(Σ_l gram penalty, its gradients) in float64, from the weights' own (rounded) values."""
    w64 = [w.detach().double().requires_grad_() for w in weights]
    loss = sum(reference.gram_penalty(w, idx.long(), variant, reduction) for w, idx in zip(w64, idxs))
    return loss.detach(), torch.autograd.grad(loss, w64, allow_unused=True, materialize_grads=True)


def check_gram(case, weights, idxs, reduction="mean", variant="decorrelate"):
    loss = case.ops.gram_penalty_multi(weights, idxs, variant, reduction)
    grads = torch.autograd.grad(loss, weights, allow_unused=True, materialize_grads=True)
    ref_loss, ref_grads = reference_gram(weights, idxs, reduction, variant)
    assert loss.dtype == torch.float32 and loss.shape == ()
    precision = parity_precision(case.device)
    assert_parity(loss, ref_loss, weights[0].dtype, "loss", precision, "loss")
    for i, (g, ref_g, w) in enumerate(zip(grads, ref_grads, weights)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_parity(g, ref_g, w.dtype, "grad", precision, f"grad of layer {i}")


# --- gram: values and gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_random_layers(case, dtype, reduction, seed):
    for k in range(3):
        weights, idxs = random_layers(seed + k, dtype, case.device)
        check_gram(case, weights, idxs, reduction)


@pytest.mark.parametrize("p", ["empty", "one", "all_but_one", "all"])
@pytest.mark.parametrize("n, shape", [(1, (5,)), (2, (1,)), (17, (3, 3, 3)), (67, (129,))])
def test_gram_pruned_set_sizes(case, n, shape, p, seed):
    p = {"empty": 0, "one": 1, "all_but_one": n - 1, "all": n}[p]
    w, idx = random_layer(torch.Generator().manual_seed(seed), n, shape, p, device=case.device)
    check_gram(case, [w], [idx], "sum")


def test_gram_long_reductions(case, seed):
    """D over many reduction chunks, p·N over several partials, N over several row and column blocks."""
    gen = torch.Generator().manual_seed(seed)
    layers = [random_layer(gen, 150, (13,), 70, device=case.device),
              random_layer(gen, 90, (7, 1, 1), 89, device=case.device),
              random_layer(gen, 50, (37, 3, 3), 21, device=case.device)]
    check_gram(case, [w for w, _ in layers], [i for _, i in layers])


def test_gram_by_hand(case):
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], device=case.device, requires_grad=True)
    loss = case.ops.gram_penalty_multi([w], [torch.tensor([2], device=case.device)], "decorrelate", "sum")
    assert loss.item() == 24.0  # 0+4+16+0+4
    loss.backward()
    # 4 (G⊙M) W: rows of G⊙M are [0,0,0], [0,0,2], [0,2,4]
    assert w.grad.tolist() == [[0.0, 0.0], [0.0, 16.0], [8.0, 40.0]]


def test_mixed_dtypes(case, seed):
    gen = torch.Generator().manual_seed(seed)
    layers = [random_layer(gen, 20, (9,), 7, device=case.device),
              random_layer(gen, 13, (2, 3, 3), 4, torch.float16, case.device),
              random_layer(gen, 9, (30,), 0, device=case.device),
              random_layer(gen, 24, (11,), 23, torch.bfloat16, case.device)]
    weights, idxs = [w for w, _ in layers], [i for _, i in layers]
    loss = case.ops.gram_penalty_multi(weights, idxs, "decorrelate", "mean")
    ref_loss, ref_grads = reference_gram(weights, idxs)
    precision = parity_precision(case.device)
    assert_parity(loss, ref_loss, torch.float32, "loss", precision)
    grads = [torch.zeros_like(w) for w in weights]
    case.ops.add_gram_penalty_grad_([w.detach() for w in weights], grads, idxs, 1.0, "decorrelate", "mean")
    for w, g, ref_g, auto in zip(weights, grads, ref_grads, torch.autograd.grad(loss, weights)):
        assert_parity(g, ref_g, w.dtype, "grad", precision)
        assert_parity(auto, ref_g, w.dtype, "grad", precision)


def test_index_dtypes_and_layouts(kernel_case, seed):
    """Any integer index dtype; channels-last weights (the gradient keeps the layout) and non-dense ones."""
    case, gen = kernel_case, torch.Generator().manual_seed(seed)
    w, idx = random_layer(gen, 23, (5, 3, 3), 9, channels_last=True, device=case.device)
    base = torch.randn(19, 40, generator=gen).to(case.device).requires_grad_()
    check_gram(case, [w, base[:, ::2]], [idx.to(torch.int32), torch.tensor([0, 7, 18], dtype=torch.uint8,
                                                                           device=case.device)])
    grad = torch.autograd.grad(case.ops.gram_penalty_multi([w], [idx], "decorrelate", "mean"), w)[0]
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_diagonal_variant(case, reduction, seed):
    weights, idxs = random_layers(seed, device=case.device)
    check_gram(case, weights, idxs, reduction, variant="diagonal")
    grads = [torch.zeros_like(w) for w in weights]
    case.ops.add_gram_penalty_grad_([w.detach() for w in weights], grads, idxs, 2.0, "diagonal", reduction)
    precision = parity_precision(case.device)
    for g, ref_g in zip(grads, reference_gram(weights, idxs, reduction, "diagonal")[1]):
        assert_parity(g, 2 * ref_g, torch.float32, "grad", precision)


def test_multi_layer_equals_sum_of_layers(case, seed):
    weights, idxs = random_layers(seed, device=case.device, count=5)
    w2, i2 = random_layers(seed + 1, torch.float16, case.device, count=3)
    weights, idxs = weights + w2, idxs + i2
    loss = case.ops.gram_penalty_multi(weights, idxs, "decorrelate", "mean")
    grads = torch.autograd.grad(loss, weights)
    terms = [case.ops.gram_penalty_multi([w], [idx], "decorrelate", "mean") for w, idx in zip(weights, idxs)]
    torch.testing.assert_close(loss, torch.stack(terms).sum(), rtol=1e-6, atol=0)
    precision = parity_precision(case.device)
    for w, g, term in zip(weights, grads, terms):  # the same arithmetic up to the order of the sums
        assert_parity(g, torch.autograd.grad(term, w)[0], w.dtype, "grad", precision)


def test_deterministic(case, seed):
    weights, idxs = random_layers(seed, device=case.device, count=4)
    first = case.ops.gram_penalty_multi(weights, idxs, "decorrelate", "mean")
    assert all(torch.equal(first, case.ops.gram_penalty_multi(weights, idxs, "decorrelate", "mean"))
               for _ in range(3))


def test_nothing_pruned_is_zero(case, seed):
    weights, _ = random_layers(seed, device=case.device, count=3)
    empty = [torch.zeros(0, dtype=torch.int64, device=case.device)] * 3
    loss = case.ops.gram_penalty_multi(weights, empty, "decorrelate", "mean")
    assert loss.item() == 0.0
    assert all(not g.any() for g in torch.autograd.grad(loss, weights, allow_unused=True, materialize_grads=True))
    grads = [torch.randn_like(w) for w in weights]
    before = [g.clone() for g in grads]
    case.ops.add_gram_penalty_grad_([w.detach() for w in weights], grads, empty, 1.0, "decorrelate", "mean")
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


@pytest.mark.skipif(not HAS_CUDA, reason="TF32 exists on CUDA only")
@pytest.mark.parametrize("setting", ["highest", "high"])
def test_fp32_follows_matmul_precision(case, setting, seed):
    """fp32 weights on a GPU: ieee dots under "highest", TF32 otherwise (then not the ieee result), every backend."""
    if case.device != "cuda":
        pytest.skip("TF32 exists on CUDA only")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        weights, idxs = random_layers(seed, device=case.device, count=3)
        ieee = case.ops.gram_penalty_multi(weights, idxs, "decorrelate", "sum")
        torch.set_float32_matmul_precision(setting)
        assert parity_precision(case.device) == ("ieee" if setting == "highest" else "tf32")
        check_gram(case, weights, idxs, "sum")
        loss = case.ops.gram_penalty_multi(weights, idxs, "decorrelate", "sum")
        assert torch.equal(loss, ieee) == (setting == "highest") or float(ieee) == 0.0
    finally:
        torch.set_float32_matmul_precision(before)


# --- gram: the in-place path --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_grad_equals_autograd(case, dtype, scale_kind, reduction, seed):
    weights, idxs = random_layers(seed, dtype, case.device, count=3)
    w, idx = random_layer(torch.Generator().manual_seed(seed + 1), 21, (4, 3, 3), 8, dtype, case.device, True)
    weights, idxs = weights + [w], idxs + [idx]
    scale = 0.37 if scale_kind == "float" else torch.tensor(0.37, device=case.device)
    initial = [torch.randn_like(w) for w in weights]
    for w, g in zip(weights, initial):
        w.grad = g.clone()
    (scale * case.ops.gram_penalty_multi(weights, idxs, "decorrelate", reduction)).backward()
    grads = [g.clone() for g in initial]
    case.ops.add_gram_penalty_grad_([w.detach() for w in weights], grads, idxs, scale, "decorrelate", reduction)
    precision = parity_precision(case.device)
    for w, g, g0, ref_g in zip(weights, grads, initial, reference_gram(weights, idxs, reduction)[1]):
        assert g.stride() == g0.stride()
        # autograd rounds the penalty's gradient into the dtype before adding it: one rounding more
        assert_parity(g, w.grad, dtype, "grad", precision)
        assert_parity(g, g0.double() + 0.37 * ref_g, dtype, "grad", precision)


def test_add_grad_into_a_grad_of_another_layout(case, seed):
    w, idx = random_layer(torch.Generator().manual_seed(seed), 19, (6, 3, 3), 5, device=case.device,
                          channels_last=True)
    grad = torch.zeros(w.shape, device=case.device)  # contiguous, unlike the weight
    case.ops.add_gram_penalty_grad_([w.detach()], [grad], [idx], 1.0, "decorrelate", "mean")
    assert_parity(grad, reference_gram([w], [idx])[1][0], torch.float32, "grad",
                  parity_precision(case.device))


# --- BN -----------------------------------------------------------------------------------------------------------


def random_bn(seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(1, 1), (17, 0), (40, 13), (33, 32), (5000, 4500)]  # the last spans several reduction chunks
    gammas = [torch.randn(c, generator=gen).to(device, dtype).requires_grad_() for c, _ in sizes]
    betas = [torch.randn(c, generator=gen).to(device, dtype).requires_grad_() for c, _ in sizes]
    idxs = [torch.randperm(c, generator=gen)[:p].to(device) for c, p in sizes]
    return gammas, betas, idxs


def bn_expected(x, idx):
    out = torch.zeros_like(x, dtype=torch.float64)
    out[idx] = 2 * x.detach().double()[idx]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_values_and_grads(case, dtype, seed):
    gammas, betas, idxs = random_bn(seed, dtype, case.device)
    loss = case.ops.bn_penalty(gammas, betas, idxs)
    grads = torch.autograd.grad(loss, gammas + betas)
    ref_loss = sum(reference.bn_penalty(g.double(), b.double(), i) for g, b, i in zip(gammas, betas, idxs))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_parity(loss, ref_loss, dtype, "loss")
    for x, g, idx in zip(gammas + betas, grads, idxs + idxs):
        assert g.dtype == x.dtype
        assert_parity(g, bn_expected(x, idx), dtype, "grad")


@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_bn_add_grad_equals_autograd(case, scale_kind, seed):
    gammas, betas, idxs = random_bn(seed, device=case.device)
    scale = 0.5 if scale_kind == "float" else torch.tensor(0.5, device=case.device)
    initial = [torch.randn_like(x) for x in gammas + betas]
    for x, g in zip(gammas + betas, initial):
        x.grad = g.clone()
    (scale * case.ops.bn_penalty(gammas, betas, idxs)).backward()
    grads = [g.clone() for g in initial]
    n = len(gammas)
    case.ops.add_bn_penalty_grad_([g.detach() for g in gammas], [b.detach() for b in betas], grads[:n], grads[n:],
                                  idxs, scale)
    for x, g, g0, idx in zip(gammas + betas, grads, initial, idxs + idxs):
        assert torch.equal(g, x.grad)  # 2·0.5·x is exact: both paths round once
        kept = torch.ones(x.shape[0], dtype=torch.bool, device=case.device)
        kept[idx] = False
        assert torch.equal(g[kept], g0[kept])  # untouched, bit for bit


# --- bad inputs: clear errors, nothing written (the backends that validate: triton, cuda) ------------------------


class _Forbidden:
    def __getitem__(self, grid):
        raise AssertionError("kernel launched")


@pytest.fixture
def checked(kernel_case, monkeypatch):
    """``kernel_case``, with the Triton kernels replaced by ones that fail if launched."""
    if kernel_case.name == "triton":
        from tpp_kernels import kernels

        for name in ("fwd_kernel", "bwd_kernel"):
            monkeypatch.setattr(kernels, name, _Forbidden())
    return kernel_case


def _gram_bad(device):
    def i(*values):
        return torch.tensor(values, device=device)

    def w(*shape, dtype=torch.float32):
        return torch.randn(shape, device=device).to(dtype)

    return [
        # (weights, pruned_idxs, kwargs, exception, message)
        (w(8, 4), [i(1)], {}, TypeError, "weights must be a list"),
        ([w(8, 4), "w"], [i(1), i(2)], {}, TypeError, r"weights\[1\] must be a tensor"),
        ([w(8, 4)], [i(1), i(2)], {}, ValueError, "same length"),
        ([w(8, 4), torch.ones(8, 4, dtype=torch.int64, device=device)], [i(1), i(2)], {}, TypeError,
         r"weights\[1\]"),
        ([w(8, 4, dtype=torch.float64)], [i(1)], {}, TypeError, r"weights\[0\] must be float32"),
        ([w(8, 4), w(8)], [i(1), i(2)], {}, ValueError, r"weights\[1\] must have at least 2 dims"),
        ([w(8, 4)], [torch.tensor([1.0], device=device)], {}, TypeError, r"pruned_idxs\[0\] must be an integer"),
        ([w(8, 4)], [i(1, 2).reshape(1, 2)], {}, ValueError, r"pruned_idxs\[0\] must be a 1-D"),
        ([w(8, 4), w(3, 4)], [i(1), i(0, 1, 2, 0)], {}, ValueError, r"pruned_idxs\[1\] has 4 indices"),
        ([w(8, 4), w(3, 4)], [i(1), i(0, 3)], {}, ValueError,
         r"pruned_idxs\[1\]: filter indices must lie in \[0, 3\)"),
        ([w(8, 4)], [i(-1, 2)], {}, ValueError, r"pruned_idxs\[0\]: filter indices must lie"),
        ([w(8, 4), w(3, 4)], [i(1), i(2, 2)], {}, ValueError, r"pruned_idxs\[1\]: filter indices must be distinct"),
        ([w(8, 4), w(3, 4, dtype=torch.float16)], [i(1), i(1, 1)], {}, ValueError, r"pruned_idxs\[1\].*distinct"),
        ([w(8, 4), torch.randn(3, 4, device="meta")], [i(1), i(2)], {}, ValueError, r"weights\[1\] is on meta"),
        ([w(8, 4)], [torch.tensor([1], device="meta")], {}, ValueError, r"pruned_idxs\[0\] is on meta"),
        ([w(8, 4)], [i(1)], {"variant": "orth"}, ValueError, "variant must be one of"),
        ([w(8, 4)], [i(1)], {"reduction": "none"}, ValueError, "reduction must be one of"),
    ]


@pytest.mark.parametrize("k", range(len(_gram_bad("cpu"))))
def test_bad_gram_inputs(checked, k):
    weights, idxs, kwargs, error, message = _gram_bad(checked.device)[k]
    with pytest.raises(error, match=message):
        checked.ops.gram_penalty_multi(weights, idxs, **kwargs)
    if isinstance(weights, list) and all(isinstance(w, torch.Tensor) for w in weights) and len(weights) == len(idxs):
        grads = [torch.zeros_like(w) for w in weights]
        with pytest.raises(error, match=message):
            checked.ops.add_gram_penalty_grad_(weights, grads, idxs, 1.0, **kwargs)
        assert all(not g.any() for g in grads if g.device.type != "meta")


def _add_grad_bad(device):
    def z(*shape, **kwargs):
        return torch.zeros(shape, **{"device": device, **kwargs})

    return [
        # (grads, scale, exception, message) for weights [w(8, 4), w(3, 2, 3, 3)]
        ([z(8, 4)], 1.0, ValueError, "same length"),
        ([z(8, 4), z(3, 18)], 1.0, ValueError, r"grads\[1\] has shape"),
        ([z(8, 4, dtype=torch.float16), z(3, 2, 3, 3)], 1.0, TypeError, r"grads\[0\] has dtype"),
        ([z(8, 8)[:, :4], z(3, 2, 3, 3)], 1.0, ValueError, r"grads\[0\] must be dense"),
        ([z(8, 4), torch.zeros(3, 2, 3, 3, device="meta")], 1.0, ValueError, r"grads\[1\] is on"),
        ([z(8, 4), z(3, 2, 3, 3)], z(1), ValueError, "0-d"),
        ([z(8, 4), z(3, 2, 3, 3)], "1", TypeError, "scale"),
        ([z(8, 4), z(3, 2, 3, 3)], float("nan"), TypeError, "finite"),
    ]


@pytest.mark.parametrize("k", range(len(_add_grad_bad("cpu"))))
def test_bad_add_grad_inputs(checked, k):
    grads, scale, error, message = _add_grad_bad(checked.device)[k]
    weights = [torch.randn(8, 4, device=checked.device), torch.randn(3, 2, 3, 3, device=checked.device)]
    idxs = [torch.tensor([1], device=checked.device), torch.tensor([2], device=checked.device)]
    with pytest.raises(error, match=message):
        checked.ops.add_gram_penalty_grad_(weights, grads, idxs, scale)
    assert all(not g.any() for g in grads if g.device.type != "meta")


def _bn_bad(device):
    def i(*values):
        return torch.tensor(values, device=device)

    def w(*shape, dtype=torch.float32):
        return torch.randn(shape, device=device).to(dtype)

    return [
        # (gammas, betas, pruned_idxs, exception, message)
        ([w(8), w(8, 1)], [w(8), w(8, 1)], [i(1), i(2)], ValueError, r"gammas\[1\] must have 1 dims"),
        ([w(8), w(5)], [w(8), w(4)], [i(1), i(2)], ValueError, r"betas\[1\] has shape"),
        ([w(8)], [w(8, dtype=torch.float16)], [i(1)], TypeError, r"betas\[0\] has dtype"),
        ([w(8), w(5)], [w(8), w(5)], [i(1), i(5)], ValueError, r"pruned_idxs\[1\]: filter indices must lie"),
        ([w(8), w(5)], [w(8)], [i(1), i(2)], ValueError, "same length"),
        ([w(8, dtype=torch.float64)], [w(8)], [i(1)], TypeError, r"gammas\[0\] must be float32"),
    ]


@pytest.mark.parametrize("k", range(len(_bn_bad("cpu"))))
def test_bad_bn_inputs(checked, k):
    gammas, betas, idxs, error, message = _bn_bad(checked.device)[k]
    with pytest.raises(error, match=message):
        checked.ops.bn_penalty(gammas, betas, idxs)
    grads = [torch.zeros_like(g) for g in gammas]
    with pytest.raises(error, match=message):
        checked.ops.add_bn_penalty_grad_(gammas, betas, grads, [torch.zeros_like(g) for g in gammas], idxs, 1.0)
    assert all(not g.any() for g in grads)


# --- torch.compile ------------------------------------------------------------------------------------------------


def test_compiles_fullgraph(case, seed):
    """``penalty`` and ``apply_gradients`` compile without graph breaks and give the eager values."""
    torch._dynamo.reset()
    weights, idxs = random_layers(seed, device=case.device, count=3)
    gammas, betas, bn_idxs = random_bn(seed, device=case.device)
    ops = case.ops

    def penalty(ws, gs, bs):
        return 1000 * ops.gram_penalty_multi(ws, idxs, "decorrelate", "mean") + ops.bn_penalty(gs, bs, bn_idxs)

    def apply_gradients(ws, gs, bs, grads, gamma_grads, beta_grads, strength):
        ops.add_gram_penalty_grad_(ws, grads, idxs, 1000 * strength, "decorrelate", "mean")
        ops.add_bn_penalty_grad_(gs, bs, gamma_grads, beta_grads, bn_idxs, strength)

    params = weights + gammas + betas
    eager = penalty(weights, gammas, betas)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(penalty, fullgraph=True, backend="aot_eager")(weights, gammas, betas)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    for g, e in zip(torch.autograd.grad(compiled, params), eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    n, m = len(weights), len(gammas)
    buffers = {}
    for name, fn in (("eager", apply_gradients), ("compiled", torch.compile(apply_gradients, fullgraph=True,
                                                                              backend="aot_eager"))):
        buffers[name] = [torch.zeros_like(p) for p in params]
        b = buffers[name]
        fn([p.detach() for p in weights], [p.detach() for p in gammas], [p.detach() for p in betas],
           b[:n], b[n:n + m], b[n + m:], torch.tensor(1.0, device=case.device))
    for b, e in zip(buffers["compiled"], buffers["eager"]):
        torch.testing.assert_close(b, e, rtol=1e-6, atol=1e-7)
