"""tpp.metrics: FLOPs against hand counts, parameters, Jacobian singular values (exactness, eval-mode
independence of samples), summary statistics, and the latency helper's protocol (not its timings)."""
import math

import pytest
import torch
import torch.nn as nn

from tpp.metrics import count_flops, count_params, jacobian_singular_values, jsv_summary, measure_latency
from tpp.models import build_model


def conv_macs(h, w, c_in, c_out, k=3):
    return h * w * c_in * c_out * k * k


def resnet_cifar_flops(depth, classes=10):
    """Hand count at 32×32: stem, then per stage one (possibly strided) block entry and 2n − 1 same-shape convs."""
    n = (depth - 2) // 6
    macs = conv_macs(32, 32, 3, 16)
    for size, c_in, c in ((32, 16, 16), (16, 16, 32), (8, 32, 64)):
        macs += conv_macs(size, size, c_in, c) + (2 * n - 1) * conv_macs(size, size, c, c)
    return 2 * (macs + 64 * classes)


def test_resnet50_flops():
    import torchvision

    flops = count_flops(torchvision.models.resnet50(weights=None), torch.randn(1, 3, 224, 224))
    assert isinstance(flops, int)
    assert round(flops / 1e9, 3) == 8.178


@pytest.mark.parametrize("depth", [20, 56])
def test_resnet_cifar_flops(depth):
    flops = count_flops(build_model(f"resnet{depth}"), torch.randn(1, 3, 32, 32))
    assert flops == resnet_cifar_flops(depth)
    if depth == 56:
        assert round(flops / 1e9, 3) == 0.251


def test_vgg19_flops():
    # (resolution, c_in, c_out, how many) for the 16 convs, then the 512→100 classifier
    convs = [(32, 3, 64, 1), (32, 64, 64, 1), (16, 64, 128, 1), (16, 128, 128, 1), (8, 128, 256, 1),
             (8, 256, 256, 3), (4, 256, 512, 1), (4, 512, 512, 3), (2, 512, 512, 4)]
    macs = sum(k * conv_macs(s, s, a, b) for s, a, b, k in convs) + 512 * 100
    assert count_flops(build_model("vgg19"), torch.randn(1, 3, 32, 32)) == 2 * macs


def test_grouped_conv_linear_and_batch():
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 8·8·8 outputs × 1·3·3
        nn.Conv2d(8, 12, 1, groups=4),  # grouped pointwise: 12·8·8 outputs × 2
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 64, 5),
    )
    per_image = 2 * (8 * 64 * 9 + 12 * 64 * 2 + 5 * 12 * 64)
    assert count_flops(model, torch.randn(1, 8, 8, 8)) == per_image
    assert count_flops(model, torch.randn(3, 8, 8, 8)) == 3 * per_image
    tokens = nn.Linear(6, 4)  # a Linear on [batch, tokens, features] costs per token
    assert count_flops(tokens, torch.randn(2, 5, 6)) == 2 * (2 * 5 * 4 * 6)


def test_flops_restores_modes_and_removes_hooks():
    model = build_model("digits_cnn").train()
    model.features[1].eval()  # a submodule the user left in eval mode
    before = {n: m.training for n, m in model.named_modules()}
    count_flops(model, torch.randn(2, 1, 8, 8))
    assert {n: m.training for n, m in model.named_modules()} == before
    assert all(not m._forward_hooks for m in model.modules())


def test_count_params():
    model = build_model("resnet20")
    assert count_params(model) == sum(p.numel() for p in model.parameters()) == 269_722
    shared = nn.Linear(3, 3)
    assert count_params(nn.Sequential(shared, shared)) == 12


def test_jsv_linear_mlp_is_weight_product(seed):
    torch.manual_seed(seed)
    model = build_model("mlp7").double()
    sv = jacobian_singular_values(model, torch.randn(4, 1, 32, 32, dtype=torch.float64))
    product = model.layers[0].weight
    for layer in model.layers[1:]:
        product = layer.weight @ product
    assert sv.shape == (4, 10)
    expected = torch.linalg.svdvals(product.detach())
    torch.testing.assert_close(sv, expected.expand(4, -1), rtol=1e-10, atol=1e-14)


def test_jsv_shape_when_inputs_are_fewer_than_classes(seed):
    torch.manual_seed(seed)
    sv = jacobian_singular_values(build_model("mlp7", in_features=4, width=8), torch.randn(3, 4))
    assert sv.shape == (3, 4)


def _bn_net_with_stats(seed):
    torch.manual_seed(seed)
    model = build_model("digits_cnn").double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


def test_jsv_matches_jacrev(seed):
    model = _bn_net_with_stats(seed).eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sv = jacobian_singular_values(model, x)
    for i in range(3):
        jac = torch.func.jacrev(lambda xi: model(xi.unsqueeze(0)).squeeze(0))(x[i])
        torch.testing.assert_close(sv[i], torch.linalg.svdvals(jac.reshape(10, 64)), rtol=1e-10, atol=1e-12)


def test_jsv_eval_mode_samples_independent(seed):
    model = _bn_net_with_stats(seed).train()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    batched = jacobian_singular_values(model, x)
    alone = torch.cat([jacobian_singular_values(model, x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, alone, rtol=1e-10, atol=1e-12)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert not x.requires_grad


def test_jsv_summary():
    s = jsv_summary(torch.tensor([[3.0, 1.0], [2.0, 2.0]]))
    assert s == pytest.approx({"mean": 2.0, "std": math.sqrt(0.5), "max": 3.0, "min": 1.0, "condition_number": 2.0})
    with pytest.raises(ValueError):
        jsv_summary(torch.ones(4))


def test_measure_latency_protocol():
    calls = []

    class Probe(nn.Module):
        def forward(self, x):
            calls.append((self.training, torch.is_grad_enabled()))
            return x

    model = Probe().train()
    seconds = measure_latency(model, torch.randn(2, 3), warmup=2, iters=5)
    assert isinstance(seconds, float) and seconds >= 0
    assert calls == [(False, False)] * 7
    assert model.training
    with pytest.raises(ValueError, match="iters"):
        measure_latency(model, torch.randn(2, 3), iters=0)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16", "small_vit"])
def test_flops_agree_with_flop_counter_mode(name):
    """count_flops == FlopCounterMode (matmuls and convs) with attention run as plain matmuls (grad enabled: not
    MultiheadAttention's fused inference path; SDPA's math backend: its fused CPU kernels have no flop formula);
    a head-pruned ViT too."""
    import torchvision
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from tpp import TPPRegularizer

    if name == "small_vit":
        model = torchvision.models.VisionTransformer(32, 8, 2, 4, 32, 64, num_classes=10)
        model = TPPRegularizer(model, 0.5).prune()
        x = torch.randn(2, 3, 32, 32)
    else:
        model = getattr(torchvision.models, name)(weights=None)
        x = torch.randn(1, 3, 224, 224) if name == "vit_b_16" else torch.randn(1, 3, 64, 64)
    model.eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    expected = counter.get_total_flops()
    assert expected > 0 and abs(count_flops(model, x) - expected) <= 0.01 * expected
