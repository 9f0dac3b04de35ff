"""select_filters: ratio forms, wildcard semantics (last match wins), L1 order, counts, ties, errors."""
import pytest
import torch
import torchvision
from test_regularizer import make_net
from torch import nn

from tpp import select_filters
from tpp.selection import num_pruned, parse_ratio_spec


@pytest.fixture(scope="module")
def resnet50():
    return torchvision.models.resnet50(weights=None)


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18(weights=None)


def test_float_ratio_prunes_every_unit_but_the_classifier(resnet18):
    pruned = select_filters(resnet18, 0.5)
    private = [f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)]
    groups = [["conv1", "layer1.0.conv2", "layer1.1.conv2"]] + [
        [f"layer{s}.0.conv2", f"layer{s}.0.downsample.0", f"layer{s}.1.conv2"] for s in range(2, 5)]
    assert set(pruned) == set(private) | {m for g in groups for m in g}  # every Conv2d but fc (the output)
    for name, idx in pruned.items():
        n = resnet18.get_submodule(name).out_channels
        assert idx.dtype == torch.int64 and idx.numel() == n // 2
        assert torch.equal(idx, idx.sort().values)
    for group in groups:  # one shared index set, chosen by the sum of the members' mean |w|
        assert all(torch.equal(pruned[m], pruned[group[0]]) for m in group)
        scores = sum(resnet18.get_submodule(m).weight.detach().double().abs().flatten(1).mean(1) for m in group)
        assert torch.equal(pruned[group[0]], scores.argsort(stable=True)[: scores.numel() // 2].sort().values)


def test_patterns_match_a_group_by_any_member(resnet18):
    pruned = select_filters(resnet18, "layer2.0.downsample.0:0.25")
    assert set(pruned) == {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"}
    assert {v.numel() for v in pruned.values()} == {32}
    assert select_filters(resnet18, "layer2.*:0.25", skip="*downsample*").keys() == {
        "layer2.0.conv1", "layer2.1.conv1"}  # a skipped member skips its group


def test_resnet50_2_31x_setting(resnet50):
    """tpp-method §5: 32 layers, 3,346 filters (layer1 6×39, layer2 8×77, layer3 12×154, layer4 6×108)."""
    pruned = select_filters(resnet50, "*layer[1-3]*conv[1-2]:0.6,*layer4*conv[1-2]:0.21")
    assert len(pruned) == 32
    assert sum(v.numel() for v in pruned.values()) == 3346
    per_stage = {}
    for name, idx in pruned.items():
        per_stage.setdefault(name.split(".")[0], set()).add(idx.numel())
    assert per_stage == {"layer1": {39}, "layer2": {77}, "layer3": {154}, "layer4": {108}}
    assert sum(1 for n in pruned if n.startswith("layer3")) == 12


def test_smallest_l1_filters_are_pruned(seed):
    net = make_net(seed)
    pruned = select_filters(net, {"conv2": 0.3})
    scores = net.conv2.weight.detach().abs().mean(dim=(1, 2, 3))
    assert pruned["conv2"].tolist() == sorted(torch.argsort(scores)[:4].tolist())  # ⌈0.3·11⌉ = 4


def test_last_matching_pattern_wins_and_skip_forces_zero():
    net = make_net(0)

    def counts(spec, **kw):
        return {k: v.numel() for k, v in select_filters(net, spec, **kw).items()}

    assert counts("conv*:0.5,conv2:0.25") == {"conv1": 4, "conv2": 3, "conv3": 4}
    assert counts("conv2:0.25,conv*:0.5") == {"conv1": 4, "conv2": 6, "conv3": 4}
    assert counts({"conv*": 0.5, "conv3": 0.0}) == {"conv1": 4, "conv2": 6}
    assert counts(0.5, skip=("conv1",)) == {"conv2": 6, "conv3": 4}
    assert counts(0.5, skip="conv1,conv3") == {"conv2": 6}
    assert counts(" conv1 : 0.5 , ") == {"conv1": 4}


def test_counts_exact_ceil_and_cap():
    assert num_pruned(0.3, 10) == 3           # float 0.3*10 = 3.0000000000000004 would give 4
    assert num_pruned(0.6, 64) == 39
    assert num_pruned(0.21, 512) == 108
    assert num_pruned(0.99, 10) == 9          # capped at ⌊0.995·N⌋
    assert num_pruned(0.999, 200) == 199
    assert num_pruned(0.999, 1000) == 995
    assert num_pruned(0.5, 1) == 0
    assert num_pruned(0.0, 64) == 0


def test_ties_break_toward_lower_index():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0] * 4, [0.5] * 4, [1.0] * 4, [0.5] * 4, [1.0] * 4, [2.0] * 4]))
    assert select_filters(net, 0.5)["0"].tolist() == [0, 1, 3]
    assert select_filters(net, 0.5)["0"].tolist() == [0, 1, 3]  # deterministic


def test_errors(resnet18):
    net = make_net(0)
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            select_filters(net, bad)
    with pytest.raises(ValueError, match=r"pattern 'conv2'.*\[0, 1\)"):
        select_filters(net, "conv2:1")
    with pytest.raises(TypeError, match="got bool"):
        select_filters(net, True)  # a bool is not a ratio
    with pytest.raises(TypeError, match="pruning_ratio"):
        select_filters(net, [0.5])
    with pytest.raises(ValueError, match="'conv2:half'.*not a number"):
        select_filters(net, "conv2:half")
    with pytest.raises(ValueError, match="'conv2' is not of the form"):
        select_filters(net, "conv2")
    with pytest.raises(ValueError, match="names no"):
        select_filters(net, " , ")
    with pytest.raises(ValueError, match=r"pattern 'layer\*' matches no Conv2d/Linear layer.*conv1, conv2"):
        select_filters(net, "layer*:0.5")
    with pytest.raises(ValueError, match="skip pattern 'bn1' matches no"):
        select_filters(net, 0.5, skip=["bn1"])
    with pytest.raises(ValueError, match="'fc'.*model output"):
        select_filters(net, "fc:0.5")
    with pytest.raises(ValueError, match=r"layer '1'.*cannot be pruned: depthwise conv"):
        select_filters(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Conv2d(4, 2, 1)),
                       "1:0.5")
    with pytest.raises(TypeError, match="nn.Module"):
        select_filters("resnet18", 0.5)
    assert list(select_filters(resnet18, "layer1.0.conv*:0.5", skip="*conv2")) == ["layer1.0.conv1"]


def test_parse_ratio_spec():
    assert parse_ratio_spec("*layer[1-3]*conv[1-2]:0.3,*layer4*conv[1-2]:0.14") == [
        ("*layer[1-3]*conv[1-2]", 0.3), ("*layer4*conv[1-2]", 0.14)]
    assert parse_ratio_spec({"a": 0, "b": 0.5}) == [("a", 0.0), ("b", 0.5)]


@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_target_speedup_is_reached_within_2_percent(resnet18, mode):
    from tpp import TPPRegularizer, count_flops, prune_model

    x = torch.zeros(1, 3, 64, 64)
    reg = TPPRegularizer(resnet18, target_speedup=2.0, example_input=x, speedup_mode=mode)
    search = reg.speedup_search
    speedup = count_flops(resnet18, x) / count_flops(prune_model(resnet18, reg.pruned), x)
    assert abs(speedup / 2.0 - 1) <= 0.02 and speedup == pytest.approx(search.speedup)
    assert set(reg.pruned) == {m for name in search.ratios for m in reg.graph.units[name].members}
    assert f"target speedup 2x ({mode}" in search.describe() and "layer1.0.conv1: " in search.describe()
    if mode == "uniform":  # one ratio; where counts jump, some units one channel further
        for name, ratio in search.ratios.items():
            size = reg.graph.units[name].size
            assert num_pruned(search.level, size) <= ratio * size <= num_pruned(search.level, size) + 1
    else:
        assert len({round(r, 3) for r in search.ratios.values()}) > 1  # the ranking is global: ratios differ


def test_target_speedup_errors(resnet18):
    from tpp import TPPRegularizer
    from tpp.selection import search_speedup

    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="out of reach.*gives"):
        search_speedup(resnet18, 1000.0, x)
    with pytest.raises(ValueError, match="> 1"):
        search_speedup(resnet18, 0.5, x)
    with pytest.raises(ValueError, match="mode must be one of"):
        search_speedup(resnet18, 2.0, x, mode="best")
    with pytest.raises(ValueError, match="exactly one of"):
        TPPRegularizer(resnet18, 0.5, target_speedup=2.0, example_input=x)
    with pytest.raises(ValueError, match="exactly one of"):
        TPPRegularizer(resnet18)
    with pytest.raises(ValueError, match="needs example_input"):
        TPPRegularizer(resnet18, target_speedup=2.0)
