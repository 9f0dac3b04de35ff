"""LayerNorm-coupled channels (tpp-method.md §12): refused by default, pruned with ``allow_inexact=True``.

The removal is then checked against what it must compute: the zeroed model whose LayerNorms take their statistics
over the kept channels only (float64, eval mode) — and shown to differ from the zeroed model itself, by what
``output_deviation`` reports.
"""
import copy
import logging

import pytest
import torch
import torchvision
from tolerances import assert_backends_agree, assert_close_to_reference
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt, LayerNorm2d

from tpp import TPPRegularizer, analyze_model, load_pruned, prune_model, save_pruned, select_filters
from tpp.metrics import count_flops, output_deviation


def tiny_vit(seed):
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(16, 4, 2, 2, 8, 12, num_classes=3)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the classifier at zero, LayerNorms at γ = 1, β = 0
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return model.double().eval()


def tiny_convnext(seed):
    torch.manual_seed(seed)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5)
    for m in model.modules():  # torchvision starts LayerNorms at γ = 1, β = 0 and the layer scales at 1e-6
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith("layer_scale"):
            nn.init.normal_(p)
    return model.double().eval()


MODELS = {"vit": (tiny_vit, (2, 3, 16, 16)), "convnext": (tiny_convnext, (2, 3, 32, 32))}


class KeptStatisticsLayerNorm(nn.Module):
    """A LayerNorm over ``C`` channels whose mean and variance are taken over ``kept`` ones only: what the pruned
    model's LayerNorm computes, in the unpruned model's coordinates."""

    def __init__(self, norm: nn.LayerNorm, kept: torch.Tensor):
        super().__init__()
        self.norm, self.kept = norm, kept
        self.channels_first = isinstance(norm, LayerNorm2d)

    def forward(self, x):
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        part = x[..., self.kept]
        mean = part.mean(-1, keepdim=True)
        var = part.var(-1, unbiased=False, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.norm.eps) * self.norm.weight + self.norm.bias
        return y.permute(0, 3, 1, 2) if self.channels_first else y


def with_kept_statistics(model, graph, pruned):
    """``model`` (zeroed) with every LayerNorm of a pruned inexact unit taking statistics over its kept channels."""
    model = copy.deepcopy(model)
    for unit in graph.units.values():
        if unit.inexact and unit.name in pruned:
            for member in unit.members:
                for use in graph.layers[member].uses:
                    norm = model.get_submodule(use.module) if use.role == "ln" else None
                    if isinstance(norm, nn.LayerNorm):
                        keep = torch.ones(norm.normalized_shape[0], dtype=torch.bool)
                        keep[pruned[unit.name]] = False
                        parent, _, child = use.module.rpartition(".")
                        setattr(model.get_submodule(parent), child, KeptStatisticsLayerNorm(norm, keep.nonzero()[:, 0]))
    return model


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_layernorm_coupled_channels_are_refused_by_default_and_why(name, seed):
    make, _ = MODELS[name]
    model = make(seed)
    exact, inexact = analyze_model(model), analyze_model(model, allow_inexact=True)
    stream = next(u for u in inexact.units.values() if u.inexact)
    assert stream.kind == "group" and stream.name not in exact.units
    assert "normalized by" in exact.refusals[stream.name] and "pass allow_inexact=True" in exact.refusals[stream.name]
    assert "removal changes their mean and variance" in stream.inexact
    assert all(not u.inexact for u in exact.units.values())
    if name == "vit":  # the embedding: patch conv, every attention out-projection and MLP output, two parameters
        assert stream.members[0] == "conv_proj" and len(stream.members) == 5
        assert stream.parameters == (("class_token", -1), ("encoder.pos_embedding", -1))
        assert ("hidden_dim", "size") in {(u.module, u.role) for u in inexact.layers["conv_proj"].uses}
    else:  # the stem's stream: the stem conv, the block's last Linear and its layer scale (channels in dim -3)
        assert stream.parameters == (("features.1.0.layer_scale", -3),)


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_removal_computes_the_kept_channel_statistics(name, seed):
    make, shape = MODELS[name]
    model = make(seed)
    x = torch.randn(*shape, dtype=torch.float64)
    reg = TPPRegularizer(model, 0.5, allow_inexact=True, example_input=x)
    assert reg.inexact
    graph, pruned = reg.graph, reg.pruned
    reg.zero_pruned()
    small = reg.prune()
    want = with_kept_statistics(model, graph, pruned)(x)
    assert_close_to_reference(small(x), want, torch.float64)
    # the deviation reported is real: the zeroed model's own LayerNorms see the removed zeros
    deviation = output_deviation(model, small, x)
    assert deviation["max_abs"] > 1e-3
    assert reg.removal_deviation == pytest.approx(deviation, rel=1e-12)
    assert count_flops(small, x[:1]) < count_flops(model, x[:1])


def test_a_wrong_layernorm_slice_is_caught(seed):
    """The check above detects a LayerNorm whose γ, β were sliced at the wrong channels."""
    model = tiny_vit(seed)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    graph = analyze_model(model, allow_inexact=True)
    pruned = select_filters(model, 0.5, graph=graph)
    reg = TPPRegularizer(model, 0.5, graph=graph, example_input=x)
    reg.zero_pruned()
    small = reg.prune()
    with torch.no_grad():
        small.encoder.ln.weight.copy_(small.encoder.ln.weight.flip(0))
    with pytest.raises(AssertionError):
        assert_close_to_reference(small(x), with_kept_statistics(model, graph, pruned)(x), torch.float64)


def test_prune_reports_the_deviation(seed, caplog):
    model = tiny_vit(seed)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="pass example_input"):
        TPPRegularizer(model, 0.5, allow_inexact=True)
    reg = TPPRegularizer(model, 0.5, allow_inexact=True, example_input=x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="tpp.regularizer"):
        reg.prune()
    assert "changes the model's output on example_input: max |Δ|" in caplog.text
    assert reg.removal_deviation["relative"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # measured, then restored


def test_parameters_producing_channels_are_in_the_l2_term(seed):
    """½ r Σ ‖p[..., P]‖² over the class token and the position embedding, as for a bias."""
    model = tiny_vit(seed)
    reg = TPPRegularizer(model, "conv_proj:0.5", allow_inexact=True, gram_weight=0.0, bn=False,
                         example_input=torch.zeros(1))
    reg.strength = 0.3
    idx = reg.pruned["conv_proj"]
    assert set(reg.pruned) == set(reg.graph.units["conv_proj"].members)
    layers = [model.get_submodule(m) for m in reg.graph.units["conv_proj"].members]
    want = sum(layer.weight[idx].square().sum() + layer.bias[idx].square().sum() for layer in layers)
    want = want + model.class_token[..., idx].square().sum() + model.encoder.pos_embedding[..., idx].square().sum()
    torch.testing.assert_close(reg.penalty(), 0.15 * want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_triton_backend_matches_torch_backend_on_inexact_units(name, seed):
    pytest.importorskip("triton")
    make, shape = MODELS[name]
    nets = [make(seed).float(), make(seed).float()]
    x = torch.zeros(1)
    regs = [TPPRegularizer(net, 0.5, backend=b, allow_inexact=True, example_input=x)
            for net, b in zip(nets, ("torch", "triton"))]
    for reg in regs:
        reg.strength = 0.8
    assert_backends_agree(regs, nets)
    assert nets[0].get_submodule("conv_proj" if name == "vit" else "features.0.0").weight.grad is not None


def test_saved_inexact_model_loads(tmp_path, seed):
    model = tiny_vit(seed)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    graph = analyze_model(model, allow_inexact=True)
    pruned = select_filters(model, 0.5, graph=graph)
    small = prune_model(model, pruned, graph=graph)
    save_pruned(small, pruned, tmp_path / "vit.pt")
    loaded = load_pruned(tiny_vit(seed + 1), tmp_path / "vit.pt")
    assert_close_to_reference(loaded(x), small(x), torch.float64)
    with pytest.raises(ValueError, match="normalized by"):
        prune_model(model, pruned)  # without allow_inexact: refused, naming the reason


def test_a_channel_count_written_in_forward_needs_an_attribute():
    """``x.reshape(n, 8, -1)`` with no attribute holding 8: removal could not update it — refused, saying why."""

    class Hardcoded(nn.Module):
        def __init__(self, width=None):
            super().__init__()
            self.conv, self.ln, self.fc = nn.Conv2d(3, 8, 2, 2), nn.LayerNorm(8), nn.Linear(8, 2)
            self.patch = 8  # equal to the width, never read: not the one removal must update
            if width is not None:
                self.width = width

        def forward(self, x):
            x = self.conv(x).reshape(x.shape[0], getattr(self, "width", 8), -1).transpose(1, 2)
            return self.fc(self.ln(x)[:, 0])

    graph = analyze_model(Hardcoded(), allow_inexact=True)
    assert "writes the channel count 8 as a constant that no single int attribute" in graph.refusals["conv"]
    model = Hardcoded(width=8)
    graph = analyze_model(model, allow_inexact=True)
    uses = {(u.module, u.role) for u in graph.layers["conv"].uses}
    assert graph.units["conv"].inexact and uses >= {("width", "size"), ("ln", "ln")}
    assert (model.width, model.patch) == (8, 8)
    small = prune_model(model, {"conv": [1, 6]}, graph=graph)
    assert (small.width, small.patch) == (6, 8) and small(torch.randn(2, 3, 8, 8)).shape == (2, 2)


def test_the_command_prunes_the_embedding_records_the_deviation_and_resumes_only_alike(tmp_path, capsys):
    """`tpp prune --allow-inexact` on the embedded digits ViT: the deviation lands in metrics.json; a resume
    without the flag is refused before anything is written."""
    import json

    from tpp.cli import main

    out = tmp_path / "vit"
    run = ["prune", "--model", "digits_vit", "--data", "digits", "--ratio", "0.5", "--method", "tpp", "--weights",
           "none", "--delta", "0.05", "--interval", "1", "--stabilize-iters", "6", "--zero-out-interval", "1",
           "--finetune-epochs", "1", "--jsv-samples", "4", "--quiet", "--out", str(out)]
    assert main([*run, "--allow-inexact", "--stop-after-iters", "4"]) == 0
    capsys.readouterr()
    assert main([*run, "--resume", "auto"]) == 2
    assert "--allow-inexact: checkpoint True, this run False" in capsys.readouterr().err
    assert main([*run, "--allow-inexact", "--resume", "auto"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["allow_inexact"] is True and metrics["metrics"]["removal_deviation"]["max_abs"] > 0


def test_a_token_expanded_with_a_size_tuple_joins_the_stream(seed):
    """``token.expand((n, -1, -1))`` (sizes as one tuple) before a concatenation along tokens: a producer."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.ln, self.head = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)
            self.token = nn.Parameter(torch.randn(1, 1, 8))

        def forward(self, x):
            y = torch.cat([self.token.expand((x.shape[0], -1, -1)), self.proj(x)], dim=1)
            return self.head(self.ln(y)[:, 0])

    torch.manual_seed(seed)
    model = Tokens().double()
    nn.init.normal_(model.ln.weight)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    reg = TPPRegularizer(model, 0.5, allow_inexact=True, example_input=x)
    assert reg.graph.units["proj"].parameters == (("token", -1),)
    reg.zero_pruned()
    small = reg.prune()
    assert small.token.shape == (1, 1, 4)
    assert_close_to_reference(small(x), with_kept_statistics(model, reg.graph, reg.pruned)(x), torch.float64)
