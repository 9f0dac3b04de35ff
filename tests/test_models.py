"""tpp.models: the paper's architectures (shapes, names, option-A shortcut), tracing, registry and weights."""
import fnmatch
import pickle

import pytest
import torch
import torch.fx
import torch.nn as nn

from tpp.models import PadShortcut, build_model, list_models

TPP_MODELS = {  # name -> (example input shape, default classes)
    "resnet20": ((2, 3, 32, 32), 10),
    "resnet56": ((2, 3, 32, 32), 10),
    "vgg19": ((2, 3, 32, 32), 100),
    "mlp7": ((2, 1, 32, 32), 10),
    "digits_cnn": ((2, 1, 8, 8), 10),
    "digits_resnet": ((2, 1, 8, 8), 10),
    "digits_vit": ((2, 1, 8, 8), 10),
}


def _names(model, cls):
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def test_list_models():
    names = list_models()
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg19", "mlp7", "digits_cnn",
            "digits_resnet", "digits_vit"} <= set(names)
    assert {"resnet18", "resnet34", "resnet50", "vgg11_bn", "mobilenet_v2"} <= set(names)


@pytest.mark.parametrize("name", list(TPP_MODELS))
def test_forward_trace_and_pickle(name, seed):
    torch.manual_seed(seed)
    shape, classes = TPP_MODELS[name]
    model = build_model(name).eval()
    x = torch.randn(shape)
    y = model(x)
    assert y.shape == (shape[0], classes)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), y)
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(x), y)
    assert build_model(name, num_classes=7)(x).shape == (shape[0], 7)


def test_resnet56_structure():
    model = build_model("resnet56")
    convs = _names(model, nn.Conv2d)
    assert len(convs) == 1 + 3 * 9 * 2
    assert len(_names(model, nn.Linear)) == 1
    first_convs = fnmatch.filter(convs, "*layer*.conv1")
    assert first_convs == [f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(9)]
    for stage, width in zip((1, 2, 3), (16, 32, 64)):
        for i in range(9):
            block = model.get_submodule(f"layer{stage}.{i}")
            assert block.conv1.out_channels == block.conv2.out_channels == width
            assert block.conv1.stride == ((2, 2) if stage > 1 and i == 0 else (1, 1))
            assert isinstance(block.shortcut, PadShortcut if stage > 1 and i == 0 else nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == 853_018  # the well-known 0.85M


@pytest.mark.parametrize("depth", [20, 32, 44, 110])
def test_resnet_depths(depth):
    model = build_model(f"resnet{depth}")
    assert len(_names(model, nn.Conv2d)) == depth - 1  # + the Linear = depth weighted layers


def test_resnet_bad_depth():
    from tpp.models import ResNetCifar

    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNetCifar(depth=21)


def test_pad_shortcut(seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    with pytest.raises(ValueError):
        PadShortcut(32, 16, 2)


def test_vgg19_structure():
    model = build_model("vgg19")
    convs = _names(model, nn.Conv2d)
    assert convs == [f"features.{i}" for i in (0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49)]
    widths = [model.get_submodule(n).out_channels for n in convs]
    assert widths == [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8
    for n in convs:
        i = int(n.split(".")[1])
        assert model.get_submodule(n).kernel_size == (3, 3)
        assert isinstance(model.features[i + 1], nn.BatchNorm2d) and isinstance(model.features[i + 2], nn.ReLU)
    assert len(_names(model, nn.MaxPool2d)) == 4
    assert _names(model, nn.Linear) == ["classifier"]
    assert (model.classifier.in_features, model.classifier.out_features) == (512, 100)


def test_mlp7_structure():
    model = build_model("mlp7")
    layers = [m for m in model.modules() if not isinstance(m, (nn.Sequential, nn.Flatten, type(model)))]
    assert all(isinstance(m, nn.Linear) and m.bias is not None for m in layers)
    sizes = [(m.in_features, m.out_features) for m in layers]
    assert sizes == [(1024, 100)] + [(100, 100)] * 5 + [(100, 10)]
    assert _names(model, nn.Linear) == [f"layers.{i}" for i in range(7)]
    small = build_model("mlp7", in_features=64, width=32, depth=4, num_classes=10)
    assert small(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert len(_names(small, nn.Linear)) == 4
    with pytest.raises(ValueError, match="depth"):
        build_model("mlp7", depth=1)


def test_torchvision_models():
    import torchvision

    assert type(build_model("resnet18")) is torchvision.models.ResNet
    model = build_model("torchvision:resnet50", num_classes=7)
    assert model.fc.out_features == 7
    assert type(build_model("mobilenet_v2")) is torchvision.models.MobileNetV2


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown model 'resnet57'.*resnet56.*torchvision:"):
        build_model("resnet57")
    with pytest.raises(ValueError, match="unknown torchvision classifier 'nope'.*resnet50"):
        build_model("torchvision:nope")


def test_pretrained_local_state_dict(tmp_path, seed):
    torch.manual_seed(seed)
    source = build_model("resnet20")
    path = tmp_path / "resnet20.pt"
    torch.save(source.state_dict(), path)
    loaded = build_model("resnet20", pretrained=str(path))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="do not fit model 'resnet32'"):
        build_model("resnet32", pretrained=path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_model("resnet20", pretrained=tmp_path / "missing.pt")


def test_pretrained_bad_values():
    with pytest.raises(ValueError, match="ships no weights"):
        build_model("resnet56", pretrained=True)
    with pytest.raises(TypeError, match="pretrained"):
        build_model("resnet56", pretrained=1.0)


def test_digits_models_have_group_and_head_units():
    from tpp.graph import analyze_model

    resnet = analyze_model(build_model("digits_resnet"))
    assert [u.kind for u in resnet.units.values()].count("group") == 2
    assert resnet.units["conv1"].members == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    vit = analyze_model(build_model("digits_vit"))
    assert {n: u.kind for n, u in vit.units.items()} == {
        "blocks.0.attn": "heads", "blocks.0.fc1": "layer", "blocks.1.attn": "heads", "blocks.1.fc1": "layer"}
    assert "LayerNorm" in vit.refusals["blocks.0.fc2"]


def test_timm_models(tmp_path):
    timm = pytest.importorskip("timm")
    model = build_model("timm:resnet18", num_classes=7).eval()
    assert isinstance(model, nn.Module) and model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = build_model("timm:resnet18", num_classes=7, pretrained=str(tmp_path / "w.pt"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("timm:not_a_model")
    assert timm.is_model("resnet18")


def test_timm_missing_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match=r"tpp\[timm\]"):
        build_model("timm:resnet18")
