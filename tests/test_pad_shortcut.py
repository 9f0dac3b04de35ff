"""Option-A shortcuts (tpp.models.resnet_cifar.PadShortcut): the chained residual streams of a CIFAR ResNet are one
unit over the widest stream's channels (tpp-method.md §12); selection, regularizer, removal and checkpoints."""
import copy

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_backends_agree, assert_close_to_reference
from torch import nn

from tpp import GrowingSchedule, TPPRegularizer, load_pruned, prune_model, reference, save_pruned, select_filters
from tpp.graph import analyze_model
from tpp.metrics import count_flops
from tpp.models import PadShortcut, ResNetCifar, resnet20, resnet56
from tpp.selection import num_pruned, unit_scores

STREAM = ("conv1", "layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2")  # ResNetCifar(depth=8)
TINY = GrowingSchedule(delta=0.25, interval=2, ceiling=1.0, stabilize_iters=60, zero_out_interval=3)


def randomized(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """float64, eval mode, random BN γ, β and running statistics."""
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.5, 0.5), (m.running_mean, -0.3, 0.3),
                                     (m.running_var, 0.5, 2.0)):
                    t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) * (high - low) + low)
    return model


def zeroed(model: nn.Module, pruned: dict) -> nn.Module:
    """A copy with the pruned rows of every layer and its own BatchNorm set to 0 (as the zero-out does)."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, idx in pruned.items():
            bn = modules[name.replace("conv", "bn")]
            for p in (modules[name].weight, bn.weight, bn.bias):
                p[idx] = 0
    return model


def expected_pads(model: nn.Module, unit, channels: torch.Tensor) -> dict:
    """(in_channels, out_channels, pad) of every PadShortcut after pruning unit channels ``channels``."""
    found = {}
    for name, start in unit.pads:
        m = model.get_submodule(name)
        kept = [c for c in range(start, start + m.out_channels) if c not in set(channels.tolist())]
        inner = [c for c in kept if start + m.pad[0] <= c < start + m.pad[0] + m.in_channels]
        before = sum(c < start + m.pad[0] for c in kept)
        found[name] = (len(inner), len(kept), (before, len(kept) - len(inner) - before))
    return found


def test_resnet20_stream_is_one_unit_with_spans():
    graph = analyze_model(resnet20())
    assert graph.refusals == {"fc": "output is the model output"}
    stream = graph.units["conv1"]
    assert stream.kind == "group" and stream.channels == 64 and stream.segments == 1 and stream.index == 0
    assert stream.members == ("conv1", *(f"layer{s}.{i}.conv2" for s in (1, 2, 3) for i in range(3)))
    assert stream.spans == ((24, 16),) * 4 + ((16, 32),) * 3 + ((0, 64),) * 3
    assert stream.pads == (("layer2.0.shortcut", 16), ("layer3.0.shortcut", 0))
    assert [u.name for u in graph.units.values() if u.kind == "layer"] == [
        f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(3)]
    assert all(u.spans == () and u.pads == () for u in graph.units.values() if u.kind == "layer")
    assert len(analyze_model(resnet56()).units) == 28  # 27 private layers + the stream
    # a member's share of unit indices P is P ∩ [start, start + width) − start, and back
    p = torch.tensor([3, 16, 23, 24, 39, 40, 63])
    own = stream.member_indices(p)
    assert own["conv1"].tolist() == [0, 15] and own["layer2.1.conv2"].tolist() == [0, 7, 8, 23, 24]
    assert own["layer3.2.conv2"].tolist() == p.tolist()
    assert torch.equal(stream.from_members(own), p)
    assert stream.from_members({m: i for m, i in own.items() if m != "layer1.1.conv2"}) is None
    assert list(stream.member_indices(torch.tensor([0, 63]))) == ["layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"]


@pytest.mark.parametrize("case", ["random", "stage1-heavy", "outer-only"])
def test_removal_is_exact_after_the_zero_out(case, seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomized(ResNetCifar(depth=8), gen)
    graph = analyze_model(model)
    stream = graph.units["conv1"]
    assert stream.members == STREAM and stream.spans == ((24, 16), (24, 16), (16, 32), (0, 64))
    if case == "random":
        channels = torch.randperm(64, generator=gen)[: int(torch.randint(1, 60, (), generator=gen))]
        channels = channels[channels != 24 + int(torch.randint(16, (), generator=gen))]  # every stream keeps one
    elif case == "stage1-heavy":  # all but one stage-1 channel
        channels = torch.cat([torch.arange(24, 40)[torch.randperm(16, generator=gen)[:15]], torch.tensor([0, 63])])
    else:  # only the widest stream's own channels: stage 1 and 2 untouched
        channels = torch.tensor([0, 5, 15, 48, 63])
    channels = channels.sort().values
    pruned = {**stream.member_indices(channels),
              "layer2.0.conv1": torch.randperm(32, generator=gen)[:9]}
    model = zeroed(model, pruned)
    x = torch.randn(3, 3, 11, 13, generator=gen, dtype=torch.float64)
    small = prune_model(model, pruned, graph=graph)
    assert_close_to_reference(small(x), model(x), torch.float64)
    for name, (inp, out, pad) in expected_pads(model, stream, channels).items():
        m = small.get_submodule(name)
        assert (m.in_channels, m.out_channels, m.pad) == (inp, out, pad), name
    assert small.layer3[0].conv2.out_channels == 64 - channels.numel() == small.fc.in_features
    assert small.layer1[0].conv1.in_channels == 16 - int(((channels >= 24) & (channels < 40)).sum())


def test_inconsistent_index_sets_are_refused(seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomized(ResNetCifar(depth=8), gen)
    graph = analyze_model(model)
    stream = graph.units["conv1"]
    pruned = stream.member_indices(torch.tensor([2, 30, 33, 50]))  # stage-1 channels 6 and 9
    before = copy.deepcopy(model.state_dict())
    broken = [
        {**pruned, "layer1.0.conv2": torch.tensor([6])},             # stage-1 members differ
        {m: i for m, i in pruned.items() if m != "conv1"},             # stage 2 prunes 14, stage 1 keeps 6
        {**pruned, "layer3.0.conv2": torch.tensor([2, 50])},           # stage 3 keeps what stages 1, 2 prune
        {**pruned, "layer2.0.conv2": torch.tensor([14, 17, 20])},      # unit channel 36 pruned in stage 2 only
    ]
    reg = TPPRegularizer(model, {"layer1.0.conv1": 0.5}, graph=graph, schedule=TINY)
    for bad in broken:
        with pytest.raises(ValueError, match=r"one index set P of its 64 channels.*a kept channel of one stream"):
            prune_model(model, bad, graph=graph)
        with pytest.raises(ValueError, match=r"must be one index set P of its 64 channels"):
            reg.load_state_dict({**reg.state_dict(), "pruned": bad})
        with pytest.raises(ValueError, match=r"must be one index set P of its 64 channels"):
            TPPRegularizer(model, {"layer1.0.conv1": 0.5}, graph=graph, schedule=TINY).load_state_dict(
                {**reg.state_dict(), "pruned": bad})
    assert list(reg.pruned) == ["layer1.0.conv1"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # a member missing prunes nothing: stage-3-only channels need no stage-1/2 entry
    only = {"layer3.0.conv2": torch.tensor([1, 60])}
    assert prune_model(model, only, graph=graph).layer3[0].conv2.out_channels == 62


def test_a_wrong_pad_update_is_detected(seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomized(ResNetCifar(depth=8), gen)
    graph = analyze_model(model)
    pruned = graph.units["conv1"].member_indices(torch.tensor([1, 17, 20, 26, 41, 44, 58]))
    model = zeroed(model, pruned)
    x = torch.randn(2, 3, 9, 9, generator=gen, dtype=torch.float64)
    small = prune_model(model, pruned, graph=graph)
    assert_close_to_reference(small(x), model(x), torch.float64)
    for name in ("layer2.0.shortcut", "layer3.0.shortcut"):
        wrong = copy.deepcopy(small)
        m = wrong.get_submodule(name)
        m.pad = (m.pad[0] + 1, m.pad[1] - 1)  # the kept stream one channel off
        with pytest.raises(AssertionError):
            assert_close_to_reference(wrong(x), model(x), torch.float64)


def test_scores_average_the_members_covering_a_channel_relative_to_each_member(seed):
    torch.manual_seed(seed)
    model = ResNetCifar(depth=8)
    graph = analyze_model(model)
    stream = graph.units["conv1"]
    rows = {m: model.get_submodule(m).weight.detach().double().abs().flatten(1).mean(1) for m in STREAM}
    want = torch.empty(64, dtype=torch.float64)
    for c in range(64):
        covering = [rows[m][c - s] / rows[m].mean() for m, (s, w) in zip(STREAM, stream.spans) if s <= c < s + w]
        want[c] = sum(covering) / len(covering)
    torch.testing.assert_close(unit_scores(model, stream), want, rtol=1e-15, atol=0)
    pruned = select_filters(model, 0.3, graph=graph)
    channels = stream.from_members(pruned)
    assert channels.numel() == num_pruned(0.3, 64)
    assert torch.equal(channels, torch.sort(want, stable=True).indices[:channels.numel()].sort().values)


def test_regularizer_binds_each_member_in_one_slot_then_prunes_exactly(seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomized(resnet20(), gen)
    graph = analyze_model(model)
    stream = graph.units["conv1"]
    reg = TPPRegularizer(model, 0.4, graph=graph, schedule=TINY)
    assert stream.from_members(reg.pruned).numel() == num_pruned(0.4, 64)
    # a P with channels of every stage's stream (random weights favour the widest stream's own channels)
    channels = torch.cat([torch.tensor([5, 20, 30]), torch.randperm(64, generator=gen)[:20]]).unique()
    reg.load_state_dict({**reg.state_dict(), "pruned": {**reg.pruned, **stream.member_indices(channels)}})
    pruned = reg.pruned
    assert torch.equal(stream.from_members(pruned), channels)
    for member in STREAM[:1] + ("layer2.1.conv2",):
        layer, bn = model.get_submodule(member), model.get_submodule(member.replace("conv", "bn"))
        assert {id(s.param) for s in reg.slots(member)} == {id(layer.weight), id(bn.weight), id(bn.bias)}
    # the penalty: §3 per member on its own rows (gram, L2, its BN), every private layer likewise
    reg.strength = 0.7
    want = torch.zeros((), dtype=torch.float64)
    for name, idx in pruned.items():
        if idx.numel():
            w, bn = model.get_submodule(name).weight, model.get_submodule(name.replace("conv", "bn"))
            want = want + 0.7 * 1000.0 * reference.gram_penalty(w, idx, "decorrelate", "mean") \
                + 0.35 * (w[idx].square().sum() + bn.weight[idx].square().sum() + bn.bias[idx].square().sum())
    torch.testing.assert_close(reg.penalty(), want, rtol=1e-12, atol=0)
    # every member of the stream is zeroed in the unit's one slot (execution index 0): at t_s + 3
    zeroed_at = {}
    while reg.iteration < TINY.total_iters:
        t = reg.iteration
        reg.step()
        for name in STREAM[:1] + ("layer1.2.conv2", "layer2.0.conv2", "layer3.2.conv2"):
            if pruned[name].numel() and not model.get_submodule(name).weight[pruned[name]].any():
                zeroed_at.setdefault(name, t)
    assert set(zeroed_at.values()) == {TINY.stabilize_start + 3} and len(zeroed_at) >= 2
    assert reg.zero_pruned() == 0.0
    x = torch.randn(2, 3, 12, 10, generator=gen, dtype=torch.float64)
    small = reg.prune()
    assert_close_to_reference(small(x), model(x), torch.float64)
    assert small.fc.in_features == 64 - channels.numel()


def test_save_and_load_rebuild_the_shortcuts(tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomized(resnet20(), gen).float()
    graph = analyze_model(model)
    pruned = {**graph.units["conv1"].member_indices(torch.randperm(64, generator=gen)[:37]),
              "layer3.1.conv1": torch.tensor([0, 63])}
    small = prune_model(model, pruned, graph=graph)
    save_pruned(small, pruned, tmp_path / "p.pt", arch="resnet20", model_args={"num_classes": 10})
    loaded = load_pruned(tmp_path / "p.pt").eval()
    for name in ("layer2.0.shortcut", "layer3.0.shortcut"):
        a, b = small.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(b, PadShortcut) and (a.in_channels, a.out_channels, a.pad) == (b.in_channels,
                                                                                            b.out_channels, b.pad)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    assert torch.equal(loaded(x), small(x))


def test_a_private_layer_through_a_shortcut_resizes_it(seed):
    gen = torch.Generator().manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7)
            self.shortcut = PadShortcut(7, 12, 2)
            self.head = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            return self.head(self.shortcut(F.relu(self.bn(self.conv(x)))))

    model = randomized(Net(), gen)
    graph = analyze_model(model)
    assert graph.units["conv"].pads == (("shortcut", -2),) and graph.units["conv"].spans == ()
    pruned = {"conv": torch.tensor([0, 4, 6])}
    model = zeroed(model, pruned)
    small = prune_model(model, pruned, graph=graph)
    assert (small.shortcut.in_channels, small.shortcut.out_channels, small.shortcut.pad) == (4, 9, (2, 3))
    x = torch.randn(2, 3, 7, 6, generator=gen, dtype=torch.float64)
    assert_close_to_reference(small(x), model(x), torch.float64)


def test_an_inline_channel_pad_is_refused_with_the_way_out():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(12, 5, 1)

        def forward(self, x):
            return self.fc(F.pad(self.conv(x)[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)))

    graph = analyze_model(Net())
    assert "conv" not in graph.units
    assert "zero-padded in channels by F.pad inline" in graph.refusals["conv"]
    assert "cannot follow the pruned channel count" in graph.refusals["conv"]
    assert "tpp.models.resnet_cifar.PadShortcut" in graph.refusals["conv"]


def test_resnet56_flops_at_ratio_half():
    model = resnet56()
    graph = analyze_model(model)
    x = torch.zeros(1, 3, 32, 32)
    base = count_flops(model, x)
    blocks_only = count_flops(prune_model(model, select_filters(model, "*layer*.conv1:0.5", graph=graph),
                                          graph=graph), x)
    pruned = select_filters(model, 0.5, graph=graph)
    everything = count_flops(prune_model(model, pruned, graph=graph), x)
    stages = {s: len(pruned.get(f"layer{s}.0.conv2", ())) for s in (1, 2, 3)}
    print(f"resnet56 FLOPs {base}: block conv1s at 0.5 {blocks_only} ({base / blocks_only:.3f}x), with the "
          f"stream unit at 0.5 {everything} ({base / everything:.3f}x); stream channels pruned per stage {stages}")
    assert graph.units["conv1"].from_members(pruned).numel() == num_pruned(0.5, 64)
    assert everything < blocks_only < base


def test_triton_backend_matches_torch_backend_on_the_spanned_unit(seed):
    """Each member's own rows (different index sets, different N) in the fused plan."""
    pytest.importorskip("triton")
    from tpp_kernels import config

    device = "cuda" if torch.cuda.is_available() and not config.INTERPRET else "cpu"
    nets, regs = [], []
    for backend in ("torch", "triton"):
        torch.manual_seed(seed)
        net = ResNetCifar(depth=8).to(device)
        graph = analyze_model(net)
        reg = TPPRegularizer(net, {"layer1.0.conv1": 0.5}, graph=graph, backend=backend, schedule=TINY)
        channels = torch.tensor([3, 20, 30, 33, 47, 60])  # every stage's stream
        reg.load_state_dict({**reg.state_dict(), "pruned": {**reg.pruned, **graph.units["conv1"].member_indices(
            channels)}})
        reg.strength = 0.8
        nets.append(net)
        regs.append(reg)
    assert regs[1].backend.name == "triton"
    assert_backends_agree(regs, nets)
