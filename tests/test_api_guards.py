"""API guards (issue 13 item 4) and the provably-zero skip (issue 14 item 4): what the regularizer and the kernel ops
refuse or ignore instead of computing something silently wrong.

* frozen parameters (``requires_grad=False``) get no gradient from any path; the zero-out still clears them;
* a module or parameter replaced after the regularizer was built, or a parameter that changed shape, is refused at
  the next call naming it;
* a gradient sharing memory with a weight or another gradient is refused by the in-place ops;
* index tensors written behind autograd's back (``.data``, NumPy, ``inference_mode``) leave no stale plan, and
  ``reg.pruned`` is a copy;
* ``load_state_dict`` is all or nothing;
* once every unit is zeroed, the skipped penalty work changes nothing, bit for bit.
"""
import pytest
import torch
from test_backend_contract import cuda_ops
from test_regularizer import TINY, make_net
from torch import nn

from tpp import GrowingSchedule, TPPRegularizer, reference
from tpp.backends import LoopPlan
from tpp_kernels import config
from tpp_kernels.plan import PenaltyPlan

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA and not config.INTERPRET else "cpu"
BACKENDS = [pytest.param(("torch", "cpu"), id="torch"),
            pytest.param(("triton", KERNEL_DEVICE), id="triton",
                         marks=pytest.mark.skipif(KERNEL_DEVICE == "cpu" and not config.INTERPRET,
                                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")),
            pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"))]


def _regularizer(seed, backend, schedule=TINY):
    name, device = backend
    net = make_net(seed, torch.float32).to(device)
    return net, TPPRegularizer(net, 0.5, schedule=schedule, backend=name)


def _input(seed, device):
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(device)


# --- frozen parameters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters_get_no_gradient_and_do_not_move(backend, seed):
    net, reg = _regularizer(seed, backend)
    frozen = [net.conv2.weight, net.bn2.weight, net.bn2.bias]
    for p in frozen:
        p.requires_grad_(False)
    before = [p.detach().clone() for p in frozen]
    reg.strength = 0.7
    reg.apply_gradients()
    assert all(p.grad is None for p in frozen)
    # the in-place gradients of the trainable parameters are the autograd path's
    added = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    for p in net.parameters():
        p.grad = None
    reg.penalty().backward()
    assert {n for n, p in net.named_parameters() if p.grad is not None} == set(added)
    for n, p in net.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, added[n], rtol=1e-4, atol=1e-5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(frozen, before))
    # unfrozen again: the next call has its terms back
    net.conv2.weight.requires_grad_(True)
    reg.apply_gradients()
    assert net.conv2.weight.grad is not None and net.conv2.weight.grad.abs().sum() > 0


def test_zero_out_still_clears_frozen_parameters(seed):
    net, reg = _regularizer(seed, ("torch", "cpu"))
    net.conv1.weight.requires_grad_(False)
    reg.zero_pruned()
    assert net.conv1.weight[reg.pruned["conv1"]].abs().sum() == 0


# --- replaced modules and parameters ------------------------------------------------------------------------------


def _calls(reg):
    return {"apply_gradients": reg.apply_gradients, "penalty": reg.penalty, "step": reg.step,
            "zero_pruned": reg.zero_pruned, "prune": reg.prune}


def test_replaced_module_is_refused_by_every_call(seed):
    net, reg = _regularizer(seed, ("torch", "cpu"))
    reg.strength = 0.5
    net.conv2 = nn.Conv2d(8, 11, 3, padding=1)
    for name, call in _calls(reg).items():
        with pytest.raises(RuntimeError, match=r"module model\.conv2 was replaced after the TPPRegularizer"):
            call()
    assert reg.iteration == 0


def test_replaced_parameter_and_changed_shape_are_refused(seed):
    net, reg = _regularizer(seed, ("torch", "cpu"))
    net.bn1.bias = nn.Parameter(torch.zeros(8))
    for call in _calls(reg).values():
        with pytest.raises(RuntimeError, match=r"parameter model\.bn1\.bias was replaced"):
            call()
    net, reg = _regularizer(seed, ("torch", "cpu"))
    net.conv3.weight.data = torch.randn(9, 11, 1, 1)
    with pytest.raises(RuntimeError, match=r"model\.conv3\.weight changed shape from \(7, 11, 1, 1\) to \(9, 11"):
        reg.apply_gradients()


def test_prune_refuses_a_replaced_module_the_graph_describes(seed):
    """The classifier has no pruned units, but removal cuts its input columns from the graph's description."""
    net, reg = _regularizer(seed, ("torch", "cpu"))
    net.fc = nn.Sequential(nn.Linear(7, 5))
    reg.apply_gradients()  # the penalty does not touch it
    with pytest.raises(RuntimeError, match=r"module model\.fc was replaced or removed"):
        reg.prune()


def test_moving_the_model_is_no_replacement(seed):
    net, reg = _regularizer(seed, ("torch", "cpu"))
    net.double()
    reg.strength = 0.5
    reg.apply_gradients()
    assert net.conv1.weight.grad.dtype == torch.float64


# --- gradients sharing memory -------------------------------------------------------------------------------------


# the backends that validate their arguments (the torch backend computes each gradient before adding it)
KERNEL_BACKENDS = BACKENDS[1:] + [pytest.param(("cuda", "cpu"), id="cuda-cpu")]


@pytest.mark.parametrize("variant", ["decorrelate", "diagonal"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradient_aliasing_a_weight_or_another_gradient_is_refused(backend, variant, seed):
    import tpp_kernels

    name, device = backend
    ops = cuda_ops() if name == "cuda" else tpp_kernels
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(9, 5, generator=gen).to(device)
    v = torch.randn(9, 5, generator=gen).to(device)
    idx = torch.tensor([1, 4, 6], device=device)
    before = w.clone()
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with weights\[0\]"):
        ops.add_gram_penalty_grad_([w], [w], [idx], 1.0, variant)
    flat = torch.zeros(2 * 45, device=device)
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with weights\[0\]"):
        ops.add_gram_penalty_grad_([flat[:45].view(9, 5), v], [torch.zeros_like(w), flat[40:85].view(9, 5)],
                                   [idx, idx], 1.0, variant)
    g = torch.zeros_like(w)
    with pytest.raises(ValueError, match=r"grads\[[01]\] shares memory with grads\[[01]\]"):
        ops.add_gram_penalty_grad_([w, v], [g, g], [idx, idx], 1.0, variant)
    assert torch.equal(w, before) and torch.equal(g, torch.zeros_like(w))
    gamma, beta = torch.randn(9, generator=gen).to(device), torch.randn(9, generator=gen).to(device)
    shared = torch.zeros(9, device=device)
    with pytest.raises(ValueError, match=r"(beta|gamma)_grads\[0\] shares memory with (gamma|beta)_grads\[0\]"):
        ops.add_bn_penalty_grad_([gamma], [beta], [shared], [shared], [idx], 1.0)
    # disjoint parts of one buffer are fine, and give what separate buffers give
    flat.zero_()
    ops.add_gram_penalty_grad_([w, v], [flat[:45].view(9, 5), flat[45:].view(9, 5)], [idx, idx], 1.0, variant)
    g_w, g_v = torch.zeros_like(w), torch.zeros_like(v)
    ops.add_gram_penalty_grad_([w, v], [g_w, g_v], [idx, idx], 1.0, variant)
    assert torch.equal(flat, torch.cat([g_w.flatten(), g_v.flatten()]))


# --- index tensors ----------------------------------------------------------------------------------------------


WRITES = {
    "data": lambda idx, i: idx.data.__setitem__(0, i),
    "numpy": lambda idx, i: idx.numpy().__setitem__(0, i),
    "inference_mode": lambda idx, i: _in_inference_mode(lambda: idx.__setitem__(0, i)),
}


def _in_inference_mode(write):
    with torch.inference_mode():
        write()


@pytest.mark.skipif(not config.INTERPRET, reason="CPU index tensors of the Triton ops run in the interpreter")
@pytest.mark.parametrize("write", list(WRITES))
def test_index_writes_behind_autograd_leave_no_stale_plan(write, seed):
    import tpp_kernels

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(13, 6, generator=gen, dtype=torch.float32)
    idx = torch.tensor([2, 5, 9])
    tpp_kernels.gram_penalty_multi([w], [idx])  # builds and caches a plan for this index tensor
    g0 = torch.zeros_like(w)
    tpp_kernels.add_gram_penalty_grad_([w], [g0], [idx], 1.0)
    WRITES[write](idx, 11)
    assert idx.tolist() == [11, 5, 9]
    want = reference.gram_penalty(w.double(), idx)
    torch.testing.assert_close(tpp_kernels.gram_penalty_multi([w], [idx]).double(), want, rtol=1e-5, atol=1e-7)
    g = torch.zeros_like(w)
    tpp_kernels.add_gram_penalty_grad_([w], [g], [idx], 1.0)
    torch.testing.assert_close(g.double(), reference.gram_penalty_grad_fp32(w, idx, "decorrelate", "mean").double()
                               .view_as(g), rtol=1e-5, atol=1e-7)
    gamma, beta = torch.randn(13, generator=gen), torch.randn(13, generator=gen)
    tpp_kernels.bn_penalty([gamma], [beta], [idx])
    WRITES[write](idx, 0)
    torch.testing.assert_close(tpp_kernels.bn_penalty([gamma], [beta], [idx]).double(),
                               reference.bn_penalty(gamma.double(), beta.double(), idx), rtol=1e-5, atol=1e-7)


def test_pruned_sets_handed_out_are_copies(seed):
    net, reg = _regularizer(seed, ("torch", "cpu"))
    reg.strength = 0.5
    value, sets = reg.penalty(), reg.pruned
    handed = reg.pruned
    handed["conv2"][0] = 10 - handed["conv2"][0]
    handed["conv2"].numpy()[1] = 3
    del handed["conv1"]
    assert reg.pruned.keys() == sets.keys() and all(torch.equal(reg.pruned[n], sets[n]) for n in sets)
    assert torch.equal(reg.penalty(), value)
    assert reg.prune().conv2.out_channels == 11 - sets["conv2"].numel()


# --- load_state_dict ------------------------------------------------------------------------------------------


def test_load_state_dict_is_all_or_nothing(seed):
    net, reg = _regularizer(seed, ("torch", "cpu"))
    for _ in range(3):
        reg.step()
    before = reg.state_dict()
    other = {**before, "iteration": 9, "pruned": {"conv1": torch.tensor([0, 1]), "conv2": torch.tensor([2])}}
    for bad in ({**other, "strength_override": "high"}, {**other, "strength_override": -1.0},
                {**other, "pruned": {**other["pruned"], "conv3": torch.tensor([7])}},
                {**other, "pruned": {"conv1": [0, 1]}}, {**other, "schedule": None}):
        with pytest.raises((ValueError, TypeError)):
            reg.load_state_dict(bad)
        after = reg.state_dict()
        assert after.keys() == before.keys() and after["iteration"] == 3
        assert after["pruned"].keys() == before["pruned"].keys()
        assert all(torch.equal(after["pruned"][n], before["pruned"][n]) for n in before["pruned"])
    reg.strength = 0.5
    reg.apply_gradients()  # still bound to its own sets
    reg.load_state_dict(other)
    assert reg.iteration == 9 and {n: i.tolist() for n, i in reg.pruned.items()} == {"conv1": [0, 1], "conv2": [2]}


# --- the provably-zero skip -------------------------------------------------------------------------------------


SHORT = GrowingSchedule(delta=0.5, interval=1, stabilize_iters=6, zero_out_interval=1)  # t_s = 2, 3 units


def _train(backend, seed, path, touch, monkeypatch):
    """Regularize through the zero-out of every unit (SHORT: all zeroed by step 5) and 3 iterations beyond;
    ``touch`` bumps every parameter's version after each step (x·1 = x bit for bit), so nothing is skipped."""
    net, reg = _regularizer(seed, backend, SHORT)
    calls = []
    for plan in (LoopPlan, PenaltyPlan):
        monkeypatch.setattr(plan, "add_grads_", lambda self, s, *a, f=plan.add_grads_: calls.append(1) or
                            f(self, s, *a))
        monkeypatch.setattr(plan, "penalty", lambda self, s, f=plan.penalty: calls.append(1) or f(self, s))
    opt = torch.optim.SGD(net.parameters(), lr=0.002, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(9):
        x = torch.randn(4, 3, 6, 6, generator=gen).to(backend[1])
        loss = net(x).square().mean()
        opt.zero_grad(set_to_none=False)
        if path == "penalty":
            loss = loss + reg.penalty()
        loss.backward()
        if path == "apply_gradients":
            reg.apply_gradients()
        opt.step()
        reg.step()
        if touch:
            with torch.no_grad():
                for p in net.parameters():
                    p.mul_(1)
    monkeypatch.undo()
    return net, opt, len(calls)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["apply_gradients", "penalty"])
def test_skipped_zero_penalty_equals_the_computed_one_bit_for_bit(backend, path, seed, monkeypatch, one_torch_thread):
    skipped, opt_s, calls_s = _train(backend, seed, path, False, monkeypatch)
    computed, opt_c, calls_c = _train(backend, seed, path, True, monkeypatch)
    assert calls_s == calls_c - 3  # iterations 6 to 8 skipped
    for (name, a), b in zip(skipped.state_dict().items(), computed.state_dict().values()):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name
    for a, b in zip(opt_s.state.values(), opt_c.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_no_skip_after_a_write_the_version_counter_sees(seed):
    net, reg = _regularizer(seed, ("torch", "cpu"))
    for _ in range(18):  # TINY: every unit zeroed by step 17
        reg.step()
    reg.strength = 1.0
    assert reg.penalty().item() == 0
    with torch.no_grad():
        net.conv1.weight.add_(0.5)
    assert reg.penalty().item() > 0
