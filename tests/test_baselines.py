"""Baselines: KernOrth/OrthConv losses (zero on orthogonal weights, float64 gradcheck, OrthConv against the explicit
convolution matrix), the orthogonality regularizer, OrthP (exact isometry of a pruned linear MLP), re-initialization,
and the METHODS registry."""
import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_to_reference
from torch import nn

from tpp import GrowingSchedule, TPPRegularizer, prune_model, select_filters
from tpp.baselines import (
    DEFAULT_ORTH_WEIGHTS,
    METHODS,
    Method,
    OrthRegularizer,
    get_method,
    kernorth_loss,
    make_regularizer,
    orthconv_loss,
    orthogonalize_,
    reinitialize_,
)
from tpp.metrics import jacobian_singular_values
from tpp.models import MLP, digits_cnn

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """rows × cols with orthonormal rows (rows <= cols) or columns (rows > cols)."""
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), dtype=D, generator=gen))
    return q.T if rows <= cols else q


def _delta_orthogonal(out_c: int, in_c: int, kh: int, kw: int, gen: torch.Generator) -> torch.Tensor:
    """A conv kernel whose only nonzero tap is an orthonormal-row matrix at the spatial centre."""
    k = torch.zeros(out_c, in_c, kh, kw, dtype=D)
    k[:, :, kh // 2, kw // 2] = _orthonormal(out_c, in_c, gen)
    return k


def test_registry_names_the_methods_of_the_brief():
    for name in ("tpp", "l1", "greg", "diagonal", "no-bn", "kernorth", "orthconv", "orthp", "scratch",
                 "l1-kernorth", "l1-orthconv"):
        assert isinstance(METHODS[name], Method) and METHODS[name].name == name and METHODS[name].description
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*tpp, l1, greg"):
        get_method("nope")
    assert get_method(METHODS["l1"]) is METHODS["l1"]
    assert [m for m in METHODS if METHODS[m].zero_out] == ["tpp", "greg", "diagonal", "no-bn"]
    assert METHODS["orthp"].post_removal == "orthp" and METHODS["scratch"].post_removal == "reinit"
    assert METHODS["kernorth"].select == "after-regularization"


def test_make_regularizer_configures_each_method():
    model = digits_cnn()
    sched = GrowingSchedule(delta=0.5, interval=1, stabilize_iters=10, zero_out_interval=1)
    args = (model, 0.5, ("features.0",))
    assert make_regularizer("l1", *args, schedule=sched) is None
    assert make_regularizer("orthp", *args, schedule=sched) is None
    tpp = make_regularizer("tpp", *args, schedule=sched)
    assert isinstance(tpp, TPPRegularizer) and tpp.variant == "decorrelate" and tpp.bn and tpp.gram_weight == 1000
    greg = make_regularizer("greg", *args, schedule=sched)
    assert greg.gram_weight == 0 and not greg.bn and greg.weight_l2
    assert make_regularizer("diagonal", *args, schedule=sched).variant == "diagonal"
    assert make_regularizer("no-bn", *args, schedule=sched).bn is False
    assert set(tpp.pruned) == {"features.3", "features.7"}
    kern = make_regularizer("kernorth", *args, schedule=sched)
    assert isinstance(kern, OrthRegularizer) and kern.weight == DEFAULT_ORTH_WEIGHTS["kernorth"] and kern.squared
    orth = make_regularizer("orthconv", *args, schedule=sched, orth_weight=0.5)
    assert orth.weight == 0.5 and not orth.squared
    assert [n for n, _ in orth.layers] == ["features.0", "features.3", "features.7", "classifier"]


def test_greg_penalty_is_half_r_squared_norm_of_pruned_rows(seed):
    torch.manual_seed(seed)
    model = MLP(16, 12, 3, 5)
    reg = make_regularizer("greg", model, 0.5, schedule=GrowingSchedule(delta=0.3, interval=1, stabilize_iters=10,
                                                                        zero_out_interval=1))
    for _ in range(4):
        reg.step()
    r = reg.strength
    expected = sum(0.5 * r * (m.weight[idx].double().square().sum() + m.bias[idx].double().square().sum())
                   for m, idx in ((model.layers[int(n.split(".")[1])], i) for n, i in reg.pruned.items()))
    assert reg.penalty().item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (8, 3, 3, 3), (30, 2, 3, 3)])
def test_kernorth_zero_on_orthogonal_and_gradcheck(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    w = _orthonormal(rows, cols, gen).reshape(shape)
    assert kernorth_loss(w).item() < 1e-24
    assert kernorth_loss(w, squared=False).item() < 1e-12
    w = (torch.randn(shape, dtype=D, generator=gen) * 0.3).requires_grad_()
    assert kernorth_loss(w).item() > 0.01
    assert torch.autograd.gradcheck(kernorth_loss, (w,))
    assert torch.autograd.gradcheck(lambda x: kernorth_loss(x, squared=False), (w,))


def test_kernorth_uses_the_smaller_gram():
    w = torch.randn(3, 10, dtype=D)
    g = w @ w.T
    assert kernorth_loss(w).item() == pytest.approx((g - torch.eye(3, dtype=D)).square().sum().item())
    assert kernorth_loss(w.T).item() == pytest.approx(kernorth_loss(w).item())


@pytest.mark.parametrize("out_c,in_c,kh,kw,stride", [(8, 12, 3, 3, 1), (8, 12, 3, 3, 2), (4, 6, 5, 5, 2),
                                                      (5, 7, 3, 1, 1), (6, 10, 1, 1, 1)])
def test_orthconv_zero_on_delta_orthogonal_kernels(out_c, in_c, kh, kw, stride, seed):
    gen = torch.Generator().manual_seed(seed)
    k = _delta_orthogonal(out_c, in_c, kh, kw, gen)
    assert orthconv_loss(k, stride, squared=True).item() < 1e-24
    assert orthconv_loss(k, stride).item() < 1e-12
    assert orthconv_loss(_orthonormal(out_c, in_c, gen)).item() < 1e-12   # Linear weights: matrix form
    assert orthconv_loss(k * 1.1, stride).item() > 0.1


@pytest.mark.parametrize("stride,squared", [(1, False), (2, False), (1, True), (2, True)])
def test_orthconv_gradcheck_float64(stride, squared, seed):
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(5, 3, 3, 3, dtype=D, generator=gen) * 0.4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: orthconv_loss(x, stride, squared), (k,))


def _conv_matrix(kernel: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """The explicit matrix of conv2d (no padding) on a size×size input: rows = (out channel, y, x)."""
    c = kernel.shape[1]
    basis = torch.eye(c * size * size, dtype=kernel.dtype).reshape(-1, c, size, size)
    out = F.conv2d(basis, kernel, stride=stride)          # [inputs, N, oh, ow]
    return out.reshape(out.shape[0], -1).T, out.shape[-2:]


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 2), (2, 1)])
def test_orthconv_is_the_row_orthogonality_of_the_convolution_matrix(k, stride, seed):
    """‖Conv(K,K) − I_δ‖² equals Σ over the rows of one interior output position of ‖(MMᵀ − I) row‖²,
    with M the explicit convolution matrix (every overlapping shift present around that position)."""
    gen = torch.Generator().manual_seed(seed)
    n_out, c = 4, 3
    kernel = torch.randn(n_out, c, k, k, dtype=D, generator=gen)
    size = k + stride * 2 * (k + 1)
    m, (oh, ow) = _conv_matrix(kernel, size, stride)
    gram = m @ m.T - torch.eye(m.shape[0], dtype=D)
    y, x = oh // 2, ow // 2
    rows = [a * oh * ow + y * ow + x for a in range(n_out)]
    expected = gram[rows].square().sum()
    assert orthconv_loss(kernel, stride, squared=True).item() == pytest.approx(expected.item(), rel=1e-10)


def test_orth_regularizer_gradients_match_autograd(seed):
    torch.manual_seed(seed)
    model = digits_cnn().double()
    reg = OrthRegularizer(model, "orthconv", weight=0.3)
    params = [m.weight for _, m in reg.layers]
    expected = torch.autograd.grad(reg.penalty(), params)
    model.zero_grad()
    reg.apply_gradients()
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)
    assert reg.strength == 0.3 and reg.phase == "constant" and reg.pruned == {}
    reg.step()
    state = reg.state_dict()
    other = OrthRegularizer(model, "orthconv", weight=0.3)
    other.load_state_dict(state)
    assert other.iteration == 1
    with pytest.raises(ValueError, match="weight"):
        OrthRegularizer(model, "orthconv", weight=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="kind must be one of"):
        OrthRegularizer(model, "svd")


def test_orth_regularizer_lowers_its_loss():
    torch.manual_seed(0)
    model = MLP(16, 12, 4, 5)
    reg = OrthRegularizer(model, "kernorth", weight=1.0)
    before = reg.penalty().item()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(50):
        opt.zero_grad()
        reg.apply_gradients()
        opt.step()
    assert reg.penalty().item() < 0.5 * before


@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.9])
def test_orthp_gives_exact_isometry_on_a_pruned_linear_mlp(ratio, seed):
    """Widths 64 → w → … → w → 10 with w ≤ 64: every layer gets orthonormal rows, so J Jᵀ = I."""
    torch.manual_seed(seed)
    model = MLP(64, 100, 7, 10).double()
    small = prune_model(model, select_filters(model, ratio))
    changed = orthogonalize_(small)
    assert changed == [f"layers.{i}" for i in range(7)]
    sv = jacobian_singular_values(small, torch.randn(4, 64, dtype=D))
    torch.testing.assert_close(sv, torch.ones_like(sv), atol=1e-10, rtol=0)
    for layer in small.layers:
        w = layer.weight
        torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0], dtype=D), atol=1e-12, rtol=0)


def test_orthp_tall_and_conv_weights_and_idempotence(seed):
    torch.manual_seed(seed)
    tall = nn.Linear(4, 9).double()
    conv = nn.Conv2d(3, 5, 3).double()
    wide_conv = nn.Conv2d(2, 30, 3).double()      # 30 filters of 18 numbers: columns orthonormal
    net = nn.Sequential(tall, conv, wide_conv)
    bias = tall.bias.clone()
    orthogonalize_(net)
    torch.testing.assert_close(tall.weight.T @ tall.weight, torch.eye(4, dtype=D), atol=1e-12, rtol=0)
    w = conv.weight.reshape(5, -1)
    torch.testing.assert_close(w @ w.T, torch.eye(5, dtype=D), atol=1e-12, rtol=0)
    w = wide_conv.weight.reshape(30, -1)
    torch.testing.assert_close(w.T @ w, torch.eye(18, dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(tall.bias, bias)
    snapshot = [p.clone() for p in net.parameters()]
    orthogonalize_(net)   # already orthonormal: the sign convention makes QR return it unchanged
    for p, q in zip(net.parameters(), snapshot):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)
    orthogonalize_(net, layers=["0"], gain=2.0)
    torch.testing.assert_close(tall.weight.T @ tall.weight, 4 * torch.eye(4, dtype=D), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="not Conv2d"):
        orthogonalize_(net, layers=["nope"])


def test_reinitialize_resets_weights_and_bn_statistics():
    model = digits_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.123)
        model.features[1].running_mean.fill_(5)
    reinitialize_(model, seed=3)
    assert not torch.all(model.features[0].weight == 0.123)
    assert torch.all(model.features[1].weight == 1) and torch.all(model.features[1].running_mean == 0)
    again = digits_cnn()
    reinitialize_(again, seed=3)
    torch.testing.assert_close(again.features[0].weight, model.features[0].weight)


@pytest.mark.parametrize("name", ["digits_resnet", "digits_vit"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_on_groups_and_heads(name, method, seed):
    """Each method's steps (regularizer, selection, removal, post-removal transform, finetuning regularizer) on a
    model whose units are residual groups, or attention heads; TPP-family removal is exact after the zero-out."""
    from tpp.models import build_model

    torch.manual_seed(seed)
    model = build_model(name).double().eval()
    spec = get_method(method)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    schedule = GrowingSchedule(delta=0.5, interval=1, stabilize_iters=20, zero_out_interval=2)
    reg = make_regularizer(spec, model, 0.5, schedule=schedule)
    if reg is not None:
        reg.penalty()
        reg.apply_gradients()
        reg.step()
    pruned = select_filters(model, 0.5)
    assert any(model.get_submodule(n).__class__.__name__ == "MultiheadAttention" for n in pruned) == (
        name == "digits_vit")
    if spec.zero_out:
        reg.zero_pruned()
        pruned = reg.pruned
    small = prune_model(model, pruned)
    if spec.zero_out:
        with torch.no_grad():
            assert_close_to_reference(small(x), model(x), torch.float64, method)
    if spec.post_removal == "orthp":
        assert orthogonalize_(small)
    elif spec.post_removal == "reinit":
        reinitialize_(small, seed=seed)
    if spec.finetune_regularizer:
        OrthRegularizer(small, spec.finetune_regularizer).penalty().backward()
    assert small(x).shape == (4, 10) and torch.isfinite(small(x)).all()


def test_reinitialize_resets_attention_heads(seed):
    from tpp.models import build_model

    model = build_model("digits_vit")
    small = prune_model(model, select_filters(model, "*attn:0.5"))
    before = small.blocks[0].attn.in_proj_weight.clone()
    reinitialize_(small, seed=seed)
    assert not torch.equal(small.blocks[0].attn.in_proj_weight, before)
    assert torch.count_nonzero(small.blocks[0].attn.in_proj_bias) == 0
