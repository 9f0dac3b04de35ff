"""Removal is exact wherever it is accepted, and refused with the node and op named elsewhere (tpp/zeros.py).

Every accepted case goes through the public flow (``TPPRegularizer`` → ``zero_pruned()`` → ``prune()``, or
``select_filters`` → zero → ``prune_model``) in float64, eval mode, with random weights and running statistics;
the cases where a removed channel carries a constant check that dropping it without the bias fold would be wrong.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpp
from tpp.graph import analyze_model


class Chain(nn.Module):
    """``first → op → second`` with ``op`` a module or a function of the first layer's output."""

    def __init__(self, first: nn.Module, op, second: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.first, self.second = first, second
        self.act = op if isinstance(op, nn.Module) else None
        self.fn = None if isinstance(op, nn.Module) else op
        self.head = head if head is not None else nn.Linear(out_features(second), 3)
        self.spatial = isinstance(second, nn.Conv2d)

    def forward(self, x):
        h = self.first(x)
        h = self.act(h) if self.act is not None else self.fn(h)
        h = F.relu(self.second(h))
        return self.head(F.adaptive_avg_pool2d(h, 3).flatten(1) if self.spatial else h)


def out_features(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels * 3 * 3


def linear(op, second=None):
    return Chain(nn.Linear(7, 10), op, second if second is not None else nn.Linear(10, 6)), (5, 7)


def conv(op, second=None):
    return Chain(nn.Conv2d(3, 8, 3), op, second if second is not None else nn.Conv2d(8, 4, 3)), (2, 3, 7, 7)


def plus_c(h):
    return h + 0.7


def one_minus(h):
    return 1 - h


def sigmoid_plus_one(h):
    return torch.sigmoid(h).add(1.0)


def gated_sum(h):
    return h + torch.sigmoid(h)  # 0 + 1/2


def with_bn(op, channels, dims=1):
    bn = nn.BatchNorm1d(channels, affine=False) if dims == 1 else nn.BatchNorm2d(channels, affine=False)
    return nn.Sequential(bn, op) if op is not None else bn


class Residual(nn.Module):
    """Two layers joined by add (one group), one through a Sigmoid: the joined channel carries 1/2 into a Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc, self.head = nn.Linear(7, 10), nn.Linear(7, 10), nn.Linear(10, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc(torch.sigmoid(self.a(x)) + self.b(x))))


class FlattenNet(nn.Module):
    """conv → BatchNorm2d(affine=False) → ReLU → flatten → Linear: each channel is a block of 9 in_features."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc, self.head = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, affine=False), \
            nn.Linear(6 * 9, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(F.relu(self.fc(F.relu(self.bn(self.conv(x))).flatten(1))))


ACCEPTED = {  # name: (model and input shape, pruned layer pattern)
    "linear-sigmoid-linear": (lambda: linear(nn.Sigmoid()), "first"),
    "linear-softplus-linear": (lambda: linear(nn.Softplus(beta=1.7)), "first"),
    "linear-hardsigmoid-linear": (lambda: linear(nn.Hardsigmoid()), "first"),
    "linear-plus-c-linear": (lambda: linear(plus_c), "first"),
    "linear-one-minus-linear": (lambda: linear(one_minus), "first"),
    "linear-sigmoid-plus-one-linear": (lambda: linear(sigmoid_plus_one), "first"),
    "linear-sigmoid-relu-linear": (lambda: linear(nn.Sequential(nn.Sigmoid(), nn.ReLU())), "first"),
    "linear-h-plus-sigmoid-h-linear": (lambda: linear(gated_sum), "first"),
    "linear-sigmoid-biasless-linear": (lambda: linear(nn.Sigmoid(), nn.Linear(10, 6, bias=False)), "first"),
    "linear-bn-no-affine-linear": (lambda: linear(with_bn(None, 10)), "first"),
    "linear-bn-no-affine-sigmoid-linear": (lambda: linear(with_bn(nn.Sigmoid(), 10)), "first"),
    "conv-sigmoid-conv-unpadded": (lambda: conv(nn.Sigmoid()), "first"),
    "conv-sigmoid-conv-reflect-padded": (lambda: conv(nn.Sigmoid(), nn.Conv2d(8, 4, 3, 2, 1, padding_mode="reflect")),
                                         "first"),
    "conv-softplus-grouped-conv": (lambda: conv(nn.Softplus(), nn.Conv2d(8, 4, 3, groups=2)), "first"),
    "conv-bn-no-affine-conv": (lambda: conv(with_bn(None, 8, 2)), "first"),
    "conv-bn-no-affine-relu-flatten-linear": (lambda: (FlattenNet(), (2, 3, 5, 5)), "conv"),
    "group-sigmoid-add-linear": (lambda: (Residual(), (5, 7)), "a"),
    # a constant reset by an affine BatchNorm (its γ, β are zeroed): nothing to fold, zero padding is fine
    "conv-sigmoid-bn-conv-padded": (lambda: conv(nn.Sequential(nn.Sigmoid(), nn.BatchNorm2d(8)),
                                                 nn.Conv2d(8, 4, 3, padding=1)), "first"),
}
FOLDED = {name for name in ACCEPTED if name != "conv-sigmoid-bn-conv-padded"}


def randomized(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """float64, eval mode, random weights and biases, running statistics far from (0, 1): means below −0.5, so that
    a removed channel's constant −μ/σ after a BatchNorm without affine survives a ReLU (else the fold could not
    matter and the check that it does would depend on the seed)."""
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(-0.5 - torch.rand(m.num_features, generator=gen, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen, dtype=torch.float64))
    return model


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = float((actual - expected).abs().max())
    assert error <= 1e-12 * float(expected.abs().max()), f"removal changed the output by {error}"


def without_fold(model: nn.Module, graph, pruned) -> nn.Module:
    """``model`` with the pruned input channels of every consumer set to 0: what removal without a fold computes."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name, idx in pruned.items():
        for use in graph.layers[name].uses:
            if use.role == "input":
                columns = ((idx + use.offset)[:, None] * use.block + torch.arange(use.block)).flatten()

                def zeroed(module, args, columns=columns):
                    x = args[0].clone()
                    x[:, columns] = 0
                    return (x,)

                modules[use.module].register_forward_pre_hook(zeroed)
    return model


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_removal_is_exact_after_zero_out(name, seed):
    build, pattern = ACCEPTED[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, shape = build()
    model = randomized(model, gen)
    reg = tpp.TPPRegularizer(model, {pattern: 0.5})
    assert reg.pruned
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        reg.zero_pruned()
        y = model(x)
        small = reg.prune()
        y_small = small(x)
        unfolded = without_fold(model, reg.graph, reg.pruned)(x)
    assert_exact(y_small, y)
    assert small.training is False and sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in model.parameters())
    folded = any(use.constant for layer in reg.pruned for use in reg.graph.layers[layer].uses)
    assert folded == (name in FOLDED)
    if name in FOLDED:  # the constant matters: removal without the fold would change the output
        assert float((unfolded - y).abs().max()) > 1e-3 * float(y.abs().max())


def test_fold_uses_the_running_statistics_at_removal(seed):
    """BatchNorm(affine=False): the constant −μ/σ comes from the module state when ``prune_model`` runs, through
    ``select_filters`` and a graph analysed before the statistics changed."""
    gen = torch.Generator().manual_seed(seed)
    model, shape = linear(with_bn(nn.Sigmoid(), 10))
    model = randomized(model, gen)
    graph = analyze_model(model)
    pruned = tpp.select_filters(model, {"first": 0.4}, graph=graph)
    with torch.no_grad():
        model.first.weight[pruned["first"]] = 0
        model.first.bias[pruned["first"]] = 0
        model.act[0].running_mean.add_(torch.randn(10, generator=gen, dtype=torch.float64))  # "more training"
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert_exact(tpp.prune_model(model, pruned, graph=graph)(x), model(x))


def test_folded_bias_survives_save_and_load(tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    model, shape = linear(nn.Sigmoid(), nn.Linear(10, 6, bias=False))
    model = randomized(model, gen)
    reg = tpp.TPPRegularizer(model, {"first": 0.5})
    reg.zero_pruned()
    small = reg.prune()
    assert small.second.bias is not None and small.second.bias.requires_grad
    tpp.save_pruned(small, reg.pruned, tmp_path / "pruned.pt")
    fresh, _ = linear(nn.Sigmoid(), nn.Linear(10, 6, bias=False))
    loaded = tpp.load_pruned(fresh.double().eval(), tmp_path / "pruned.pt")
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


class DivNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(7, 10), nn.Linear(10, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.second(1 / self.first(x)))


class TwoConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(7, 10), nn.Linear(10, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.first(x)
        return self.head(self.second(torch.sigmoid(h) + (h + 1)))


def padded():
    return nn.Conv2d(8, 4, 3, padding=1)


REFUSED = {  # name: (model, input shape, words the reason must contain: the node, the op, the consumer)
    "sigmoid-into-zero-padded-conv": (lambda: conv(nn.Sigmoid(), padded()), ["act (Sigmoid)", "0.5", "second",
                                                                            "pads with zeros"]),
    "softplus-into-zero-padded-conv": (lambda: conv(nn.Softplus(), padded()), ["act (Softplus)", "0.693147",
                                                                              "second (Conv2d)"]),
    "hardsigmoid-into-zero-padded-conv": (lambda: conv(nn.Hardsigmoid(), padded()), ["act (Hardsigmoid)", "0.5"]),
    "plus-c-into-zero-padded-conv": (lambda: conv(plus_c, padded()), ["node add", "0.7", "second (Conv2d)"]),
    "one-minus-into-zero-padded-conv": (lambda: conv(one_minus, padded()), ["node sub", "maps a removed channel to 1,",
                                                                           "second (Conv2d)"]),
    "sigmoid-plus-one-into-zero-padded-conv": (lambda: conv(sigmoid_plus_one, padded()),
                                               ["node sigmoid", "0.5", "reaches second as 1.5"]),
    "bn-no-affine-into-zero-padded-conv": (lambda: conv(with_bn(None, 8, 2), padded()),
                                           ["act (BatchNorm2d)", "running_mean", "second (Conv2d)"]),
    "sigmoid-into-batch-statistics": (
        lambda: linear(nn.Sequential(nn.Sigmoid(), nn.BatchNorm1d(10, affine=False, track_running_stats=False))),
        ["act.1 (BatchNorm1d)", "batch statistics"]),
    "sigmoid-into-padded-avg-pool": (lambda: conv(nn.Sequential(nn.Sigmoid(), nn.AvgPool2d(3, 1, 1)), padded()),
                                     ["act.1 (AvgPool2d)", "zero padding"]),
    "divide-by-removed-channel": (lambda: (DivNet(), (5, 7)), ["truediv", "divides by a removed channel"]),
    "two-constants-joined": (lambda: (TwoConstants(), (5, 7)), ["node add_1", "both carry a constant"]),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_inexact_removal_is_refused_naming_node_and_op(name):
    model, _ = REFUSED[name][0]()
    words = REFUSED[name][1]
    graph = analyze_model(model)
    reason = graph.refusals.get("first")
    assert reason is not None and graph.layers["first"].coupling == reason, graph.refusals
    for word in words:
        assert word in reason, reason
    with pytest.raises(ValueError, match="cannot be pruned") as err:
        tpp.TPPRegularizer(model, {"first": 0.5})
    assert words[0] in str(err.value)
    with pytest.raises(ValueError, match="cannot be pruned") as err:
        tpp.prune_model(model, {"first": [0, 1]})
    assert words[0] in str(err.value)
    assert f"first: {reason}" in tpp.inspect_model(model)


def test_zero_preserving_paths_fold_nothing():
    """ReLU-family, dropout, pooling and affine BatchNorm keep a removed channel at exactly 0: no constant."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardswish(), nn.Dropout(0.3), nn.MaxPool2d(2),
                          nn.GELU(), nn.Mish(), nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 4, 2))
    graph = analyze_model(model)
    assert graph.layers["0"].independent and graph.layers["7"].independent
    assert all(not use.constant for info in graph.layers.values() for use in info.uses)


def test_the_op_table_is_right_about_zero():
    """tpp/zeros.py's table: zero-preserving ops map 0 to 0 with any parameters; the others map it to f(0)."""
    from tpp import zeros

    z = torch.zeros(4, dtype=torch.float64)
    params = {nn.LeakyReLU: (0.3,), nn.ELU: (2.5,), nn.CELU: (0.4,)}
    for cls in zeros.ZERO_PRESERVING_MODULES + (nn.PReLU,):
        assert torch.equal(cls(*params.get(cls, ())).double()(z), z), cls
    for fn in zeros.ZERO_PRESERVING_FUNCTIONS:
        assert torch.equal(fn(z.clone()), z), fn
    for method in zeros.ZERO_PRESERVING_METHODS:
        assert torch.equal(getattr(z.clone(), method)(), z), method
    for cls in zeros.SAME_MODULES:  # identity in eval mode
        v = torch.randn((2, 4, 3) if cls is nn.Dropout1d else (2, 4, 3, 3), dtype=torch.float64)
        assert torch.equal((cls() if cls is nn.Identity else cls(0.4)).eval()(v.clone()), v), cls
    valued = {nn.Sigmoid(): 0.5, nn.Hardsigmoid(): 0.5, nn.Softplus(beta=2.0): 0.5 * math.log(2.0),
              nn.Hardtanh(): 0.0, nn.Hardtanh(0.25, 1.0): 0.25}
    for module, expected in valued.items():
        assert torch.allclose(module(z), torch.full_like(z, float(expected)), rtol=1e-15, atol=0), module
    assert {type(m) for m in valued} == set(zeros.VALUED_MODULES)
