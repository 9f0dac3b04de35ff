"""TPPRegularizer: the penalty of tpp-method §3, its in-place gradients, schedule, zero-out, resume, errors."""
import io
import math
import sys

import pytest
import torch
from tolerances import assert_backends_agree, assert_close_to_reference
from torch import nn
from torch.nn import functional as F

from tpp import GrowingSchedule, TPPRegularizer, reference
from tpp_kernels import config

TINY = GrowingSchedule(delta=0.25, interval=2, ceiling=1.0, stabilize_iters=12, zero_out_interval=3)
# Where the triton backend runs: CUDA tensors on a GPU host, else (or with TRITON_INTERPRET=1) CPU tensors in the
# interpreter (conftest.py sets it without a GPU).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and not config.INTERPRET else "cpu"


class SmallNet(nn.Module):
    """conv-BN-relu ×2, a 1×1 conv with bias and no BN, pooled into a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 11, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(11)
        self.conv3 = nn.Conv2d(11, 7, 1)
        self.fc = nn.Linear(7, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_net(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    net = SmallNet().to(dtype)
    with torch.no_grad():  # non-trivial BN affine parameters
        for bn in (net.bn1, net.bn2):
            bn.weight.normal_()
            bn.bias.normal_()
    return net


def expected_penalty(net, pruned, r, c=1000.0, variant="decorrelate", reduction="mean", bn=True, weight_l2=True):
    """tpp-method §3 written out term by term from the reference functions."""
    mods = dict(net.named_modules())
    bns = {"conv1": net.bn1, "conv2": net.bn2}
    total = torch.zeros((), dtype=torch.float64)
    for name, p in pruned.items():
        m = mods[name]
        total = total + r * c * reference.gram_penalty(m.weight, p, variant, reduction)
        if weight_l2:
            total = total + r / 2 * m.weight[p].square().sum()
            if m.bias is not None:
                total = total + r / 2 * m.bias[p].square().sum()
        if bn and name in bns:
            total = total + r / 2 * (bns[name].weight[p].square().sum() + bns[name].bias[p].square().sum())
    return total


def test_selects_every_prunable_layer_but_the_classifier(seed):
    net = make_net(seed)
    reg = TPPRegularizer(net, 0.5, schedule=TINY)
    assert list(reg.pruned) == ["conv1", "conv2", "conv3"]
    assert [len(v) for v in reg.pruned.values()] == [4, 6, 4]
    for name, idx in reg.pruned.items():
        scores = getattr(net, name).weight.detach().abs().flatten(1).mean(1)
        kept = torch.ones_like(scores, dtype=torch.bool)
        kept[idx] = False
        assert scores[idx].max() <= scores[kept].min()


@pytest.mark.parametrize("variant", ["decorrelate", "diagonal"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bn,weight_l2", [(True, True), (False, True), (True, False)])
def test_penalty_is_the_documented_objective(variant, reduction, bn, weight_l2, seed):
    net = make_net(seed)
    reg = TPPRegularizer(net, 0.4, variant=variant, reduction=reduction, bn=bn, weight_l2=weight_l2,
                         gram_weight=7.5, schedule=TINY)
    reg.strength = 0.37
    got = reg.penalty()
    want = expected_penalty(net, reg.pruned, 0.37, 7.5, variant, reduction, bn, weight_l2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def grads_of(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["decorrelate", "diagonal"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_apply_gradients_equals_autograd(variant, reduction, seed):
    net_a, net_b = make_net(seed), make_net(seed)
    reg_a = TPPRegularizer(net_a, "conv*:0.45", variant=variant, reduction=reduction, schedule=TINY)
    reg_b = TPPRegularizer(net_b, "conv*:0.45", variant=variant, reduction=reduction, schedule=TINY)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for reg in (reg_a, reg_b):
        reg.strength = 0.61
    (net_a(x).square().sum() + reg_a.penalty()).backward()
    net_b(x).square().sum().backward()
    reg_b.apply_gradients()
    ga, gb = grads_of(net_a), grads_of(net_b)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-10, atol=1e-12, msg=name)


def test_apply_gradients_creates_missing_grads(seed):
    net, twin = make_net(seed), make_net(seed)
    reg, reg_twin = TPPRegularizer(net, 0.5, schedule=TINY), TPPRegularizer(twin, 0.5, schedule=TINY)
    reg.strength = reg_twin.strength = 1.0
    reg.apply_gradients()  # no backward ran: every .grad is None before
    reg_twin.penalty().backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        expected = q.grad if q.grad is not None else torch.zeros_like(q)
        if p.grad is None:
            assert not expected.any(), name
        else:
            torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-12, msg=name)
    assert net.conv1.weight.grad is not None and net.bn1.weight.grad is not None


def test_matches_the_reference_training_step(seed):
    """One step as the paper's code runs it: loss += c·r·mse(G, detached target with P rows/cols zeroed), then
    after backward ``grad += r·w`` on pruned filters/biases and pruned BN γ/β (tpp-method §3)."""
    r, c = 0.23, 1000.0
    net_a, net_b = make_net(seed), make_net(seed)
    reg = TPPRegularizer(net_a, 0.5, schedule=TINY)
    reg.strength = r
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)

    net_a(x).logsumexp(1).sum().backward()
    reg.apply_gradients()

    loss = net_b(x).logsumexp(1).sum()
    for name, p in reg.pruned.items():
        loss = loss + c * r * reference.decorrelation_penalty_reference_run(getattr(net_b, name).weight, p)
    loss.backward()
    bns = {"conv1": net_b.bn1, "conv2": net_b.bn2}
    with torch.no_grad():
        for name, p in reg.pruned.items():
            m = getattr(net_b, name)
            for param in (m.weight, m.bias) + ((bns[name].weight, bns[name].bias) if name in bns else ()):
                if param is not None:
                    param.grad[p] += r * param[p]
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_model(dtype, seed):
    net = make_net(seed, dtype)
    ref = make_net(seed, torch.float64)
    with torch.no_grad():
        for p, q in zip(net.parameters(), ref.parameters()):
            q.copy_(p.double())  # the same rounded values in float64
    reg, reg64 = TPPRegularizer(net, 0.5, schedule=TINY), TPPRegularizer(ref, 0.5, schedule=TINY)
    assert {k: v.tolist() for k, v in reg.pruned.items()} == {k: v.tolist() for k, v in reg64.pruned.items()}
    reg.strength = reg64.strength = 0.5
    value = reg.penalty()
    assert value.dtype == torch.float32
    assert_close_to_reference(value, reg64.penalty(), torch.float32)
    reg.apply_gradients()
    reg64.apply_gradients()
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert p.grad.dtype == dtype
            assert_close_to_reference(p.grad, q.grad, dtype, msg=name)


def test_strength_follows_step_and_schedule():
    net = make_net(0)
    reg = TPPRegularizer(net, 0.5, schedule=TINY)
    seen = []
    for _ in range(TINY.total_iters + 2):
        seen.append((reg.strength, reg.phase))
        reg.step()
    assert [s for s, _ in seen[:9]] == [0, 0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0]
    assert seen[7][1] == "grow" and seen[8][1] == "stabilize"
    assert seen[TINY.total_iters - 1][1] == "stabilize" and seen[TINY.total_iters][1] == "done"
    assert reg.iteration == TINY.total_iters + 2 and reg.strength == 1.0
    assert reg.penalty().item() == 0  # every pruned parameter has been zeroed by now


def test_strength_zero_gives_zero_and_no_gradient(seed):
    net = make_net(seed)
    reg = TPPRegularizer(net, 0.5, schedule=TINY)
    assert reg.strength == 0 and reg.penalty().item() == 0
    reg.apply_gradients()
    assert all(p.grad is None for p in net.parameters())


def test_strength_override():
    reg = TPPRegularizer(make_net(0), 0.5, schedule=TINY)
    reg.strength = 0.3
    reg.step()
    assert reg.strength == 0.3
    assert reg.state_dict()["strength_override"] == 0.3
    reg.strength = None
    assert reg.strength == TINY.strength(1)
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="strength"):
            reg.strength = bad


def test_layerwise_zero_out(seed):
    """Layer i (execution order among all Conv2d/Linear) is zeroed after step t once t − t_s ≥ 3·(i+1)."""
    net = make_net(seed)
    reg = TPPRegularizer(net, 0.5, schedule=TINY)
    t_s = TINY.stabilize_start
    bns = {"conv1": net.bn1, "conv2": net.bn2}

    def pruned_params(name):
        m = getattr(net, name)
        ps = [m.weight, m.bias] + ([bns[name].weight, bns[name].bias] if name in bns else [])
        return [p[reg.pruned[name]] for p in ps if p is not None]

    def is_zero(name):
        return all(not v.any() for v in pruned_params(name))

    zeroed_at = {}
    while reg.iteration < TINY.total_iters:
        t = reg.iteration
        with torch.no_grad():  # the optimizer moves everything between steps
            for p in net.parameters():
                p.add_(0.01)
        reg.step()
        for name in reg.pruned:
            if is_zero(name):
                zeroed_at.setdefault(name, t)
            else:
                assert name not in zeroed_at, f"{name} zeroed once, not kept at zero"
    assert zeroed_at == {"conv1": t_s + 3, "conv2": t_s + 6, "conv3": t_s + 9}
    kept = torch.ones(8, dtype=torch.bool)
    kept[reg.pruned["conv1"]] = False
    assert net.conv1.weight[kept].abs().min() > 0


def sgd(net):
    return torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def train(net, reg, opt, batches):
    """The documented loop on the in-place path: backward, apply_gradients, optimizer step, reg.step."""
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        reg.apply_gradients()
        opt.step()
        reg.step()


def data_stream(seed):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 5, (4,), generator=gen)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_resume_mid_schedule_is_bit_exact(seed):
    total, cut = TINY.total_iters + 3, 11
    net = make_net(seed, torch.float32)
    reg = TPPRegularizer(net, 0.5, schedule=TINY)
    train(net, reg, sgd(net), take(data_stream(seed), total))

    stream = data_stream(seed)
    net1 = make_net(seed, torch.float32)
    reg1, opt1 = TPPRegularizer(net1, 0.5, schedule=TINY), sgd(net1)
    train(net1, reg1, opt1, take(stream, cut))
    buf = io.BytesIO()
    torch.save({"model": net1.state_dict(), "opt": opt1.state_dict(), "reg": reg1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    net2 = make_net(seed + 1, torch.float32)  # other weights at construction: its own selection differs
    reg2, opt2 = TPPRegularizer(net2, 0.5, schedule=TINY), sgd(net2)
    assert any(not torch.equal(reg2.pruned[n], reg1.pruned[n]) for n in reg1.pruned)
    net2.load_state_dict(ckpt["model"])
    reg2.load_state_dict(ckpt["reg"])
    opt2.load_state_dict(ckpt["opt"])
    assert reg2.iteration == cut
    assert all(torch.equal(reg2.pruned[n], reg1.pruned[n]) for n in reg1.pruned)
    train(net2, reg2, opt2, take(stream, total - cut))
    for (name, a), b in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    assert reg2.state_dict()["iteration"] == reg.state_dict()["iteration"] == total


def test_load_state_dict_refuses_mismatches():
    net = make_net(0)
    state = TPPRegularizer(net, 0.5, schedule=TINY).state_dict()
    with pytest.raises(ValueError, match="config.*gram_weight"):
        TPPRegularizer(net, 0.5, schedule=TINY, gram_weight=1.0).load_state_dict(state)
    with pytest.raises(ValueError, match="schedule.*delta"):
        TPPRegularizer(net, 0.5, schedule=GrowingSchedule(delta=0.5, interval=2, stabilize_iters=12,
                                                          zero_out_interval=3)).load_state_dict(state)
    reg = TPPRegularizer(net, 0.5, schedule=TINY)
    with pytest.raises(ValueError, match="missing"):
        reg.load_state_dict({"iteration": 3})
    with pytest.raises(ValueError, match="'conv9' is not a Conv2d/Linear"):
        reg.load_state_dict({**state, "pruned": {"conv9": torch.tensor([0])}})
    with pytest.raises(ValueError, match=r"layer 'conv1'.*\[0, 8\)"):
        reg.load_state_dict({**state, "pruned": {"conv1": torch.tensor([8])}})
    with pytest.raises(ValueError, match="iteration"):
        reg.load_state_dict({**state, "iteration": -1})
    assert reg.state_dict()["pruned"].keys() == state["pruned"].keys()


def test_constructor_errors():
    net = make_net(0)
    with pytest.raises(ValueError, match="variant"):
        TPPRegularizer(net, 0.5, variant="orth", schedule=TINY)
    with pytest.raises(ValueError, match="reduction"):
        TPPRegularizer(net, 0.5, reduction="avg", schedule=TINY)
    with pytest.raises(ValueError, match="gram_weight"):
        TPPRegularizer(net, 0.5, gram_weight=-1, schedule=TINY)
    with pytest.raises(TypeError, match="bn must be a bool"):
        TPPRegularizer(net, 0.5, bn="yes", schedule=TINY)
    with pytest.raises(TypeError, match="GrowingSchedule"):
        TPPRegularizer(net, 0.5, schedule={"delta": 1})
    with pytest.raises(ValueError, match="backend"):
        TPPRegularizer(net, 0.5, backend="jax", schedule=TINY)
    with pytest.raises(TypeError, match="nn.Module"):
        TPPRegularizer(object(), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        TPPRegularizer(net, 1.0, schedule=TINY)


def test_zero_out_spacing_adapts_to_the_stabilize_phase():
    """tpp-method §12: ⌊(stabilize_iters − 1) / slots⌋, at most the configured interval; unchanged when it fits.
    Every slot is due at an iteration step() runs (t < total_iters), the last one included."""
    net = make_net(0)
    short = GrowingSchedule(delta=0.5, interval=1, stabilize_iters=12, zero_out_interval=5)
    reg = TPPRegularizer(net, 0.5, schedule=short)  # last pruned layer: conv3, execution index 2 -> 3 slots
    assert reg.schedule.zero_out_interval == 3 and reg.schedule.stabilize_iters == 12
    slots = [reg.graph.layers[name].index for name in reg.pruned]
    due = [min(t for t in range(40) if reg.schedule.zero_out_due(t, i)) for i in slots]
    assert due == [2 + 3, 2 + 6, 2 + 9] and max(due) < short.total_iters
    for _ in range(short.total_iters):
        reg.step()
    assert reg.zero_pruned() == 0.0  # the schedule zeroed every unit, the last one included
    assert TPPRegularizer(net, 0.5, schedule=TINY).schedule is TINY


def test_backend_selection(monkeypatch):
    net = make_net(0)
    assert TPPRegularizer(net, 0.5, schedule=TINY).backend.name == "torch"  # CPU tensors → reference
    monkeypatch.setenv("TPP_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$TPP_BACKEND"):
        TPPRegularizer(net, 0.5, schedule=TINY)
    monkeypatch.setenv("TPP_BACKEND", "cuda")
    monkeypatch.setitem(sys.modules, "tpp_kernels.cuda", None)  # the extension neither built nor buildable
    with pytest.raises(ValueError, match="backend 'cuda' is unavailable"):
        TPPRegularizer(net, 0.5, schedule=TINY, backend="torch")
    monkeypatch.setenv("TPP_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # set by conftest.py only without a GPU
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        TPPRegularizer(net, 0.5, schedule=TINY)


def test_unwraps_data_parallel_and_compiled_models():
    net = make_net(0)
    reg = TPPRegularizer(nn.DataParallel(net), 0.5, schedule=TINY)
    assert reg.model is net
    reg = TPPRegularizer(torch.compile(net), 0.5, schedule=TINY)
    assert reg.model is net


def test_model_without_prunable_filters():
    net = make_net(0)
    reg = TPPRegularizer(net, 0.0, schedule=TINY)
    reg.strength = 1.0
    assert reg.pruned == {} and reg.penalty().item() == 0
    reg.apply_gradients()
    reg.step()
    assert math.isclose(reg.strength, 1.0)


@pytest.mark.parametrize("variant", ["decorrelate", "diagonal"])
def test_triton_backend_matches_torch_backend(variant, seed):
    """On CUDA tensors on a GPU host; else under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors."""
    pytest.importorskip("triton")
    nets = [make_net(seed, torch.float32).to(KERNEL_DEVICE) for _ in range(2)]
    regs = [TPPRegularizer(net, 0.45, variant=variant, schedule=TINY, backend=name)
            for net, name in zip(nets, ("torch", "triton"))]
    assert regs[1].backend.name == "triton"
    for reg in regs:
        reg.strength = 0.8
    assert_backends_agree(regs, nets)


class GroupedNet(nn.Module):
    """A conv feeding a grouped conv: units of one channel per group (segments), BN included."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c(self.b(self.bn(self.a(x)).relu()).relu()).mean((2, 3)))


class ConcatNet(nn.Module):
    """Two convs concatenated into one BatchNorm (DenseNet-style): that BN's γ and β are bound by two units."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 3, padding=1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = self.bn(torch.cat([self.a(x), self.b(x)], 1)).relu()
        return self.fc(self.c(x).relu().mean((2, 3)))


@pytest.mark.parametrize("name", ["grouped", "concat", "digits_resnet", "digits_vit"])
def test_triton_backend_matches_torch_backend_on_units(name, seed):
    """Units beyond private layers in the fused plan: grouped-conv segments, a BN bound by two units after a
    concatenation, coupled groups, attention heads (3 segments, the out-projection's zero slot)."""
    pytest.importorskip("triton")
    from tpp.models import build_model

    def make():
        torch.manual_seed(seed)
        net = {"grouped": GroupedNet, "concat": ConcatNet}.get(name, lambda: build_model(name))()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight)
                nn.init.normal_(m.bias)
        return net.to(KERNEL_DEVICE)

    nets = [make(), make()]
    regs = [TPPRegularizer(net, 0.5, backend=backend) for net, backend in zip(nets, ("torch", "triton"))]
    assert regs[1].backend.name == "triton"
    for reg in regs:
        reg.strength = 0.8
    assert_backends_agree(regs, nets)


class InvertedResidualNet(nn.Module):
    """MobileNetV2-style: 1×1 expansion → BN → ReLU6 → depthwise 3×3 → BN → ReLU6 → 1×1 projection → BN."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.project = nn.Conv2d(12, 6, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu6(self.bn1(self.expand(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        x = self.bn3(self.project(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("make", [lambda: make_net(0), InvertedResidualNet], ids=["conv-bn", "inverted-residual"])
def test_zero_out_makes_removal_exact(make, seed):
    """After the schedule's zero-out, physically removing the pruned filters leaves the function unchanged."""
    torch.manual_seed(seed)
    net = make().double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.normal_()
                m.running_var.uniform_(0.5, 2.0)
    reg = TPPRegularizer(net, 0.5, schedule=GrowingSchedule(delta=0.5, interval=1, stabilize_iters=30,
                                                            zero_out_interval=5))
    while reg.phase != "done":
        with torch.no_grad():  # whatever the optimizer does between steps
            for p in net.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        reg.step()
    if isinstance(net, InvertedResidualNet):
        roles = [(slot.role, id(slot.param)) for slot in reg.slots("expand")]
        expected = [("gram", net.expand.weight), ("l2", net.dw.weight), ("bn", net.bn1.weight), ("bn", net.bn1.bias),
                    ("bn", net.bn2.weight), ("bn", net.bn2.bias)]
        assert roles == [(role, id(p)) for role, p in expected]
    small = reg.prune()
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    net.eval()
    small.eval()
    torch.testing.assert_close(small(x), net(x), rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())


def test_zero_pruned_clears_every_pruned_parameter_now():
    net = InvertedResidualNet()
    reg = TPPRegularizer(net, {"expand": 0.5}, schedule=TINY)
    idx = reg.pruned["expand"]
    carried = (net.expand.weight, net.dw.weight, net.bn1.weight, net.bn2.weight)
    largest = max(float(p.detach()[idx].abs().max()) for p in carried)
    assert reg.zero_pruned() == largest > 0
    for p in (net.expand.weight, net.dw.weight, net.bn1.weight, net.bn1.bias, net.bn2.weight, net.bn2.bias):
        assert not p[idx].any()
    kept = torch.ones(12, dtype=torch.bool)
    kept[idx] = False
    assert net.expand.weight[kept].abs().min() > 0 and net.bn1.weight[kept].min() > 0
    assert reg.zero_pruned() == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_step_compiles_fullgraph(backend, seed):
    """loss + reg.penalty() under torch.compile(fullgraph=True) (AOTAutograd compiles its backward too): no graph
    break, same loss and gradients as eager."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    nets = [make_net(seed, torch.float32).to(device) for _ in range(2)]
    regs = [TPPRegularizer(net, 0.5, schedule=TINY, backend=backend) for net in nets]
    x, y = torch.randn(2, 3, 5, 5, device=device), torch.tensor([1, 3], device=device)

    def loss_of(net, reg):
        return F.cross_entropy(net(x), y) + reg.penalty()

    for reg in regs:
        reg.strength = 0.5
    eager = loss_of(nets[0], regs[0])
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(nets[1], regs[1])
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for (name, p), q in zip(nets[1].named_parameters(), nets[0].parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
