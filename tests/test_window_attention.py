"""tpp.window_attention: heads of torchvision's Swin window attention (V1 and V2) found, regularized, removed exactly,
counted, saved and loaded."""
import pytest
import torch
import torch.nn as nn
from tolerances import assert_apply_gradients_is_autograd, assert_close_to_reference
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

from tpp import TPPRegularizer, count_flops, load_pruned, prune_model, save_pruned, select_filters
from tpp.attention import head_parameters
from tpp.metrics import flops_by_module
from tpp.models import build_model
from tpp.window_attention import PrunedShiftedWindowAttention, PrunedShiftedWindowAttentionV2, keeping

VARIANTS = ["v1", "v2"]
SHAPE = (2, 3, 18, 14)  # stage 1: 9×7 tokens padded to 12×8 (both shifts); stage 2: 5×4 → 8×4 (height shift only)
ATTENTION = ["features.1.0.attn", "features.1.1.attn", "features.3.0.attn", "features.3.1.attn"]


def tiny_swin(variant: str) -> SwinTransformer:
    """Two stages of two blocks (unshifted, shifted), 2 then 4 heads of 12, 4×4 windows."""
    v2 = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if variant == "v2" else {}
    return SwinTransformer(patch_size=[2, 2], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=5, **v2)


@torch.no_grad()
def randomized(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """float64, eval mode, every parameter random (matrices scaled by 1/√fan-in): position biases, logit scales
    and LayerNorm affines differ per head and channel."""
    model = model.double().eval()
    for p in model.parameters():
        scale = p.shape[-1] ** -0.5 if p.dim() >= 2 and p.shape[-1] > 1 else 1.0
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return model


def inputs(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(SHAPE, generator=gen, dtype=torch.float64)


@torch.no_grad()
def zero_heads(model: nn.Module, pruned: dict) -> None:
    """What the regularizer's zero-out does to heads: q, k, v rows (and biases) and out-projection columns."""
    for name, heads in pruned.items():
        p = head_parameters(model.get_submodule(name))
        rows = (torch.as_tensor(heads)[:, None] * p.head_dim + torch.arange(p.head_dim)).flatten()
        packed = torch.cat([rows + s * p.num_heads * p.head_dim for s in range(3)])
        p.packed_weight[packed] = 0
        if p.packed_bias is not None:
            p.packed_bias[packed] = 0
        p.out_weight[:, rows] = 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_units_heads_and_mlp_neurons_residual_stream_refused(variant):
    graph = TPPRegularizer(tiny_swin(variant), 0.5).graph
    heads = {n: u.channels for n, u in graph.units.items() if u.kind == "heads"}
    assert heads == dict(zip(ATTENTION, [2, 2, 4, 4]))
    layers = {n: u.channels for n, u in graph.units.items() if u.kind == "layer"}
    assert layers == {"features.1.0.mlp.0": 96, "features.1.1.mlp.0": 96, "features.3.0.mlp.0": 192,
                      "features.3.1.mlp.0": 192}
    for name in ("features.1.0.mlp.3", "features.3.1.mlp.3", "features.2.reduction"):
        assert "(LayerNorm)" in graph.refusals[name] and "mean and variance" in graph.refusals[name]
    assert not [n for n in graph.refusals if ".attn." in n]  # qkv, proj, cpb_mlp: inside the heads unit
    params = head_parameters(tiny_swin(variant).get_submodule("features.3.1.attn"))
    assert (params.num_heads, params.head_dim, tuple(params.packed_weight.shape)) == (4, 12, (144, 48))
    per_head = [(tuple(t.shape), dim) for t, dim in params.per_head]
    assert per_head == ([((49, 4), 1)] if variant == "v1" else [((4, 1, 1), 0), ((4, 512), 0)])


WINDOWS = [  # (window, shift, input H×W): padding, both shifts, one shift (window ≥ padded height), no shift
    ([3, 4], [1, 2], (6, 8)), ([3, 4], [1, 2], (5, 7)), ([3, 4], [1, 2], (3, 9)), ([3, 4], [1, 2], (2, 3)),
    ([4, 4], [0, 0], (8, 8)),
]


@pytest.mark.parametrize("cls", [ShiftedWindowAttention, ShiftedWindowAttentionV2])
def test_pruned_module_computes_torchvisions_function(cls, seed):
    """All heads kept: torchvision's result (window_attention ≡ shifted_window_attention); head 0 removed after its
    zero-out: the zeroed module's result; per-head parameters not sliced (heads 1, 2 given slices 0, 1): a
    different result. keeping() draws no random numbers and keeps requires_grad and train/eval."""
    gen = torch.Generator().manual_seed(seed)
    for window, shift, (h, w) in WINDOWS:
        where = f"window {window} shift {shift} input {h}×{w}"
        module = randomized(cls(15, window, shift, num_heads=3), gen)
        module.qkv.bias.requires_grad_(False)
        x = torch.randn(2, h, w, 15, generator=gen, dtype=torch.float64)
        state = torch.random.get_rng_state()
        whole = keeping(module, torch.arange(3))
        assert torch.equal(torch.random.get_rng_state(), state)
        with torch.no_grad():
            assert_close_to_reference(whole(x), module(x), torch.float64, where)
        zero_heads(module, {"": [0]})
        two = keeping(module, torch.tensor([1, 2]))
        with torch.no_grad():
            y = module(x)
            assert_close_to_reference(two(x), y, torch.float64, where)
            for (old, dim), (new, _) in zip(head_parameters(module).per_head, head_parameters(two).per_head):
                new.copy_(old.narrow(dim, 0, 2))
            assert (two(x) - y).abs().max() > 1e-3 * y.abs().max(), where
        assert type(two) is (PrunedShiftedWindowAttentionV2 if cls is ShiftedWindowAttentionV2 else
                             PrunedShiftedWindowAttention)
        assert (two.num_heads, two.head_dim, two.qkv.out_features, two.proj.in_features) == (2, 5, 30, 10)
        assert not two.qkv.bias.requires_grad and two.proj.bias.requires_grad
        assert not two.training and keeping(module.train(), torch.arange(2)).training


@pytest.mark.parametrize("variant", VARIANTS)
def test_regularizer_zero_out_then_removal_is_exact(variant, seed):
    """TPPRegularizer(swin, 0.5): heads bound as gram/l2/zero slots, apply_gradients() == ∂penalty()/∂θ;
    zero_pruned() then prune(): the same outputs (float64), fewer parameters and FLOPs."""
    gen = torch.Generator().manual_seed(seed)
    model = randomized(tiny_swin(variant), gen)
    reg = TPPRegularizer(model, 0.5)
    assert set(ATTENTION) <= set(reg.pruned) and [s.role for s in reg.slots(ATTENTION[0])] == ["gram", "l2", "zero"]
    reg.strength = 0.7
    assert f"{ATTENTION[0]}.qkv.weight" in assert_apply_gradients_is_autograd(reg, model)
    x = inputs(gen)
    with torch.no_grad():
        y_nonzero = model(x)
        assert reg.zero_pruned() > 0
        y = model(x)
        small = reg.prune()
        assert_close_to_reference(small(x), y, torch.float64, variant)
    assert (y - y_nonzero).abs().max() > 1e-3 * y_nonzero.abs().max()  # the zero-out mattered: the check can fail
    pruned_type = PrunedShiftedWindowAttentionV2 if variant == "v2" else PrunedShiftedWindowAttention
    assert all(type(small.get_submodule(n)) is pruned_type for n in ATTENTION)
    assert [small.get_submodule(n).num_heads for n in ATTENTION] == [1, 1, 2, 2]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert count_flops(small, x) < 0.6 * count_flops(model, x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_removal_slices_the_per_head_parameters(variant, seed):
    """Explicit head sets (head 0 always removed), zeroed by hand: removal exact; pruning the result again equals
    pruning once; the kept heads given the first per-head slices instead (not sliced): different outputs."""
    gen = torch.Generator().manual_seed(seed)
    model = randomized(tiny_swin(variant), gen)
    pruned = {"features.1.0.attn": [0], "features.1.1.attn": [0], "features.3.0.attn": [0, 2],
              "features.3.1.attn": [0, 1, 3]}
    zero_heads(model, pruned)
    x = inputs(gen)
    with torch.no_grad():
        y = model(x)
        small = prune_model(model, pruned)
        assert_close_to_reference(small(x), y, torch.float64, variant)
        again = prune_model(prune_model(model, {"features.3.1.attn": [0, 1]}), {"features.3.1.attn": [1]})
        once = prune_model(model, {"features.3.1.attn": [0, 1, 3]})
        assert_close_to_reference(again(x), once(x), torch.float64, "pruned twice")
        for name in pruned:
            full, kept = head_parameters(model.get_submodule(name)), head_parameters(small.get_submodule(name))
            for (old, dim), (new, _) in zip(full.per_head, kept.per_head):
                new.copy_(old.narrow(dim, 0, new.shape[dim]))
        broken = small(x)
    assert (broken - y).abs().max() > 1e-3 * y.abs().max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_agree_with_flop_counter(variant, seed):
    """count_flops of a tiny Swin (unpruned and with heads removed) within 1% of FlopCounterMode; one attention
    module by hand: T tokens after padding (N = 16 per window), width E, inner width I: 2·T·(3EI + 2NI + IE)."""
    model = tiny_swin(variant).eval()
    small = prune_model(model, select_filters(model, "*attn:0.5"))
    x = torch.randn(SHAPE)
    for m in (model, small):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(x)
        assert abs(count_flops(m, x) - counter.get_total_flops()) <= 0.01 * counter.get_total_flops()
    tokens, embed = 2 * 12 * 8, 24  # stage 1: 9×7 tokens padded to 12×8
    for m, inner in ((model, 24), (small, 12)):
        flops = flops_by_module(m, x)["features.1.1.attn"]
        assert flops == 2 * tokens * (3 * embed * inner + 2 * 16 * inner + inner * embed)


def test_save_load_round_trip(tmp_path, seed):
    """Tiny V1/V2 loaded into a given unpruned model; swin_t rebuilt from the file alone (arch, model_args)."""
    torch.manual_seed(seed)
    for variant in VARIANTS:
        model = tiny_swin(variant).eval()
        pruned = select_filters(model, 0.5)
        small = prune_model(model, pruned)
        save_pruned(small, pruned, tmp_path / f"{variant}.pt", arch="x")
        loaded = load_pruned(tiny_swin(variant).eval(), tmp_path / f"{variant}.pt")
        x = torch.randn(SHAPE)
        assert torch.equal(loaded(x), small(x)) and type(loaded.features[3][1].attn) is type(small.features[3][1].attn)
        assert loaded.state_dict().keys() == model.state_dict().keys()
    model = build_model("torchvision:swin_t", num_classes=5).eval()
    pruned = select_filters(model, "*attn:0.5")
    small = prune_model(model, pruned)
    save_pruned(small, pruned, tmp_path / "swin_t.pt", arch="torchvision:swin_t", model_args={"num_classes": 5})
    loaded = load_pruned(tmp_path / "swin_t.pt").eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), small(x)) and loaded.features[7][1].attn.num_heads == 12
