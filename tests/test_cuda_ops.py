"""tpp.cuda_ops — the csrc/ extension (torch.ops.tpp_cuda) — against float64 references (tpp.reference).

The session fixture ``ops`` builds the extension just in time (CUDA kernels for sm_90 included when a CUDA toolkit is
found; cached by source hash) and loads it; without a CUDA toolkit every test here is skipped. The ops' host code
(buffers, GEMMs, launch tables) is shared by CPU and CUDA, so the CPU runs check all of it but the CUDA kernel bodies;
on a machine with a GPU the same tests also run on CUDA tensors.
"""
import importlib
import shutil
import sys

import pytest
import torch
from test_regularizer import TINY, make_net
from tolerances import TOLERANCES, assert_close_to_reference

from tpp import TPPRegularizer, cuda_build, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def ops():
    if cuda_build.cuda_home() is None:
        pytest.skip("no CUDA toolkit found (nvcc, CUDA_HOME): the tpp_cuda extension is not built here")
    import tpp.cuda_ops  # builds the extension on first use (a minute), then loads it from the cache

    return tpp.cuda_ops


# --- random layers ----------------------------------------------------------------------------------------------


def random_layer(gen, n, shape, p, dtype=torch.float32, device="cpu", channels_last=False):
    w = torch.randn((n, *shape), generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        w = w.to(memory_format=torch.channels_last)
    idx = torch.randperm(n, generator=gen)[:p].to(device)  # unsorted on purpose
    return w.requires_grad_(), idx


def random_layers(seed, dtype=torch.float32, device="cpu", count=None):
    """Conv or linear layers with odd N and D, p among 0, 1, N−1, N and random, some channels-last."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(count or int(torch.randint(1, 5, (), generator=gen))):
        n = int(torch.randint(1, 80, (), generator=gen))
        conv = bool(torch.rand((), generator=gen) < 0.5)
        shape = (int(torch.randint(1, 9, (), generator=gen)), 3, 3) if conv else (int(torch.randint(1, 90, (),
                                                                                                     generator=gen)),)
        p = [0, 1, n - 1, n, int(torch.randint(0, n + 1, (), generator=gen))][int(torch.randint(0, 5, (),
                                                                                                generator=gen))]
        layers.append(random_layer(gen, n, shape, p, dtype, device, channels_last=conv and n % 2 == 1))
    return [w for w, _ in layers], [idx for _, idx in layers]


def reference_gram(weights, idxs, reduction="mean", variant="decorrelate"):
    """(Σ_l gram penalty, its gradients) in float64, from the weights' own (rounded) values."""
    w64 = [w.detach().double().requires_grad_() for w in weights]
    loss = sum(reference.gram_penalty(w, idx.long(), variant, reduction) for w, idx in zip(w64, idxs))
    return loss.detach(), torch.autograd.grad(loss, w64, allow_unused=True, materialize_grads=True)


def check_gram(ops, weights, idxs, dtype, reduction="mean", variant="decorrelate"):
    loss = ops.gram_penalty_multi(weights, idxs, variant, reduction)
    grads = torch.autograd.grad(loss, weights, allow_unused=True, materialize_grads=True)
    ref_loss, ref_grads = reference_gram(weights, idxs, reduction, variant)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_to_reference(loss, ref_loss, torch.float32, "loss")  # fp32 accumulation in every dtype
    for i, (g, ref_g, w) in enumerate(zip(grads, ref_grads, weights)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close_to_reference(g, ref_g, dtype, f"grad of layer {i}")


# --- build ------------------------------------------------------------------------------------------------------


def test_library_is_built_from_these_sources_with_cuda_kernels(ops):
    assert torch.ops.tpp_cuda.source_hash() == cuda_build.source_hash()
    if torch.version.cuda is not None:  # a CUDA toolkit was found (else the fixture skips): sm_90 compiled
        assert ops.has_cuda_kernels()


def test_build_directory_is_keyed_on_the_sources(tmp_path, monkeypatch):
    copy = tmp_path / "csrc"
    shutil.copytree(cuda_build.SOURCE_DIR, copy)
    monkeypatch.setattr(cuda_build, "SOURCE_DIR", copy)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    before = cuda_build.build_dir(with_cuda=True)
    assert before.parent == tmp_path / "ext"
    assert cuda_build.build_dir(with_cuda=False) != before
    (copy / "tpp_ops.h").write_text((copy / "tpp_ops.h").read_text() + "\n// edited\n")
    assert cuda_build.build_dir(with_cuda=True) != before
    edited = cuda_build.build_dir(with_cuda=True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert cuda_build.build_dir(with_cuda=True) not in (before, edited)


def test_a_finished_build_is_reused_without_compiling(tmp_path, monkeypatch):
    """A directory is used as it is only once its build completed (the marker is written last)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = cuda_build.build_dir(with_cuda=False)
    directory.mkdir(parents=True)
    (directory / "tpp_cuda.so").write_bytes(b"")
    (directory / "build.done").write_text("0 s\n")
    assert cuda_build.build(with_cuda=False) == directory / "tpp_cuda.so"


def test_import_error_when_neither_built_nor_buildable(ops, monkeypatch):
    def cannot_build(**kwargs):
        raise cuda_build.BuildError("ninja is not installed (pip install ninja)")

    monkeypatch.setattr(cuda_build, "build", cannot_build)
    monkeypatch.delitem(sys.modules, "tpp.cuda_ops")  # restored afterwards
    with pytest.raises(ImportError, match="neither built nor buildable here: ninja is not installed"):
        importlib.import_module("tpp.cuda_ops")
    with pytest.raises(ValueError, match="backend 'cuda' is unavailable: .*ninja"):
        TPPRegularizer(make_net(0, torch.float32), 0.5, schedule=TINY, backend="cuda")


# --- gram: values and gradients against float64 -------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_random_layers(ops, dtype, reduction, device, seed):
    for k in range(3):
        weights, idxs = random_layers(seed + k, dtype, device)
        check_gram(ops, weights, idxs, dtype, reduction)


@pytest.mark.parametrize("p", ["empty", "one", "all_but_one", "all"])
@pytest.mark.parametrize("n, shape", [(1, (5,)), (2, (1,)), (17, (3, 3, 3)), (67, (129,))])
def test_gram_pruned_set_sizes(ops, n, shape, p, seed):
    p = {"empty": 0, "one": 1, "all_but_one": max(n - 1, 0), "all": n}[p]
    w, idx = random_layer(torch.Generator().manual_seed(seed), n, shape, p)
    check_gram(ops, [w], [idx], torch.float32, "sum")


def test_gram_spans_several_partials(ops, seed):
    """p·N above one reduction chunk (4096 entries): several partials summed in order."""
    gen = torch.Generator().manual_seed(seed)
    weights, idxs = zip(*[random_layer(gen, 150, (13,), 70), random_layer(gen, 90, (7, 1, 1), 89)])
    check_gram(ops, list(weights), list(idxs), torch.float32)


def test_gram_by_hand(ops):
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    loss = ops.gram_penalty(w, torch.tensor([2]), reduction="sum")  # tpp/reference test: 0+4+16+0+4
    assert loss.item() == 24.0
    loss.backward()
    # 4 (G⊙M) W: rows of G⊙M are [0,0,0], [0,0,2], [0,2,4]
    assert w.grad.tolist() == [[0.0, 0.0], [0.0, 16.0], [8.0, 40.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_index_dtypes_and_layouts(ops, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w, idx = random_layer(gen, 23, (5, 3, 3), 9, dtype, channels_last=True)
    base = torch.randn(19, 40, generator=gen).to(dtype).requires_grad_()
    check_gram(ops, [w, base[:, ::2]], [idx.to(torch.int32), torch.tensor([0, 7, 18], dtype=torch.uint8)], dtype)
    grad = torch.autograd.grad(ops.gram_penalty(w, idx), w)[0]
    assert grad.is_contiguous(memory_format=torch.channels_last)  # the gradient keeps the weight's layout


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_diagonal_variant_runs_the_reference(ops, reduction, seed):
    weights, idxs = random_layers(seed)
    check_gram(ops, weights, idxs, torch.float32, reduction, variant="diagonal")
    grads = [torch.zeros_like(w) for w in weights]
    ops.add_gram_penalty_grad_([w.detach() for w in weights], grads, idxs, 2.0, "diagonal", reduction)
    for g, ref_g in zip(grads, reference_gram(weights, idxs, reduction, "diagonal")[1]):
        assert_close_to_reference(g, 2 * ref_g, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_layer_equals_sum_of_layers(ops, device, seed):
    weights, idxs = random_layers(seed, device=device, count=6)
    w2, i2 = random_layers(seed + 1, torch.float16, device, count=3)
    weights, idxs = weights + w2, idxs + i2
    loss = ops.gram_penalty_multi(weights, idxs)
    grads = torch.autograd.grad(loss, weights)
    terms = [ops.gram_penalty(w, idx) for w, idx in zip(weights, idxs)]
    torch.testing.assert_close(loss, torch.stack(terms).sum(), rtol=1e-6, atol=0)
    for w, g, term in zip(weights, grads, terms):  # the same arithmetic (BLAS may pick kernels by alignment)
        assert_close_to_reference(g, torch.autograd.grad(term, w)[0], w.dtype)


def test_many_layers_in_one_call(ops, seed):
    """More layers than one launch's parameter space holds (~50): the CUDA launches are split."""
    gen = torch.Generator().manual_seed(seed)
    layers = [random_layer(gen, int(torch.randint(1, 12, (), generator=gen)), (3,), 0) for _ in range(130)]
    layers = [(w, torch.randperm(w.shape[0], generator=gen)[:int(torch.randint(0, w.shape[0] + 1, (),
                                                                                    generator=gen))])
              for w, _ in layers]
    check_gram(ops, [w for w, _ in layers], [i for _, i in layers], torch.float32)


def test_deterministic(ops, seed):
    weights, idxs = random_layers(seed, count=4)
    first = ops.gram_penalty_multi(weights, idxs)
    assert all(torch.equal(first, ops.gram_penalty_multi(weights, idxs)) for _ in range(3))


def test_nothing_pruned_is_zero(ops, seed):
    weights, _ = random_layers(seed, count=3)
    empty = [torch.zeros(0, dtype=torch.int64)] * 3
    loss = ops.gram_penalty_multi(weights, empty)
    assert loss.item() == 0.0
    assert all(not g.any() for g in torch.autograd.grad(loss, weights))
    grads = [torch.randn_like(w) for w in weights]
    before = [g.clone() for g in grads]
    ops.add_gram_penalty_grad_([w.detach() for w in weights], grads, empty, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


# --- gram: in-place path ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_grad_equals_autograd(ops, dtype, scale_kind, device, seed):
    weights, idxs = random_layers(seed, dtype, device, count=4)
    scale = 0.37 if scale_kind == "float" else torch.tensor(0.37, device=device)
    initial = [torch.randn_like(w) for w in weights]
    for w, g in zip(weights, initial):
        w.grad = g.clone()
    (scale * ops.gram_penalty_multi(weights, idxs, reduction="sum")).backward()
    grads = [g.clone() for g in initial]
    ops.add_gram_penalty_grad_([w.detach() for w in weights], grads, idxs, scale, reduction="sum")
    ref_grads = reference_gram(weights, idxs, "sum")[1]
    for w, g, g0, ref_g in zip(weights, grads, initial, ref_grads):
        assert g.stride() == g0.stride()
        # autograd rounds the penalty's gradient into the dtype before adding it: one rounding more
        assert_close_to_reference(g, w.grad, dtype)
        assert_close_to_reference(g, g0.double() + 0.37 * ref_g, dtype)


def test_add_grad_into_a_grad_of_another_layout(ops, seed):
    w, idx = random_layer(torch.Generator().manual_seed(seed), 19, (6, 3, 3), 5, channels_last=True)
    grad = torch.zeros(w.shape)  # contiguous, unlike the weight
    ops.add_gram_penalty_grad_([w.detach()], [grad], [idx], 1.0)
    assert_close_to_reference(grad, reference_gram([w], [idx])[1][0], torch.float32)


# --- BN -----------------------------------------------------------------------------------------------------------


def random_bn(seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(1, 1), (17, 0), (40, 13), (33, 32), (5000, 4500)]  # the last spans two reduction chunks
    gammas = [torch.randn(c, generator=gen).to(device, dtype).requires_grad_() for c, _ in sizes]
    betas = [torch.randn(c, generator=gen).to(device, dtype).requires_grad_() for c, _ in sizes]
    idxs = [torch.randperm(c, generator=gen)[:p].to(device) for c, p in sizes]
    return gammas, betas, idxs


def bn_expected(x, idx):
    out = torch.zeros_like(x, dtype=torch.float64)
    out[idx] = 2 * x.detach().double()[idx]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_values_and_grads(ops, dtype, device, seed):
    gammas, betas, idxs = random_bn(seed, dtype, device)
    betas[1] = None  # a BatchNorm without bias
    loss = ops.bn_penalty(gammas, betas, idxs)
    params = gammas + [b for b in betas if b is not None]
    grads = torch.autograd.grad(loss, params)
    ref_loss = sum(reference.bn_penalty(g.double(), None if b is None else b.double(), i)
                   for g, b, i in zip(gammas, betas, idxs))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_to_reference(loss, ref_loss, torch.float32)
    for x, g, idx in zip(params, grads, idxs + [i for b, i in zip(betas, idxs) if b is not None]):
        assert g.dtype == x.dtype
        assert_close_to_reference(g, bn_expected(x, idx), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_bn_add_grad_equals_autograd(ops, scale_kind, device, seed):
    gammas, betas, idxs = random_bn(seed, device=device)
    scale = 0.5 if scale_kind == "float" else torch.tensor(0.5, device=device)
    initial = [torch.randn_like(x) for x in gammas + betas]
    for x, g in zip(gammas + betas, initial):
        x.grad = g.clone()
    (scale * ops.bn_penalty(gammas, betas, idxs)).backward()
    grads = [g.clone() for g in initial]
    n = len(gammas)
    ops.add_bn_penalty_grad_([g.detach() for g in gammas], [b.detach() for b in betas], grads[:n], grads[n:],
                             idxs, scale)
    for x, g, g0, idx in zip(gammas + betas, grads, initial, idxs + idxs):
        assert torch.equal(g, x.grad)  # 2·0.5·x is exact: both paths round once
        kept = torch.ones(x.shape[0], dtype=torch.bool, device=device)
        kept[idx] = False
        assert torch.equal(g[kept], g0[kept])  # untouched, bit for bit


def test_bn_add_grad_without_bias(ops, seed):
    gammas, betas, idxs = random_bn(seed)
    grads = [torch.zeros_like(g) for g in gammas]
    ops.add_bn_penalty_grad_([g.detach() for g in gammas], [None] * len(gammas), grads, [None] * len(gammas), idxs,
                             0.25)
    for x, g, idx in zip(gammas, grads, idxs):
        torch.testing.assert_close(g.double(), 0.25 * bn_expected(x, idx))


# --- ops: registration, opcheck, torch.compile ---------------------------------------------------------------


def opcheck_cases(seed):
    gen = torch.Generator().manual_seed(seed)
    weights = [random_layer(gen, 9, (4, 3, 3), 3, channels_last=True)[0], random_layer(gen, 7, (5,), 0)[0],
               random_layer(gen, 12, (6,), 5, torch.bfloat16)[0]]
    idxs = [torch.tensor([8, 0, 4]), torch.zeros(0, dtype=torch.int64), torch.tensor([1, 3, 5, 7, 11])]
    loss, r = torch.ops.tpp_cuda.gram_penalty_fwd(weights, idxs, True)
    grads = [torch.randn_like(w) for w in weights]
    values = [torch.randn(9, generator=gen).requires_grad_(), torch.randn(12, generator=gen).half().requires_grad_()]
    bn_idx = [idxs[0], idxs[2]]
    bn_grads = [torch.randn_like(v) for v in values]
    one = torch.tensor(1.5)
    return [
        (torch.ops.tpp_cuda.gram_penalty_fwd.default, (weights, idxs, True)),
        (torch.ops.tpp_cuda.gram_penalty_fwd.default, (weights, idxs, False)),
        (torch.ops.tpp_cuda.gram_penalty_bwd.default, (one, [w.detach() for w in weights], idxs, r, True)),
        (torch.ops.tpp_cuda.gram_penalty_add_grad.default, ([w.detach() for w in weights], grads, idxs, 0.5, one,
                                                           False)),
        (torch.ops.tpp_cuda.gram_penalty_add_grad.default, ([w.detach() for w in weights], grads, idxs, 0.5, None,
                                                           True)),
        (torch.ops.tpp_cuda.bn_penalty_fwd.default, (values, bn_idx)),
        (torch.ops.tpp_cuda.bn_penalty_bwd.default, (one, [v.detach() for v in values], bn_idx)),
        (torch.ops.tpp_cuda.bn_penalty_add_grad.default, ([v.detach() for v in values], bn_grads, bn_idx, 2.0,
                                                         None)),
    ]


def test_opcheck(ops, seed):
    for op, args in opcheck_cases(seed):
        torch.library.opcheck(op, args)


def test_compiles_fullgraph(ops, seed):
    weights, idxs = random_layers(seed, count=3)
    gammas, betas, bn_idxs = random_bn(seed)

    def penalty(ws, gs, bs):
        return ops.gram_penalty_multi(ws, idxs) + ops.bn_penalty(gs, bs, bn_idxs)

    compiled = torch.compile(penalty, fullgraph=True, backend="aot_eager")
    expected = penalty(weights, gammas, betas)
    actual = compiled(weights, gammas, betas)
    torch.testing.assert_close(actual, expected)
    params = weights + gammas + betas
    for a, b in zip(torch.autograd.grad(actual, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b)


# --- bad inputs: clear errors before anything is written -------------------------------------------------------


def test_bad_gram_inputs(ops):
    w, idx = torch.randn(6, 4), torch.tensor([1, 4])
    cases = [
        (TypeError, "list or tuple", lambda: ops.gram_penalty_multi(w, [idx])),
        (ValueError, "same length", lambda: ops.gram_penalty_multi([w, w], [idx])),
        (TypeError, r"weights\[0\] must be float32", lambda: ops.gram_penalty_multi([w.double()], [idx])),
        (ValueError, r"weights\[1\] must have at least 2 dims",
         lambda: ops.gram_penalty_multi([w, torch.randn(6)], [idx, idx])),
        (TypeError, r"pruned_idxs\[0\] must be an integer", lambda: ops.gram_penalty_multi([w], [idx.float()])),
        (ValueError, r"pruned_idxs\[0\] must be a 1-D", lambda: ops.gram_penalty_multi([w], [idx[None]])),
        (ValueError, r"pruned_idxs\[1\]: filter indices must lie in \[0, 6\)",
         lambda: ops.gram_penalty_multi([w, w], [idx, torch.tensor([6])])),
        (ValueError, "lie in", lambda: ops.gram_penalty_multi([w], [torch.tensor([-1])])),
        (ValueError, "distinct", lambda: ops.gram_penalty_multi([w], [torch.tensor([2, 3, 2])])),
        (ValueError, r"weights\[1\] is on meta", lambda: ops.gram_penalty_multi([w, w.to("meta")], [idx, idx])),
        (ValueError, r"pruned_idxs\[0\] is on meta", lambda: ops.gram_penalty_multi([w], [idx.to("meta")])),
        (ValueError, "variant", lambda: ops.gram_penalty_multi([w], [idx], variant="orth")),
        (ValueError, "reduction", lambda: ops.gram_penalty_multi([w], [idx], reduction="avg")),
        (TypeError, "scale", lambda: ops.add_gram_penalty_grad_([w], [torch.zeros_like(w)], [idx], "1")),
        (ValueError, "scale", lambda: ops.add_gram_penalty_grad_([w], [torch.zeros_like(w)], [idx], torch.ones(2))),
        (ValueError, r"grads\[0\] has shape", lambda: ops.add_gram_penalty_grad_([w], [torch.zeros(6, 5)], [idx], 1.)),
        (TypeError, r"grads\[0\] has dtype",
         lambda: ops.add_gram_penalty_grad_([w], [torch.zeros(6, 4, dtype=torch.float16)], [idx], 1.0)),
        (ValueError, r"grads\[0\] must be dense", lambda: ops.add_gram_penalty_grad_([w], [torch.zeros(4, 6).t()],
                                                                                     [idx], 1.0)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


def test_failed_update_leaves_grads_untouched(ops):
    w, idx = torch.randn(6, 4), torch.tensor([1, 4])
    grads = [torch.randn(6, 4), torch.randn(6, 4)]
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="distinct"):
        ops.add_gram_penalty_grad_([w, w], grads, [idx, torch.tensor([0, 0])], 1.0)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        ops.add_gram_penalty_grad_([w, w], [grads[0], torch.zeros(3)], [idx, idx], 1.0)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))


def test_bad_bn_inputs(ops):
    g, b, idx = torch.randn(5), torch.randn(5), torch.tensor([0, 3])
    cases = [
        (ValueError, r"gammas\[0\] must be 1-D", lambda: ops.bn_penalty([g[None]], [b], [idx])),
        (ValueError, r"betas\[0\] has shape", lambda: ops.bn_penalty([g], [torch.randn(6)], [idx])),
        (TypeError, r"betas\[0\] must be float32", lambda: ops.bn_penalty([g], [b.double()], [idx])),
        (ValueError, r"pruned_idxs\[1\]: filter indices must lie in \[0, 5\)",
         lambda: ops.bn_penalty([g, g], [b, None], [idx, torch.tensor([5])])),
        (ValueError, r"beta_grads\[0\] is None",
         lambda: ops.add_bn_penalty_grad_([g], [b], [torch.zeros(5)], [None], [idx], 1.0)),
        (TypeError, r"grads\[1\] has dtype",
         lambda: ops.add_bn_penalty_grad_([g], [b], [torch.zeros(5)], [torch.zeros(5).half()], [idx], 1.0)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


def test_ops_check_their_arguments(ops):
    """Called directly, the C++ ops raise the same kinds of errors."""
    w, idx = torch.randn(6, 4), torch.tensor([1, 4])
    with pytest.raises(TypeError, match=r"weights\[0\] must be float32"):
        torch.ops.tpp_cuda.gram_penalty_fwd([w.double()], [idx], True)
    with pytest.raises(ValueError, match=r"pruned_idxs\[0\]: filter indices must be distinct"):
        torch.ops.tpp_cuda.gram_penalty_fwd([w], [torch.tensor([3, 3])], True)
    with pytest.raises(ValueError, match="r must be the contiguous float32 R"):
        torch.ops.tpp_cuda.gram_penalty_bwd(torch.tensor(1.0), [w], [idx], torch.zeros(3), True)
    with pytest.raises(ValueError, match="grad must be a 0-d floating tensor"):
        torch.ops.tpp_cuda.bn_penalty_bwd(torch.ones(2), [w[0]], [torch.tensor([1, 3])])
    with pytest.raises(ValueError, match=r"values\[0\] must be dense"):
        torch.ops.tpp_cuda.bn_penalty_fwd([w[:, 0]], [idx])


# --- TPPRegularizer(backend="cuda") -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["penalty", "apply_gradients"])
def test_regularizer_cuda_backend_equals_torch_backend(ops, path, seed, monkeypatch):
    nets = {name: make_net(seed, torch.float32) for name in ("torch", "cuda", "env")}
    regs = {"torch": TPPRegularizer(nets["torch"], 0.5, schedule=TINY, backend="torch"),
            "cuda": TPPRegularizer(nets["cuda"], 0.5, schedule=TINY, backend="cuda")}
    monkeypatch.setenv("TPP_BACKEND", "cuda")
    regs["env"] = TPPRegularizer(nets["env"], 0.5, schedule=TINY)
    monkeypatch.delenv("TPP_BACKEND")
    assert [reg.backend.name for reg in regs.values()] == ["torch", "cuda", "cuda"]
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    for name, reg in regs.items():
        reg.strength = 0.7
        loss = nets[name](x).square().sum()
        if path == "penalty":
            value = reg.penalty()
            if name != "torch":
                torch.testing.assert_close(value, regs["torch"].penalty(), rtol=1e-5, atol=0)
            (loss + value).backward()
        else:
            loss.backward()
            reg.apply_gradients()
    expected = dict(nets["torch"].named_parameters())
    for name in ("cuda", "env"):
        for pname, p in nets[name].named_parameters():
            torch.testing.assert_close(p.grad, expected[pname].grad, rtol=TOLERANCES[torch.float32][0],
                                       atol=1e-5 * expected[pname].grad.abs().max().item(), msg=pname)
