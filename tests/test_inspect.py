"""tpp.inspect: the report lists units with their members, sizes and FLOPs shares, refusals, and a ratio's effect."""
import torch
import torchvision

from tpp import count_flops, prune_model, select_filters
from tpp.inspect import inspect_model


def test_report_on_a_residual_net():
    model = torchvision.models.resnet18(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.zeros(1, 3, 64, 64)
    text = inspect_model(model, x, ratio=0.5)
    assert text.startswith("ResNet: 21 Conv2d/Linear layers, 12 prunable units (8 layers, 4 groups, 0 attention")
    assert "members: layer2.0.conv2, layer2.0.downsample.0, layer2.1.conv2" in text
    assert "refused (1):\n  fc: output is the model output" in text
    speedup = count_flops(model, x) / count_flops(prune_model(model, select_filters(model, 0.5)), x)
    assert f"({speedup:.3f}x fewer)" in text and "20 layers pruned" in text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # only read


def test_report_on_a_vit_names_heads_and_the_layernorm_refusal():
    model = torchvision.models.VisionTransformer(32, 8, 2, 4, 32, 64, num_classes=10)
    text = inspect_model(model)
    assert "encoder.layers.encoder_layer_0.self_attention    heads       4" in text
    assert "normalized by encoder.layers.encoder_layer_0.ln_1 (LayerNorm)" in text and "FLOPs" not in text
    assert "pass allow_inexact=True" in text


def test_a_packed_attention_share_counts_its_projections_and_a_stream_shows_its_spans():
    from test_surgery import PackedNet

    from tpp.metrics import flops_by_module
    from tpp.models import resnet20

    model, x = PackedNet(), torch.zeros(1, 5, 6)
    flops = flops_by_module(model, x)
    share = sum(flops[m] for m in ("attn", "attn.qkv", "attn.proj")) / sum(flops.values())
    row = next(line for line in inspect_model(model, x).splitlines() if line.startswith("attn "))
    assert row.split()[1:] == ["heads", "4", f"{100 * share:.1f}%"] and flops["attn.qkv"] > 0
    text = inspect_model(resnet20(), torch.zeros(1, 3, 32, 32))
    assert "members: conv1 [24, 40), layer1.0.conv2 [24, 40)" in text and "layer3.2.conv2 [0, 64)" in text
