"""tpp.graph: which Conv2d/Linear layers are independently prunable, their BN, consumers and couplings."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from tpp import TPPRegularizer
from tpp.graph import ChannelUse, ModelGraph, analyze_model


@pytest.fixture(scope="module")
def resnet18():
    return analyze_model(torchvision.models.resnet18(weights=None))


@pytest.fixture(scope="module")
def resnet50():
    return analyze_model(torchvision.models.resnet50(weights=None))


# ---------------------------------------------------------------------------------------------------------------
# torchvision models


def test_resnet18(resnet18):
    g = resnet18
    assert g.traced and len(g.layers) == 21
    c = g.layers["layer1.0.conv1"]
    assert c.independent and c.kind == "conv" and c.bn == "layer1.0.bn1" and c.out_channels == 64
    assert c.uses == (ChannelUse("layer1.0.bn1", "bn"), ChannelUse("layer1.0.conv2", "input"))
    assert c.group == ("layer1.0.conv1",) and not c.is_output

    c2 = g.layers["layer1.0.conv2"]
    assert not c2.independent and c2.bn == "layer1.0.bn2"
    assert "added to conv1" in c2.coupling
    assert c2.group == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert "added to layer2.0.downsample.0" in g.layers["layer2.0.conv2"].coupling
    assert not g.layers["conv1"].independent and g.layers["conv1"].bn == "bn1"

    fc = g.layers["fc"]
    assert fc.is_output and fc.coupling == "output is the model output" and fc.kind == "linear"
    assert g.classifier() == "fc"
    assert g.independent() == [f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)]
    assert [info.index for info in g.layers.values()] == list(range(21))
    assert g.layers["conv1"].index == 0 and g.layers["layer2.0.downsample.0"].index == 7


def test_resnet50_bottlenecks(resnet50):
    g = resnet50
    blocks = [f"layer{s}.{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)]
    expected = ["conv1"] + [f"{blk}.conv{i}" for blk in blocks for i in (1, 2)]  # the stem feeds convs only
    assert g.independent() == expected and len(expected) - 1 == 32
    for blk in blocks:
        assert not g.layers[f"{blk}.conv3"].independent
        assert g.layers[f"{blk}.conv2"].uses[-1] == ChannelUse(f"{blk}.conv3", "input")
    for s in range(1, 5):
        conv3, down = g.layers[f"layer{s}.0.conv3"], g.layers[f"layer{s}.0.downsample.0"]
        assert not down.independent and f"layer{s}.0.conv3" in down.coupling
        assert conv3.group == down.group and {conv3.name, down.name, f"layer{s}.1.conv3"} <= set(conv3.group)
    assert g.layers["layer1.0.conv3"].group != g.layers["layer2.0.conv3"].group
    assert g.classifier() == "fc"


def test_vgg11_bn():
    model = torchvision.models.vgg11_bn(weights=None)
    g = analyze_model(model)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and set(convs) <= set(g.independent())
    for conv in convs:
        assert g.layers[conv].bn == f"features.{int(conv.split('.')[1]) + 1}"
    assert g.layers[convs[-1]].uses == (ChannelUse("features.26", "bn"), ChannelUse("classifier.0", "input", 49))
    assert g.layers["classifier.0"].independent
    assert g.layers["classifier.0"].uses == (ChannelUse("classifier.3", "input"),)
    assert g.classifier() == "classifier.6" and not g.layers["classifier.6"].independent


def test_mobilenet_v2():
    g = analyze_model(torchvision.models.mobilenet_v2(weights=None))
    expand = g.layers["features.2.conv.0.0"]
    assert expand.independent and expand.bn == "features.2.conv.0.1"
    assert expand.uses == (
        ChannelUse("features.2.conv.0.1", "bn"),
        ChannelUse("features.2.conv.1.0", "depthwise"),
        ChannelUse("features.2.conv.1.1", "bn"),
        ChannelUse("features.2.conv.2", "input"),
    )
    dw = g.layers["features.2.conv.1.0"]
    assert not dw.independent and "depthwise" in dw.coupling
    proj = g.layers["features.3.conv.2"]  # 24 -> 24, stride 1: residual
    assert not proj.independent and "added to features.2.conv.2" in proj.coupling
    assert g.layers["features.17.conv.2"].independent  # 160 -> 320: no residual
    last = g.layers["features.18.0"]
    assert last.independent and last.uses[-1] == ChannelUse("classifier.1", "input", 1)
    assert g.classifier() == "classifier.1"
    assert not any(g.layers[name].independent for name in g.layers if name.endswith("conv.1.0"))


# ---------------------------------------------------------------------------------------------------------------
# Small custom nets


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class BasicBlockA(nn.Module):
    """CIFAR ResNet block with an option-A shortcut (strided identity, zero-padded channels)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4)))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNetA(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlockA(16, 16), BasicBlockA(16, 16))
        self.layer2 = nn.Sequential(BasicBlockA(16, 32, 2), BasicBlockA(32, 32))
        self.linear = nn.Linear(32, 10)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def test_cifar_resnet_option_a():
    model = CifarResNetA()
    g = analyze_model(model)
    blocks = ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert g.independent() == [f"{b}.conv1" for b in blocks]
    for b in blocks:
        assert g.layers[f"{b}.conv1"].uses == (ChannelUse(f"{b}.bn1", "bn"), ChannelUse(f"{b}.conv2", "input"))
        assert "added to" in g.layers[f"{b}.conv2"].coupling
    assert "node 'pad'" in g.layers["layer2.0.conv2"].coupling  # the padded shortcut is no layer
    assert g.layers["layer2.0.conv2"].group == ("layer2.0.conv2", "layer2.1.conv2")
    assert g.layers["conv1"].group == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert g.layers["linear"].uses == () and g.classifier() == "linear"
    assert g.layers["layer2.1.conv2"].uses[-1] == ChannelUse("linear", "input", 1)


def test_mlp_without_bn():
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Dropout(), nn.Linear(12, 3))
    g = analyze_model(model)
    assert g.independent() == ["0", "2"]
    assert g.layers["0"].bn is None and g.layers["0"].uses == (ChannelUse("2", "input"),)
    assert g.layers["2"].uses == (ChannelUse("5", "input"),) and g.layers["2"].kind == "linear"
    assert g.classifier() == "5" and g.layers["5"].is_output


def test_mlp_with_batchnorm1d():
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    g = analyze_model(model)
    assert g.layers["0"].independent and g.layers["0"].bn == "1"
    assert g.layers["0"].uses == (ChannelUse("1", "bn"), ChannelUse("3", "input"))


class SoftmaxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return F.log_softmax(self.fc(x * self.attn(x).softmax(-1)), dim=1)


def test_softmax_mixes_channels_but_leads_to_output():
    g = analyze_model(SoftmaxNet())
    assert g.classifier() == "fc" and g.layers["fc"].coupling == "output is the model output"
    assert not g.layers["attn"].is_output and "Tensor.softmax" in g.layers["attn"].coupling


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm2d(4), nn.Linear(4, 2)),
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4), nn.Conv2d(4, 2, 1)),
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5), nn.Conv2d(5, 2, 1)),
    ],
)
def test_mismatched_bn_is_not_followed(model):
    g = analyze_model(model)
    assert not g.layers["0"].independent and g.layers["0"].bn is None and "1 (BatchNorm" in g.layers["0"].coupling


def test_bn_field_is_the_bn_right_after_the_layer():
    g = analyze_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)))
    assert g.layers["0"].independent and g.layers["0"].bn is None  # ReLU in between: not directly normalized
    assert g.layers["0"].uses == (ChannelUse("2", "bn"), ChannelUse("3", "input"))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.se_fc1 = nn.Conv2d(8, 2, 1)
        self.se_fc2 = nn.Conv2d(2, 8, 1)
        self.gated = nn.Conv2d(8, 8, 1)  # self-gated (x * sigmoid(x)) only: stays prunable
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s
        y = self.gated(x)
        y = y * torch.sigmoid(y)
        return self.head(y).mean((2, 3))


def test_se_mul_couples():
    g = analyze_model(SENet())
    assert "multiplied with se_fc2" in g.layers["conv"].coupling
    assert "multiplied with conv" in g.layers["se_fc2"].coupling
    assert g.layers["conv"].group == g.layers["se_fc2"].group == ("conv", "se_fc2")
    assert g.layers["se_fc1"].independent and g.layers["se_fc1"].uses == (ChannelUse("se_fc2", "input"),)
    assert g.layers["gated"].independent and g.layers["gated"].uses == (ChannelUse("head", "input"),)
    assert g.independent() == ["se_fc1", "gated"] and g.classifier() == "head"


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(9, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 2)

    def forward(self, x):
        x = torch.cat([self.a(x).relu(), self.b(x)], dim=1)
        return self.fc(torch.flatten(self.c(x), 1))


def test_cat_is_followed_at_offsets():
    g = analyze_model(CatNet())
    assert g.layers["a"].independent and g.layers["b"].independent
    assert g.layers["a"].uses == (ChannelUse("c", "input"),)
    assert g.layers["b"].uses == (ChannelUse("c", "input", offset=4),)
    assert g.layers["a"].group == ("a",) and g.layers["b"].group == ("b",)
    assert g.layers["c"].independent and g.layers["c"].uses == (ChannelUse("fc", "input", 16),)
    assert [u.kind for u in g.units.values()] == ["layer"] * 3 and g.refusals == {"fc": "output is the model output"}


class CatThenAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(3, 9, 1)
        self.head = nn.Conv2d(9, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))


def test_cat_then_add_is_refused():
    g = analyze_model(CatThenAdd())
    assert "added to c" in g.layers["a"].coupling and "added to c" in g.layers["b"].coupling
    assert "added to node 'cat'" in g.layers["c"].coupling
    assert set(g.units) == set() and set(g.refusals) == {"a", "b", "c", "head"}


class SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.shared(self.shared(self.stem(x))))


def test_shared_module():
    g = analyze_model(SharedNet())
    assert "called 2 times" in g.layers["shared"].coupling and "shared" in g.layers["shared"].coupling
    assert "shared" in g.layers["stem"].coupling  # its consumer is shared: its input channels serve two sources
    assert g.independent() == []


class ReorderedNet(nn.Module):
    """Registers its layers in the reverse of the order forward runs them; one layer is never called."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.unused = nn.Linear(3, 3)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


def test_index_follows_execution_order():
    g = analyze_model(ReorderedNet())
    assert list(g.layers) == ["conv1", "conv2", "fc", "unused"]
    assert [g.layers[n].index for n in ("conv1", "conv2", "fc", "unused")] == [0, 1, 2, 3]
    assert g.independent() == ["conv1", "conv2"]
    assert g.layers["conv1"].uses == (ChannelUse("bn1", "bn"), ChannelUse("conv2", "input"))
    assert g.layers["conv2"].uses == (ChannelUse("bn2", "bn"), ChannelUse("fc", "input", 1))
    assert "never called" in g.layers["unused"].coupling


class Flatten(nn.Module):
    def __init__(self, how, in_features=4 * 9):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_features, 2)

    def forward(self, x):
        x = F.max_pool2d(self.conv(x), 2)  # 4 x 3 x 3 for an 8 x 8 input
        if self.how == "module":
            x = self.flatten(x)
        elif self.how == "torch":
            x = torch.flatten(x, 1)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        else:
            x = x.reshape(x.shape[0], -1)
        return self.fc(F.dropout(x, 0.5, self.training))


@pytest.mark.parametrize("how", ["module", "torch", "view", "reshape"])
def test_flatten_into_linear(how):
    model = Flatten(how)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 2)
    g = analyze_model(model)
    assert g.layers["conv"].independent and g.layers["conv"].uses == (ChannelUse("fc", "input", 9),)


def test_flatten_not_divisible():
    g = analyze_model(Flatten("torch", in_features=37))
    assert not g.layers["conv"].independent and "fc" in g.layers["conv"].coupling


class Unusual(nn.Module):
    """conv -> <op> -> consumer, for ops the walk must not claim to understand."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(4, 4, 1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.op == "permute":  # channels into dim 2: no longer channels to a conv
            y = y.permute(0, 2, 1, 3)
        elif self.op == "grouped":
            y = self.grouped(y)
        elif self.op == "layernorm":
            y = self.ln(y.transpose(1, 3)).transpose(1, 3)
        elif self.op == "linear_on_4d":
            y = self.fc(y)
        elif self.op == "weight":
            y = y + self.conv.weight.sum()
        elif self.op == "input":
            y = y + x
        return self.out(y)


@pytest.mark.parametrize(
    "op, reason",
    [
        ("permute", "Tensor.permute"),
        ("layernorm", "normalized by ln (LayerNorm)"),
        ("linear_on_4d", "fc (Linear)"),
        ("weight", "conv.weight"),
        ("input", "added to the model input 'x'"),
    ],
)
def test_unknown_ops_are_conservative(op, reason):
    model = Unusual(op)
    model(torch.randn(1, 4, 4, 4))
    g = analyze_model(model)
    assert not g.layers["conv"].independent and reason in g.layers["conv"].coupling
    assert "never called" in g.layers["grouped"].coupling


def test_grouped_conv_units_take_every_group_alike():
    """A conv feeding a grouped conv, and the grouped conv itself: units of one channel per group."""
    g = analyze_model(Unusual("grouped"))
    assert g.layers["conv"].uses == (ChannelUse("grouped", "input", groups=2),)
    conv, grouped = g.units["conv"], g.units["grouped"]
    assert (conv.kind, conv.segments, conv.size) == ("layer", 2, 2) and grouped.segments == 2
    assert conv.channel_indices(torch.tensor([1])).tolist() == [1, 3]
    assert conv.unit_indices(torch.tensor([1, 3])).tolist() == [1] and conv.unit_indices(torch.tensor([1])) is None


def test_layernorm_is_refused_with_the_reason():
    class LN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.ln, self.fc2 = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc2(self.ln(self.fc1(x)))

    g = analyze_model(LN())
    assert "normalized by ln (LayerNorm)" in g.refusals["fc1"] and "cannot be exact" in g.refusals["fc1"]


@pytest.mark.parametrize(
    "model, shape, reason",
    [
        # a Linear on a 4-D tensor works on the last dim: pooling then mixes its channels with a spatial dim
        (nn.Sequential(nn.Linear(4, 4), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)), (1, 2, 4, 4), "MaxPool2d"),
        # flattening [B, T, C] interleaves the channels instead of making blocks of them
        (nn.Sequential(nn.Linear(4, 4), nn.Flatten(), nn.Linear(12, 2)), (1, 3, 4), "Flatten"),
        # mean over channels and height is no spatial mean
        (
            nn.Sequential(nn.Conv2d(3, 5, 1), LambdaLayer(lambda x: x.mean((1, 2))), nn.Linear(5, 2)),
            (1, 3, 5, 5),
            "Tensor.mean",
        ),
        # view(-1, n) moves part of each sample into the batch dim
        (
            nn.Sequential(nn.Conv2d(3, 4, 1), LambdaLayer(lambda x: x.view(-1, 8)), nn.Linear(8, 2)),
            (2, 3, 2, 2),
            "Tensor.view",
        ),
    ],
)
def test_layout_changes_are_not_followed(model, shape, reason):
    model(torch.randn(shape))
    g = analyze_model(model)
    assert not g.layers["0"].independent and reason in g.layers["0"].coupling


def test_tied_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    model[2].weight = model[0].weight
    g = analyze_model(model)
    assert "shares parameters with 2" in g.layers["0"].coupling and "with 0" in g.layers["2"].coupling


def test_plain_control():
    g = analyze_model(Unusual("none"))
    assert g.layers["conv"].independent and g.layers["conv"].uses == (ChannelUse("out", "input"),)


def test_model_is_not_modified():
    model = torchvision.models.resnet18(weights=None).train()
    before = copy.deepcopy(model.state_dict())
    analyze_model(model)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        analyze_model(lambda x: x)


# ---------------------------------------------------------------------------------------------------------------
# Untraceable models and bn_map


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.body = nn.Sequential(nn.ReLU(), Gate())
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv2(self.body(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def test_untraceable_names_module_and_bn_map():
    with pytest.raises(ValueError, match=r"module 'body\.1' \(Gate\).*leaf_modules=\['body\.1'\].*bn_map"):
        analyze_model(Untraceable())


def test_leaf_modules_make_the_rest_analysable():
    model = Untraceable()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"module 'body\.1' \(Gate\).*leaf_modules"):
        TPPRegularizer(model, 0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    g = analyze_model(model, leaf_modules=["body.1"])
    assert g.traced and list(g.units) == ["conv2"]
    assert "body.1 (Gate)" in g.refusals["conv"] and g.refusals["fc"] == "output is the model output"
    reg = TPPRegularizer(model, 0.5, leaf_modules=["body.1"])
    assert list(reg.pruned) == ["conv2"] and reg.prune().conv2.out_channels == 2
    with pytest.raises(ValueError, match="leaf_modules entry 'nope'"):
        analyze_model(model, leaf_modules=["nope"])


def test_untraceable_root_forward():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.max() > 0 else x

    with pytest.raises(ValueError, match=r"forward of Root itself.*bn_map"):
        analyze_model(Root())


def test_bn_map_fallback():
    model = Untraceable()
    g = analyze_model(model, bn_map={"conv": "bn", "conv2": None})
    assert isinstance(g, ModelGraph) and not g.traced
    assert list(g.layers) == ["conv", "conv2", "fc"] and [i.index for i in g.layers.values()] == [0, 1, 2]
    assert g.independent() == ["conv", "conv2"]
    assert g.layers["conv"].bn == "bn" and g.layers["conv"].uses == (ChannelUse("bn", "bn"),)
    assert g.layers["conv2"].bn is None and g.layers["conv2"].uses == ()
    assert g.layers["fc"].coupling == "not in bn_map" and g.classifier() is None


@pytest.mark.parametrize(
    "bn_map, match",
    [
        ({"nope": None}, "'nope'.*no such module"),
        ({"bn": None}, "'bn'.*BatchNorm2d"),
        ({"conv": "conv2"}, r"bn_map\['conv'\].*Conv2d"),
        ({"conv": "missing"}, r"bn_map\['conv'\].*no such module"),
        ({"conv2": "bn"}, None),  # 4 == 4 features: accepted
    ],
)
def test_bn_map_validation(bn_map, match):
    if match is None:
        assert analyze_model(Untraceable(), bn_map=bn_map).layers["conv2"].bn == "bn"
        return
    with pytest.raises(ValueError, match=match):
        analyze_model(Untraceable(), bn_map=bn_map)


def test_bn_map_rejects_mismatch_grouped_and_non_mapping():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(4), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ValueError, match=r"bn_map\['0'\].*4 features.*8 output channels"):
        analyze_model(model, bn_map={"0": "1"})
    with pytest.raises(ValueError, match="'2'.*groups=8"):
        analyze_model(model, bn_map={"2": None})
    with pytest.raises(TypeError, match="bn_map"):
        analyze_model(model, bn_map=[("0", None)])
