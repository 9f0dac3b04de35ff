"""The regularizer on a GPU, through its public API only: CUDA-graph capture of ``apply_gradients()``, no host sync
per step, ``torch.compile(mode="reduce-overhead")`` of a training step. Skipped without CUDA (``make gpu-check``
runs them on the GPU machine).

The capture recipe (README): build the plan with one eager call, keep ``.grad`` (zero it, never set it to None),
capture ``reg.apply_gradients()``; ``reg.step()`` outside the graph updates the strength the replays read.
"""
import pytest
import torch
from test_regularizer import TINY, make_net
from tolerances import assert_same_arithmetic
from torch.nn import functional as F

from tpp import TPPRegularizer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    else:
        from tpp_kernels import cuda_build

        if cuda_build.cuda_home() is None:
            pytest.skip("no CUDA toolkit: the tpp_cuda extension is not built here")
    return request.param


def _net_and_reg(seed, backend):
    net = make_net(seed, torch.float32).cuda()
    reg = TPPRegularizer(net, 0.5, schedule=TINY, backend=backend)
    x = torch.randn(4, 3, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
    net(x).square().mean().backward()  # every .grad exists from here on
    while reg.strength == 0:
        reg.step()
    return net, reg


def _grads(net):
    return {name: p.grad.clone() for name, p in net.named_parameters()}


def _set_grads(net, grads):
    for name, p in net.named_parameters():
        p.grad.copy_(grads[name])


def test_apply_gradients_replays_in_a_cuda_graph(backend, seed):
    net, reg = _net_and_reg(seed, backend)
    initial = _grads(net)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the plan is built outside the capture
        reg.apply_gradients()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reg.apply_gradients()

    for _ in range(2):  # the strength the replay reads is the one at replay time
        strength = reg.strength
        _set_grads(net, initial)
        graph.replay()
        replayed = _grads(net)
        _set_grads(net, initial)
        reg.apply_gradients()
        eager = _grads(net)
        for name in initial:
            assert_same_arithmetic(replayed[name], eager[name], msg=f"{name} at strength {strength}")
        assert any(not torch.equal(eager[name], initial[name]) for name in initial)
        previous = eager
        while reg.strength == strength:
            reg.step()
    _set_grads(net, initial)
    graph.replay()
    assert any(not torch.equal(net.get_parameter(name).grad, previous[name]) for name in initial), \
        "the replay ignored the new strength"


def test_no_host_sync_per_step(backend, seed):
    """After the first step: apply_gradients() and penalty().backward() never synchronize with the host."""
    net, reg = _net_and_reg(seed, backend)
    reg.apply_gradients()
    reg.penalty().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            reg.apply_gradients()
            reg.penalty().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_training_step_compiles_with_reduce_overhead(backend, seed):
    """loss + reg.penalty() under torch.compile(mode="reduce-overhead") (CUDA graphs): the eager loss and gradients,
    and a new strength (reg.step()) without recompiling."""
    nets, regs = zip(*[_net_and_reg(seed, backend) for _ in range(2)])
    x = torch.randn(4, 3, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(seed + 1))
    y = torch.randint(0, 5, (4,), device="cuda", generator=torch.Generator("cuda").manual_seed(seed + 2))

    def loss_of(net, reg):
        return F.cross_entropy(net(x), y) + reg.penalty()

    torch._dynamo.reset()
    compiled = torch.compile(loss_of, mode="reduce-overhead")
    for step in range(4):
        if step == 2:
            torch.compiler.set_stance("fail_on_recompile")
        try:
            for net in nets:
                net.zero_grad(set_to_none=False)
            losses = [loss_of(nets[0], regs[0]), compiled(nets[1], regs[1])]
            for loss in losses:
                loss.backward()
        finally:
            torch.compiler.set_stance("default")
        torch.testing.assert_close(losses[1].detach(), losses[0].detach(), rtol=1e-5, atol=0)
        for (name, p), q in zip(nets[1].named_parameters(), nets[0].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * float(q.grad.abs().max()), msg=name)
        for reg in regs:
            strength = reg.strength
            while reg.strength == strength:
                reg.step()
