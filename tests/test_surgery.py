"""tpp.surgery: physical removal is exact on zeroed filters, keeps the model untouched on errors, checkpoints."""
import copy
import fnmatch
import os

import pytest
import torch
import torch.nn as nn
import torchvision
from tolerances import assert_apply_gradients_is_autograd, assert_close_to_reference

from tpp import TPPRegularizer, load_pruned, prune_model, save_pruned, select_filters
from tpp.attention import PrunedMultiheadAttention
from tpp.graph import ChannelUse, analyze_model
from tpp.metrics import count_flops
from tpp.models import digits_cnn, mlp7, resnet20, resnet56, vgg19

# ---------------------------------------------------------------------------------------------------------------
# Helpers


def randomize(model: nn.Module, gen: torch.Generator, shape) -> nn.Module:
    """float64, eval mode, random BN γ and β, running statistics of one random batch (well-scaled activations)."""
    model = model.double()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))
            m.bias.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))
            m.momentum = None  # running stats = this batch's statistics
        model.train()(torch.randn(shape, generator=gen, dtype=torch.float64))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def random_pruned(graph, names, gen) -> dict:
    """For each layer: between 1 and N − 1 random filters."""
    pruned = {}
    for name in names:
        n = graph.layers[name].out_channels
        k = int(torch.randint(1, n, (), generator=gen))
        pruned[name] = torch.randperm(n, generator=gen)[:k]
    return pruned


@torch.no_grad()
def zero_pruned(model, graph, pruned) -> None:
    """W[P], b[P] of each pruned layer and γ[P], β[P] (weights of depthwise carriers) of everything carrying P on."""
    modules = dict(model.named_modules())
    for name, idx in pruned.items():
        carried = [name] + [u.module for u in graph.layers[name].uses if u.role != "input"]
        for m in (modules[c] for c in carried):
            for p in (m.weight, m.bias):
                if p is not None:
                    p[idx] = 0


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def small_vgg11_bn():
    """torchvision vgg11_bn with a narrow classifier (same forward: features → avgpool 7×7 → flatten → Linear)."""
    model = torchvision.models.vgg11_bn(weights=None)
    model.classifier = nn.Sequential(nn.Linear(512 * 49, 32), nn.ReLU(), nn.Linear(32, 10))
    return model


def shared_group(graph, group_of, gen, extra=()):
    """The whole coupled group of ``group_of`` with one random index set, plus independent layers ``extra``."""
    group = graph.layers[group_of].group
    n = graph.layers[group_of].out_channels
    idx = torch.randperm(n, generator=gen)[: n // 3]
    return {**{m: idx for m in group}, **random_pruned(graph, extra, gen)}


def by_pattern(pattern):
    return lambda graph, gen: random_pruned(
        graph, [n for n in graph.independent() if fnmatch.fnmatchcase(n, pattern)], gen)


CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (2, 3, 64, 64), by_pattern("layer*.conv1")),
    "resnet18-group": (lambda: torchvision.models.resnet18(weights=None), (2, 3, 64, 64),
                       lambda g, gen: shared_group(g, "layer1.0.conv2", gen, ["layer1.0.conv1", "layer2.0.conv1"])),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), (2, 3, 64, 64), by_pattern("layer*.conv[12]")),
    "vgg11_bn": (small_vgg11_bn, (2, 3, 64, 64), by_pattern("features.*")),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (2, 3, 64, 64),
                     by_pattern("features.*.conv.0.0")),
    "mobilenet_v2-group": (lambda: torchvision.models.mobilenet_v2(weights=None), (2, 3, 64, 64),
                           lambda g, gen: shared_group(g, "features.2.conv.2", gen, ["features.0.0"])),
    "resnet56": (resnet56, (2, 3, 32, 32), by_pattern("layer*.conv1")),
    "vgg19": (vgg19, (2, 3, 32, 32), by_pattern("features.*")),
    "mlp7": (mlp7, (2, 1, 32, 32), by_pattern("layers.*")),
    "digits_cnn": (digits_cnn, (2, 1, 8, 8), by_pattern("features.*")),
}


# ---------------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("case", list(CASES))
def test_removal_is_exact_on_zeroed_filters(case, seed):
    build, shape, choose = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize(build(), gen, shape)
    graph = analyze_model(model)
    pruned = choose(graph, gen)
    assert pruned
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y_nonzero = model(x)
        zero_pruned(model, graph, pruned)
        y = model(x)
        before = state(model)
        small = prune_model(model, pruned, graph=graph)
        y_small = small(x)

    assert_same_state(model, before)  # a new module; the model is untouched
    assert_close_to_reference(y_small, y, torch.float64, case)
    # the converse: with nonzero pruned parameters the function differs, so the check above can fail
    assert (y_small - y_nonzero).abs().max() > 1e-3 * y_nonzero.abs().max()

    modules, small_modules = dict(model.named_modules()), dict(small.named_modules())
    for name, idx in pruned.items():
        n = graph.layers[name].out_channels - len(idx)
        assert small_modules[name].weight.shape[0] == n
        for use in graph.layers[name].uses:
            m = small_modules[use.module]
            if use.role == "bn":
                assert m.num_features == n and m.running_var.shape == (n,)
            elif use.role == "depthwise":
                assert m.groups == m.in_channels == m.out_channels == n == m.weight.shape[0]
            elif isinstance(m, nn.Linear):
                assert m.in_features == m.weight.shape[1] == modules[use.module].in_features - len(idx) * use.block
            else:
                assert m.in_channels == m.weight.shape[1] == modules[use.module].in_channels - len(idx)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# FLOPs of the paper's ResNet50 settings (tpp-method.md §5): an exact check of surgery and of count_flops


@pytest.fixture(scope="module")
def resnet50():
    return torchvision.models.resnet50(weights=None).eval()


RESNET50_SETTINGS = [
    ("*layer[1-3]*conv[1-2]:0.3,*layer4*conv[1-2]:0.14", 1.489),
    ("*layer[1-3]*conv[1-2]:0.6,*layer4*conv[1-2]:0.21", 2.308),
    ("*layer[1-2]*conv[1-2]:0.74,*layer3*conv[1-2]:0.6,*layer4*conv[1-2]:0.21", 2.564),
    ("*layer[1-3]*conv[1-2]:0.68,*layer4*conv[1-2]:0.5", 3.063),
]


def test_resnet50_flops_speedups(resnet50):
    x = torch.zeros(1, 3, 224, 224)
    graph = analyze_model(resnet50)
    base = count_flops(resnet50, x)
    assert round(base / 1e9, 3) == 8.178
    for spec, speedup in RESNET50_SETTINGS:
        pruned = select_filters(resnet50, spec, graph=graph)
        small = prune_model(resnet50, pruned, graph=graph)
        assert round(base / count_flops(small, x), 3) == speedup, spec
        if speedup == 2.308:  # tpp-method §5: 32 layers, 3,346 filters
            assert len(pruned) == 32 and sum(len(i) for i in pruned.values()) == 3346
            assert small.layer1[0].conv1.out_channels == 64 - 39 and small.layer4[2].conv2.out_channels == 512 - 108


# ---------------------------------------------------------------------------------------------------------------
# A small net with every kind of coupling: residual add group, depthwise carrier, cat, grouped conv, classifier


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.res = nn.Conv2d(8, 8, 3, padding=1)  # added to the stem's channels: group (stem, res)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise: carries the group's channels
        self.dw_bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 6, 1)  # concatenated with b: group (a, b), not supported
        self.b = nn.Conv2d(8, 6, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.res(x)
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = self.grouped(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def make_net(seed):
    torch.manual_seed(seed)
    return randomize(Net(), torch.Generator().manual_seed(seed), (4, 3, 6, 6))


def test_group_through_depthwise_is_exact(seed):
    model = make_net(seed)
    graph = analyze_model(model)
    idx = torch.tensor([1, 4, 6])
    pruned = {"stem": idx, "res": idx.flip(0)}  # one shared set; order does not matter
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    zero_pruned(model, graph, pruned)
    small = prune_model(model, pruned)
    assert_close_to_reference(small(x), model(x), torch.float64)
    assert small.dw.groups == small.dw.in_channels == small.dw.out_channels == 5
    assert small.a.in_channels == small.b.in_channels == small.res.in_channels == 5
    assert small.dw_bn.num_features == small.bn.num_features == 5


NET_ERRORS = {
    "unknown": ({"nope": [0]}, ValueError, "'nope': no such module"),
    "not-a-layer": ({"bn": [0]}, ValueError, "'bn': a BatchNorm2d, not a Conv2d/Linear"),
    "too-large": ({"a": [6]}, ValueError, r"layer 'a'.*must lie in \[0, 6\)"),
    "negative": ({"a": [-1]}, ValueError, r"layer 'a'.*must lie in \[0, 6\)"),
    "duplicate": ({"a": [2, 1, 2]}, ValueError, "layer 'a'.*distinct"),
    "2-d": ({"a": [[0]]}, ValueError, "layer 'a'.*1-D"),
    "float": ({"a": torch.tensor([0.0])}, TypeError, "layer 'a'.*integer"),
    "bool": ({"a": torch.tensor([True])}, TypeError, "layer 'a'.*integer"),
    "str": ({"a": "0"}, TypeError, "layer 'a'.*integer"),
    "all-filters": ({"a": list(range(6))}, ValueError, "layer 'a': all 6 filters.*at least one must stay"),
    "output": ({"fc": [0]}, ValueError, "layer 'fc' produces the model output"),
    "depthwise": ({"dw": [0]}, ValueError, "layer 'dw' cannot be pruned: depthwise conv"),
    "grouped": ({"grouped": [0]}, ValueError, "layer 'grouped'.*2 groups of 6.*same channels in each"),
    "cat-into-grouped": ({"a": [0]}, ValueError, "layer 'a' cannot be pruned: output is consumed by grouped conv"),
    "partial-group": ({"res": [0]}, ValueError, r"layer 'res' is coupled.*whole group \[stem, res\].*missing: stem"),
    "unshared-group": ({"res": [0], "stem": [1]}, ValueError,
                       r"group \[stem, res\]: layers 'res' and 'stem' are given different"),
    "not-a-mapping": ([("a", [0])], TypeError, "pruned must map layer names"),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("pruned,error,match", NET_ERRORS.values(), ids=NET_ERRORS.keys())
def test_errors_leave_the_model_untouched(pruned, error, match, inplace, seed):
    model = make_net(seed)
    before, text = state(model), repr(model)
    with pytest.raises(error, match=match):
        prune_model(model, pruned, inplace=inplace)
    assert_same_state(model, before)
    assert repr(model) == text


def test_graph_errors(seed):
    model = make_net(seed)
    before = state(model)
    with pytest.raises(ValueError, match="only a traced graph knows"):
        prune_model(model, {"a": [0]}, bn_map={"a": None})
    with pytest.raises(ValueError, match="the graph does not describe this model"):
        prune_model(model, {"features.0": [0]}, graph=analyze_model(digits_cnn()))
    assert_same_state(model, before)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        prune_model(before, {})


def test_option_a_shortcut_group_needs_one_index_set_over_its_spans():
    model = resnet20()
    graph = analyze_model(model)
    group = graph.layers["layer1.0.conv2"].group  # the three stages' streams: channel 0 is not the same channel
    with pytest.raises(ValueError, match=r"joins streams of different widths .* must be one index set P of its 64"):
        prune_model(model, {name: [0] for name in group}, graph=graph)


def test_inplace_keeps_module_objects(seed):
    model = make_net(seed)
    stem, dw, weight = model.stem, model.dw, model.stem.weight
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pruned = {"stem": [0, 7], "res": [0, 7]}
    zero_pruned(model, analyze_model(model), pruned)
    expected = model(x)
    out = prune_model(model, pruned, inplace=True)
    assert out is model and model.stem is stem and model.dw is dw and model.stem.weight is not weight
    assert model.stem.out_channels == 6 and model.dw.groups == 6
    assert_close_to_reference(model(x), expected, torch.float64)


class FrozenConv(nn.Conv2d):
    """A Conv2d subclass: its type must survive surgery."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_keeps_types_dtypes_and_requires_grad(dtype):
    model = nn.Sequential(FrozenConv(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).to(dtype)
    model[0].weight.requires_grad_(False)
    small = prune_model(model, {"0": torch.tensor([2, 5], dtype=torch.int32), "3": [1]})
    assert type(small[0]) is FrozenConv and small[0].in_channels == 3 and small[0].out_channels == 6
    assert (small[0].kernel_size, small[0].padding, small[0].stride) == ((3, 3), (0, 0), (1, 1))
    assert not small[0].weight.requires_grad and small[0].bias.requires_grad
    assert small[1].num_features == 6 and small[1].running_mean.dtype == dtype
    assert small[3].weight.shape == (3, 6, 3, 3) and small[5].weight.shape == (3, 48)
    assert all(p.dtype == dtype and p.is_leaf for p in small.parameters())
    if dtype == torch.float32:  # the pruned model trains
        small(torch.randn(2, 3, 8, 8)).sum().backward()
        assert small[5].weight.grad.shape == (3, 48) and small[0].weight.grad is None


# ---------------------------------------------------------------------------------------------------------------
# TPPRegularizer.prune


def test_regularizer_prune(seed):
    torch.manual_seed(seed)
    model = randomize(digits_cnn(), torch.Generator().manual_seed(seed), (8, 1, 8, 8))
    reg = TPPRegularizer(model, "features.0:0.5,features.7:0.25")
    before = state(model)
    small = reg.prune()
    assert_same_state(model, before)
    assert small is not model and small.features[0].out_channels == 16 and small.features[7].out_channels == 48
    assert small.classifier.in_features == 48
    zeroed = copy.deepcopy(model)
    zero_pruned(zeroed, reg.graph, reg.pruned)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    assert_close_to_reference(small(x), zeroed(x), torch.float64)
    assert not torch.allclose(small(x), model(x))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture
def saved(tmp_path, seed):
    """An unpruned resnet20, its pruned (and then changed, as by finetuning) version, and the saved file."""
    torch.manual_seed(seed)
    model = resnet20().eval()
    pruned = select_filters(model, "*layer*.conv1:0.5")
    small = prune_model(model, pruned)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "pruned.pt"
    save_pruned(small, pruned, path, arch="resnet20", extra={"acc": 0.9, "epochs": [1, 2], "note": None})
    return model, pruned, small, path


def test_save_load_round_trip(saved):
    model, pruned, small, path = saved
    assert os.listdir(path.parent) == ["pruned.pt"]  # no temp file left behind
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == "tpp-pruned" and checkpoint["version"] == 1 and checkpoint["arch"] == "resnet20"
    assert checkpoint["pruned"] == {k: v.tolist() for k, v in pruned.items()}
    assert checkpoint["extra"] == {"acc": 0.9, "epochs": [1, 2], "note": None}
    fresh = resnet20().eval()
    before = state(fresh)
    for source in (path, str(path), checkpoint):
        loaded = load_pruned(fresh, source, arch="resnet20")
        assert_same_state(fresh, before)
        assert_same_state(loaded, small.state_dict())
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(loaded.eval()(x), small(x))


def test_save_is_atomic(saved, monkeypatch):
    _, pruned, small, path = saved
    content = path.read_bytes()
    with pytest.raises(TypeError, match=r"extra\['f'\] is a set"):
        save_pruned(small, pruned, path, extra={"f": {1, 2}})
    with pytest.raises(ValueError, match="layer 'layer1.0.conv1'.*distinct"):
        save_pruned(small, {**pruned, "layer1.0.conv1": [1, 1]}, path)
    with pytest.raises(ValueError, match="layer 'layer1.0.bn1': no Conv2d/Linear"):
        save_pruned(small, {"layer1.0.bn1": [0]}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(small, pruned, path)
    assert path.read_bytes() == content and os.listdir(path.parent) == ["pruned.pt"]


def test_load_errors_leave_the_model_untouched(saved, tmp_path):
    _, _, _, path = saved
    checkpoint = torch.load(path, weights_only=True)
    cases = [
        (resnet20(), tmp_path / "missing.pt", FileNotFoundError, "missing.pt: no such file"),
        (resnet20(), {"state_dict": {}}, ValueError, "not a tpp-pruned checkpoint"),
        (resnet20(), {**checkpoint, "version": 2}, ValueError, "unsupported tpp-pruned checkpoint version 2"),
        (resnet20(), {**checkpoint, "arch": "resnet56"}, ValueError, "holds a pruned 'resnet56', not a 'resnet20'"),
        (digits_cnn(), checkpoint, ValueError, "does not fit this VGGCifar: pruned layer 'layer1.0.conv1': no such"),
        (resnet56(), checkpoint, ValueError, r"does not fit this ResNetCifar: state_dict key 'layer1.3.conv1.weight'"),
        (resnet20(num_classes=7), checkpoint, ValueError, r"'fc.weight' has shape \(10, 64\) in the checkpoint, "
                                                          r"\(7, 64\) in the pruned model"),
    ]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    plain = tmp_path / "plain.pt"
    torch.save(torch.zeros(3), plain)
    cases += [(resnet20(), garbage, ValueError, r"garbage.pt cannot be read \(truncated, corrupted or not a torch "),
              (resnet20(), plain, ValueError, r"plain.pt is not a tpp-pruned checkpoint \(Tensor")]
    for model, source, error, match in cases:
        before = state(model)
        with pytest.raises(error, match=match):
            load_pruned(model, source, arch="resnet20")
        assert_same_state(model, before)


# ---------------------------------------------------------------------------------------------------------------
# Units on the networks people prune today (tpp-method.md §12): groups, grouped convs, concatenations, heads


def small_vit():
    """torchvision's VisionTransformer, tiny: 32×32 images, patch 8, 2 blocks of 4 heads."""
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def randomize_all(model: nn.Module, gen: torch.Generator, shape) -> nn.Module:
    """``randomize`` plus random LayerNorm affines and biases, and well-scaled random Linear weights (ViT heads are
    initialised to zero)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.Linear, nn.MultiheadAttention)):
                for p in m.parameters(recurse=False):
                    scale = p.shape[-1] ** -0.5 if p.dim() == 2 else 1.0
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return randomize(model, gen, shape)


MODERN = {  # name: (build, input shape, unit kinds found)
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), (2, 3, 32, 32), {"layer", "group"}),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (2, 3, 32, 32), {"layer", "group"}),
    "regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(weights=None), (2, 3, 32, 32), {"layer", "group"}),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), (2, 3, 32, 32),
                           {"layer", "group"}),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None), (2, 3, 32, 32), {"layer", "group"}),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None), (2, 3, 32, 32), {"layer"}),
    "vit": (small_vit, (2, 3, 32, 32), {"layer", "heads"}),
}


@pytest.mark.parametrize("name", list(MODERN))
def test_units_are_removed_exactly_after_zero_pruned(name, seed):
    build, shape, kinds = MODERN[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize_all(build(), gen, shape)
    reg = TPPRegularizer(model, 0.5)
    assert {u.kind for u in reg.graph.units.values()} == kinds
    classifier = reg.graph.classifier()
    assert classifier not in reg.pruned and len(reg.pruned) == sum(len(u.members) for u in reg.graph.units.values())
    x = torch.randn(shape[1:], generator=gen, dtype=torch.float64).expand(shape) + 0.1 * torch.randn(
        shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y_nonzero = model(x)
        assert reg.zero_pruned() > 0
        y = model(x)
        before = state(model)
        small = reg.prune()
        y_small = small(x)
    assert_same_state(model, before)
    assert_close_to_reference(y_small, y, torch.float64, name)
    assert (y - y_nonzero).abs().max() > 1e-3 * y_nonzero.abs().max()  # the zero-out mattered: the check can fail
    assert sum(p.numel() for p in small.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["regnet_x_400mf", "densenet121", "vit"])
def test_unit_gradients_equal_autograd(name, seed):
    """Grouped-conv segments, concatenation offsets and heads: apply_gradients() == ∂penalty()/∂θ."""
    build, shape, _ = MODERN[name]
    torch.manual_seed(seed)
    model = randomize_all(build(), torch.Generator().manual_seed(seed), shape)
    reg = TPPRegularizer(model, 0.5)
    reg.strength = 0.7
    assert_apply_gradients_is_autograd(reg, model)


def test_grouped_conv_units_keep_groups_equal(seed):
    model = randomize_all(torchvision.models.regnet_x_400mf(weights=None), torch.Generator().manual_seed(seed),
                          (2, 3, 32, 32))
    reg = TPPRegularizer(model, "trunk_output.block1.block1-0.f.a.0:0.5")
    unit = reg.graph.units["trunk_output.block1.block1-0.f.a.0"]
    assert (unit.segments, unit.size) == (2, 16)  # 32 channels feed 2 groups of 16 in f.b
    idx = reg.pruned["trunk_output.block1.block1-0.f.a.0"]
    assert torch.equal(idx[idx >= 16] - 16, idx[idx < 16]) and idx.numel() == 16
    small = reg.prune()
    b = small.get_submodule("trunk_output.block1.block1-0.f.b.0")
    assert (b.in_channels, b.groups, b.weight.shape[1]) == (16, 2, 8)


def test_densenet_concatenation_offsets():
    model = torchvision.models.densenet121(weights=None)
    graph = analyze_model(model)
    uses = graph.layers["features.denseblock1.denselayer2.conv2"].uses
    assert ChannelUse("features.denseblock1.denselayer3.norm1", "bn", offset=96) in uses
    assert ChannelUse("features.denseblock1.denselayer3.conv1", "input", offset=96) in uses
    assert ChannelUse("features.transition1.conv", "input", offset=96) in uses
    assert graph.layers["features.conv0"].uses[0] == ChannelUse("features.norm0", "bn")
    assert set(graph.refusals) == {"classifier"}
    # a regularizer with the default schedule constructs: 120 zero-out slots spaced over 10k stabilize iterations
    reg = TPPRegularizer(model, 0.5)
    assert reg.schedule.zero_out_interval == 10_000 // 120
    kept = prune_model(model, {"features.denseblock1.denselayer1.conv2": [0, 5]})
    assert kept.features.denseblock1.denselayer2.norm1.num_features == 94
    assert kept.features.transition1.conv.in_channels == 254


def test_heads_are_pruned_whole(seed):
    model = randomize_all(small_vit(), torch.Generator().manual_seed(seed), (2, 3, 32, 32))
    reg = TPPRegularizer(model, "*self_attention:0.5")
    name = "encoder.layers.encoder_layer_0.self_attention"
    assert set(reg.pruned) == {name, "encoder.layers.encoder_layer_1.self_attention"}
    assert reg.pruned[name].numel() == 2 and [s.role for s in reg.slots(name)] == ["gram", "l2", "zero"]
    small = reg.prune()
    attention = small.get_submodule(name)
    assert isinstance(attention, PrunedMultiheadAttention) and attention.num_heads == 2
    assert attention.in_proj_weight.shape == (3 * 16, 32) and attention.out_proj.weight.shape == (32, 16)
    assert attention.embed_dim == 32 and attention.head_dim == 8
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reg.zero_pruned()
    with torch.no_grad():
        assert_close_to_reference(small(x), model(x), torch.float64)


def test_pruned_attention_matches_multihead_attention(seed):
    """With every head kept, PrunedMultiheadAttention computes what nn.MultiheadAttention does, masks and weights
    included; with a head dropped it differs."""
    torch.manual_seed(seed)
    for batch_first in (False, True):
        mha = nn.MultiheadAttention(12, 3, batch_first=batch_first, dtype=torch.float64).eval()
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
        kept = PrunedMultiheadAttention.keeping(mha, torch.arange(3))
        q = torch.randn(2, 5, 12, dtype=torch.float64)
        q = q if batch_first else q.transpose(0, 1)
        mask = torch.rand(5, 5) > 0.7
        mask.fill_diagonal_(False)
        padding = torch.zeros(2, 5, dtype=torch.bool)
        padding[1, 3] = True
        for kw in ({}, {"attn_mask": mask}, {"key_padding_mask": padding}, {"average_attn_weights": False}):
            out, w = mha(q, q, q, **kw)
            out2, w2 = kept(q, q, q, **kw)
            assert_close_to_reference(out2, out, torch.float64, str(kw))
            assert_close_to_reference(w2, w, torch.float64, str(kw))
        two = PrunedMultiheadAttention.keeping(mha, torch.tensor([0, 2]))
        assert two.num_heads == 2 and (two(q, q, q)[0] - mha(q, q, q)[0]).abs().max() > 1e-3


def test_save_load_round_trip_with_groups_and_heads(tmp_path, seed):
    for build, shape in ((lambda: torchvision.models.mobilenet_v3_small(weights=None), (2, 3, 32, 32)),
                         (small_vit, (2, 3, 32, 32))):
        model = build().eval()
        reg = TPPRegularizer(model, 0.5)
        small = reg.prune()
        save_pruned(small, reg.pruned, tmp_path / "m.pt", arch="x")
        loaded = load_pruned(build().eval(), tmp_path / "m.pt")
        x = torch.randn(shape)
        assert torch.equal(loaded(x), small(x))


UNIT_SPEEDUPS = {  # issue 12: FLOPs reduction by count_flops at a uniform ratio 0.5, 224×224
    "resnet50": 3.3, "mobilenet_v2": 3.0, "mobilenet_v3_small": 2.8, "efficientnet_b0": 2.8, "regnet_x_400mf": 2.8,
    "densenet121": 2.8, "vit_b_16": 1.9, "swin_t": 1.9,
}


@pytest.mark.parametrize("name", list(UNIT_SPEEDUPS))
def test_flops_reduction_at_half(name):
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.zeros(1, 3, 224, 224)
    small = prune_model(model, select_filters(model, 0.5))
    assert count_flops(model, x) / count_flops(small, x) >= UNIT_SPEEDUPS[name]


class PackedAttention(nn.Module):
    """timm's ``Attention`` (1.0) in miniature: one packed qkv Linear, heads by reshape, ``attn_dim`` wide."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.norm = nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim)))


class PackedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.attn = PackedAttention()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(self.norm(x))
        return self.head(x.mean(1))


def test_packed_qkv_attention_heads(seed, tmp_path):
    torch.manual_seed(seed)
    model = PackedNet().double().eval()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    reg = TPPRegularizer(model, "attn:0.5")
    assert reg.graph.units["attn"].kind == "heads" and reg.pruned["attn"].numel() == 2
    assert [s.role for s in reg.slots("attn")] == ["gram", "l2", "zero"]
    assert "attn.qkv" not in reg.graph.refusals and "embed" in reg.graph.refusals  # LayerNorm-coupled
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        y0 = model(x)
        reg.zero_pruned()
        y = model(x)
        small = reg.prune()
        assert_close_to_reference(small(x), y, torch.float64)
    assert (y - y0).abs().max() > 1e-3 * y0.abs().max()
    attn = small.attn
    assert (attn.num_heads, attn.attn_dim, attn.qkv.out_features, attn.proj.in_features) == (2, 8, 24, 8)
    assert type(attn) is PackedAttention  # shrunk in place, not replaced
    flops = count_flops(model, x) - count_flops(small, x)
    assert flops == 2 * (2 * 5 * 16 * 24 + 2 * 5 * 8 * 16 + 2 * 2 * 5 * 5 * 8)  # qkv, proj, QKᵀ and AV halves
    save_pruned(small, reg.pruned, tmp_path / "p.pt")
    loaded = load_pruned(PackedNet().double().eval(), tmp_path / "p.pt")
    assert torch.equal(loaded(x), small(x))


def test_timm_vit_heads_are_exact(seed):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).double().eval()
    model = randomize_all(model, torch.Generator().manual_seed(seed), (2, 3, 32, 32))
    reg = TPPRegularizer(model, 0.5)
    assert reg.graph.units["blocks.0.attn"].kind == "heads"
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reg.zero_pruned()
    with torch.no_grad():
        assert_close_to_reference(reg.prune()(x), model(x), torch.float64)


def _v01_file(path, model, pruned, arch, extra):
    """A pruned model written exactly as tpp 0.1's save_pruned wrote it (no model_args; the constructor
    arguments only in ``extra``, as `tpp prune` and `tpp train` put them there)."""
    small = prune_model(model, pruned)
    torch.save({"format": "tpp-pruned", "version": 1, "arch": arch,
                "pruned": {k: v.tolist() for k, v in pruned.items()}, "state_dict": small.state_dict(),
                "extra": extra}, path)
    return small


@pytest.mark.parametrize("writer", ["tpp prune", "tpp train"])
def test_v01_checkpoints_load_from_their_path_alone(tmp_path, writer, seed):
    torch.manual_seed(seed)
    if writer == "tpp prune":     # mlp7 needs in_features=64 (digits): only in extra["model_kwargs"]
        model = mlp7(in_features=64).eval()
        pruned = select_filters(model, 0.5)
        extra = {"num_classes": 10, "model_kwargs": {"in_features": 64}, "data": "digits", "method": "l1",
                 "ratio": 0.5}
        arch, x = "mlp7", torch.randn(3, 1, 8, 8)
    else:                         # tpp train wrote num_classes, recipe, method, ratio
        model = resnet20(num_classes=3).eval()
        pruned = select_filters(model, "*layer*.conv1:0.5")
        extra = {"num_classes": 3, "recipe": "smoke", "method": "tpp", "ratio": "*layer*.conv1:0.5"}
        arch, x = "resnet20", torch.randn(2, 3, 16, 16)
    small = _v01_file(tmp_path / "pruned.pt", model, pruned, arch, extra)
    loaded = load_pruned(tmp_path / "pruned.pt").eval()
    assert_same_state(loaded, small.state_dict())
    assert torch.equal(loaded(x), small.eval()(x))
    assert_same_state(load_pruned(model, tmp_path / "pruned.pt"), small.state_dict())   # the 0.1 call still works


def test_load_from_path_rebuilds_registry_and_torchvision_models(tmp_path, seed):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=5).eval()
    pruned = select_filters(model, "layer*.conv1:0.5")
    save_pruned(prune_model(model, pruned), pruned, tmp_path / "tv.pt", arch="resnet18", model_args={"num_classes": 5})
    loaded = load_pruned(tmp_path / "tv.pt").eval()
    assert isinstance(loaded, torchvision.models.ResNet) and loaded.fc.out_features == 5
    assert loaded.layer1[0].conv1.out_channels == 32
    save_pruned(prune_model(model, pruned), pruned, tmp_path / "anon.pt")                  # no arch recorded
    with pytest.raises(ValueError, match=r"names no architecture; pass the unpruned model: load_pruned\(model, path\)"):
        load_pruned(tmp_path / "anon.pt")
    save_pruned(prune_model(model, pruned), pruned, tmp_path / "bad.pt", arch="resnet18",
                model_args={"num_classes": 7})
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        load_pruned(tmp_path / "bad.pt")
