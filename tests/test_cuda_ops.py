"""tpp_kernels.cuda — the csrc/ extension (torch.ops.tpp_cuda) — beyond the backend contract
(test_backend_contract.py): the build, the ops' registration and own checks, launch splitting, missing BN biases,
and the regularizer on this backend.

The session fixture ``ops`` loads the extension: the checkout's ``tpp_kernels/_C`` if built, else the just-in-time build
(CUDA kernels for sm_90 included when a CUDA toolkit is found; cached by source hash); without either, the tests that
need it are skipped. The loader's own tests set up the checkout state they assume (fixture ``checkout``).
"""
import importlib
import importlib.machinery
import importlib.util
import shutil
import sys

import pytest
import torch
from test_backend_contract import (
    bn_expected,
    check_gram,
    cuda_ops,
    random_bn,
    random_layer,
)
from test_regularizer import TINY, make_net
from tolerances import TOLERANCES

import tpp_kernels
from tpp import TPPRegularizer
from tpp_kernels import cuda_build

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def ops():
    return cuda_ops()


@pytest.fixture(params=DEVICES)
def case(ops, request):
    """The cuda backend on each device, as test_backend_contract.check_gram takes it."""
    return type("Case", (), {"name": "cuda", "device": request.param, "ops": ops})


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


@pytest.fixture(params=["clean", "prebuilt"])
def checkout(request, tmp_path, monkeypatch):
    """The checkout as the loader finds it: without a built library, or with one where ``TPP_BUILD_CUDA=1 pip
    install -e .`` leaves it (here a file that is no library, in a directory added to ``tpp_kernels.__path__``)."""
    if request.param == "prebuilt":
        (tmp_path / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a library")
        monkeypatch.setattr(tpp_kernels, "__path__", [*tpp_kernels.__path__, str(tmp_path)])
    return request.param


def _reimport_cuda(monkeypatch, prebuilt: bool):
    """Import ``tpp_kernels.cuda`` afresh (the loaded module is restored afterwards) with the JIT build failing and,
    unless ``prebuilt``, no ``tpp_kernels/_C`` library whatever the checkout holds."""
    def cannot_build(**kwargs):
        raise cuda_build.BuildError("ninja is not installed (pip install ninja)")

    find_spec = importlib.util.find_spec
    if not prebuilt:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, package=None: None if name == "tpp_kernels._C" else find_spec(name, package))
    monkeypatch.setattr(cuda_build, "build", cannot_build)
    monkeypatch.delitem(sys.modules, "tpp_kernels.cuda", raising=False)
    return importlib.import_module("tpp_kernels.cuda")


def test_import_error_when_neither_built_nor_buildable(checkout, monkeypatch):
    with pytest.raises(ImportError, match="neither built nor buildable here: ninja is not installed"):
        _reimport_cuda(monkeypatch, prebuilt=False)
    with pytest.raises(ValueError, match="backend 'cuda' is unavailable: .*ninja"):
        TPPRegularizer(make_net(0, torch.float32), 0.5, schedule=TINY, backend="cuda")


def test_import_error_when_the_prebuilt_library_cannot_be_loaded(checkout, monkeypatch):
    if checkout != "prebuilt":
        pytest.skip("needs a prebuilt library")
    if importlib.util.find_spec("tpp_kernels._C").origin.startswith(str(cuda_build.SOURCE_DIR.parent)):
        pytest.skip("needs the dummy library (the checkout's own tpp_kernels/_C is found first)")
    with pytest.raises(ImportError, match="_C.*cannot be loaded.*rebuild it .* or delete it"):
        _reimport_cuda(monkeypatch, prebuilt=True)


def test_many_layers_in_one_call(case, seed):
    """More layers than one launch's parameter space holds (~50): the CUDA launches are split."""
    gen = torch.Generator().manual_seed(seed)
    layers = [random_layer(gen, int(torch.randint(1, 12, (), generator=gen)), (3,), 0) for _ in range(130)]
    layers = [(w.detach().to(case.device).requires_grad_(),
               torch.randperm(w.shape[0], generator=gen)[:int(torch.randint(0, w.shape[0] + 1, (), generator=gen))]
               .to(case.device)) for w, _ in layers]
    check_gram(case, [w for w, _ in layers], [i for _, i in layers])


@pytest.mark.parametrize("device", DEVICES)
def test_bn_without_bias(ops, device, seed):
    """A BatchNorm without γ or β (None) contributes nothing and has no gradient (the torch backend does the same;
    the Triton backend takes both vectors of every layer)."""
    gammas, betas, idxs = random_bn(seed, device=device)
    betas[1] = None
    loss = ops.bn_penalty(gammas, betas, idxs)
    present = gammas + [b for b in betas if b is not None]
    expected = sum(x.detach().double()[i].square().sum() for x, i in zip(gammas + betas, idxs + idxs)
                   if x is not None)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0)
    for x, g, idx in zip(present, torch.autograd.grad(loss, present),
                         idxs + [i for b, i in zip(betas, idxs) if b is not None]):
        torch.testing.assert_close(g.double(), bn_expected(x, idx))
    grads = [torch.zeros_like(g) for g in gammas]
    ops.add_bn_penalty_grad_([g.detach() for g in gammas], [None] * len(gammas), grads, [None] * len(gammas), idxs,
                             0.25)
    for x, g, idx in zip(gammas, grads, idxs):
        torch.testing.assert_close(g.double(), 0.25 * bn_expected(x, idx))
    with pytest.raises(ValueError, match=r"beta_grads\[0\] is None"):
        ops.add_bn_penalty_grad_(gammas[:1], betas[:1], [torch.zeros_like(gammas[0])], [None], idxs[:1], 1.0)


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


# --- the C++ ops' own checks ----------------------------------------------------------------------------------------


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

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["penalty", "apply_gradients"])
def test_regularizer_cuda_backend_equals_torch_backend(ops, path, device, seed, monkeypatch):
    nets = {name: make_net(seed, torch.float32).to(device) for name in ("torch", "cuda", "env")}
    regs = {"torch": TPPRegularizer(nets["torch"], 0.5, schedule=TINY, backend="torch"),
            "cuda": TPPRegularizer(nets["cuda"], 0.5, schedule=TINY, backend="cuda")}
    monkeypatch.setenv("TPP_BACKEND", "cuda")
    regs["env"] = TPPRegularizer(nets["env"], 0.5, schedule=TINY)
    monkeypatch.delenv("TPP_BACKEND")
    assert [reg.backend.name for reg in regs.values()] == ["torch", "cuda", "cuda"]
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(device)
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
