"""tpp_kernels.plan — the regularizer's fused launch plan — against a float64 reference of the whole penalty.

Random tensor sets: gram tensors (conv/linear weights, channels-last ones, packed attention projections read in 3
segments) and squares tensors (vectors, carriers, segmented biases), odd sizes, p among 1, N−1 and random; fresh
seeds. The plan's value and gradients (autograd path) and its in-place gradients (``add_grads_``) must equal
autograd of the float64 reference; a moved ``.grad`` is followed; the strength is read on the device.
"""
import pytest
import torch
from tolerances import KERNEL_TOLERANCES as TOL

from tpp import reference
from tpp_kernels import config
from tpp_kernels.plan import PenaltyPlan, Rows

# the interpreter runs on CPU tensors, also on a GPU host where TRITON_INTERPRET=1 was set
DEVICE = "cuda" if torch.cuda.is_available() and not config.INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not config.INTERPRET, reason="Triton needs CUDA or the interpreter")


def assert_close(actual, expected, tol, what=""):
    atol = tol * expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def _pruned(gen, n):
    p = [1, n - 1, int(torch.randint(1, n + 1, (), generator=gen))][int(torch.randint(0, 3, (), generator=gen))]
    return torch.randperm(n, generator=gen)[:max(p, 1)].sort().values.to(DEVICE)


def random_terms(seed, dtype=torch.float32):
    """(grams, squares) Rows lists; units spread over segments in some of each."""
    gen = torch.Generator().manual_seed(seed)
    grams, squares = [], []
    for _ in range(int(torch.randint(1, 4, (), generator=gen))):
        n = int(torch.randint(2, 40, (), generator=gen))
        kind = int(torch.randint(0, 3, (), generator=gen))
        if kind == 0:    # conv weight, channels-last when n is odd
            w = torch.randn(n, int(torch.randint(1, 6, (), generator=gen)), 3, 3, generator=gen)
            w = w.to(memory_format=torch.channels_last) if n % 2 else w
            grams.append(Rows(w.to(DEVICE, dtype), _pruned(gen, n)))
        elif kind == 1:  # linear weight
            grams.append(Rows(torch.randn(n, int(torch.randint(1, 70, (), generator=gen)), generator=gen)
                              .to(DEVICE, dtype), _pruned(gen, n)))
        else:            # packed q/k/v projection of n heads of size d: [3·n·d, e], its bias [3·n·d]
            d, e = int(torch.randint(1, 5, (), generator=gen)), int(torch.randint(1, 9, (), generator=gen))
            idx = _pruned(gen, n)
            grams.append(Rows(torch.randn(3 * n * d, e, generator=gen).to(DEVICE, dtype), idx, 3, d * e))
            squares.append(Rows(torch.randn(3 * n * d, generator=gen).to(DEVICE, dtype), idx, 3, d))
            continue
        idx = grams[-1].pruned
        squares.append(Rows(torch.randn(n, generator=gen).to(DEVICE, dtype), idx))                  # bias / γ
        squares.append(Rows(torch.randn(n, 1, 3, 3, generator=gen).to(DEVICE, dtype), idx))        # depthwise
    return grams, squares


def unit_rows(rows: Rows, t: torch.Tensor) -> torch.Tensor:
    """``t`` (laid out like ``rows.tensor``) as [units, segments·length] in memory order."""
    flat = t.permute(*[d for d, _ in sorted(enumerate(t.stride()), key=lambda x: -x[1])]).reshape(-1) \
        if t.dim() > 1 else t.reshape(-1)
    return flat.view(rows.segments, rows.units, rows.length).transpose(0, 1).reshape(rows.units, -1)


def reference_penalty(grams, squares, strength, gram_weight, l2_weight, mean):
    """(loss, grads) in float64 by autograd of the literal formula."""
    leaves = [r.tensor.detach().double().requires_grad_() for r in (*grams, *squares)]
    loss = 0.
    for rows, t in zip(grams, leaves):
        u = unit_rows(rows, t)
        loss = loss + gram_weight * reference.gram_penalty(u, rows.pruned, "decorrelate", "mean" if mean else "sum")
        loss = loss + 0.5 * l2_weight * u[rows.pruned].square().sum()
    for rows, t in zip(squares, leaves[len(grams):]):
        loss = loss + 0.5 * unit_rows(rows, t)[rows.pruned].square().sum()
    loss = strength * loss
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mean", [True, False])
def test_penalty_and_gradients_equal_reference(dtype, mean, seed):
    grams, squares = random_terms(seed, dtype)
    strength = float(torch.empty(()).uniform_(0.1, 2, generator=torch.Generator().manual_seed(seed)))
    plan = PenaltyPlan(grams, squares, gram_weight=7.0, l2_weight=1.0, mean=mean, input_precision="ieee")
    tensors = [r.tensor.requires_grad_() for r in (*grams, *squares)]
    loss = plan.penalty(torch.tensor(strength, device=DEVICE))
    grads = torch.autograd.grad(loss, tensors)
    ref_loss, ref_grads = reference_penalty(grams, squares, strength, 7.0, 1.0, mean)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, TOL[torch.float32][0], "loss")
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert g.stride() == tensors[i].stride()
        assert_close(g, ref, TOL[dtype][1], f"gradient {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_grads_adds_the_same_gradients(dtype, seed):
    grams, squares = random_terms(seed, dtype)
    plan = PenaltyPlan(grams, squares, gram_weight=3.0, l2_weight=0.0, mean=True, input_precision="ieee")
    tensors = [r.tensor for r in (*grams, *squares)]
    before = [torch.randn_like(t) for t in tensors]
    for t, b in zip(tensors, before):
        t.grad = b.clone()
    plan.add_grads_(torch.tensor(0.5, device=DEVICE))
    _, ref_grads = reference_penalty(grams, squares, 0.5, 3.0, 0.0, True)
    for i, (t, b, ref) in enumerate(zip(tensors, before, ref_grads)):  # added in fp32, rounded once
        assert_close(t.grad, b.double() + ref, TOL[dtype][1], f"gradient {i}")


def test_add_grads_follows_moved_grads_and_creates_missing_ones(seed):
    grams, squares = random_terms(seed)
    plan = PenaltyPlan(grams, squares, gram_weight=1.0, l2_weight=1.0, mean=True, input_precision="ieee")
    tensors = [r.tensor for r in (*grams, *squares)]
    strength = torch.tensor(1.0, device=DEVICE)
    plan.add_grads_(strength)  # creates zero grads
    first = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    plan.add_grads_(strength)  # new .grad tensors: the offsets are rebuilt
    for t, f in zip(tensors, first):
        torch.testing.assert_close(t.grad, f)
    strength.fill_(2.0)  # read on the device at every call
    plan.add_grads_(strength)
    for t, f in zip(tensors, first):
        torch.testing.assert_close(t.grad, 3 * f)


def test_bad_input_is_refused_before_any_launch():
    w = torch.randn(5, 4, device=DEVICE)
    with pytest.raises(ValueError, match="at least one tensor"):
        PenaltyPlan([Rows(w, torch.tensor([], dtype=torch.long, device=DEVICE))], [], gram_weight=1, l2_weight=1,
                    mean=True)
    with pytest.raises(ValueError, match="distinct"):
        PenaltyPlan([Rows(w, torch.tensor([1, 1], device=DEVICE))], [], gram_weight=1, l2_weight=1, mean=True)
    with pytest.raises(TypeError, match="float32"):
        PenaltyPlan([Rows(w.double(), torch.tensor([1], device=DEVICE))], [], gram_weight=1, l2_weight=1, mean=True)
    with pytest.raises(ValueError, match="dense"):
        PenaltyPlan([Rows(w.t(), torch.tensor([1], device=DEVICE))], [], gram_weight=1, l2_weight=1, mean=True)
    w.grad = torch.zeros(4, 5, device=DEVICE).t()
    plan = PenaltyPlan([Rows(w, torch.tensor([1], device=DEVICE))], [], gram_weight=1, l2_weight=1, mean=True)
    with pytest.raises(ValueError, match="layout"):
        plan.add_grads_(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(ValueError, match="2 gradients for 1 tensors"):
        plan.add_grads_(torch.tensor(1.0, device=DEVICE), [torch.zeros_like(w)] * 2)


def test_add_grads_into_given_buffers(seed):
    grams, squares = random_terms(seed)
    plan = PenaltyPlan(grams, squares, gram_weight=2.0, l2_weight=1.0, mean=True, input_precision="ieee")
    tensors = [r.tensor for r in (*grams, *squares)]
    buffers = [torch.zeros_like(t) for t in tensors]
    plan.add_grads_(torch.tensor(1.0, device=DEVICE), buffers)
    assert all(t.grad is None for t in tensors)
    _, ref_grads = reference_penalty(grams, squares, 1.0, 2.0, 1.0, True)
    for i, (b, ref) in enumerate(zip(buffers, ref_grads)):
        assert_close(b, ref, TOL[torch.float32][1], f"gradient {i}")


def test_ops_pass_opcheck(seed):
    grams, squares = random_terms(seed)
    plan = PenaltyPlan(grams, squares, gram_weight=2.0, l2_weight=1.0, mean=True, input_precision="ieee")
    strength = torch.tensor(0.7, device=DEVICE)
    tensors = [r.tensor for r in (*grams, *squares)]
    torch.library.opcheck(torch.ops.tpp.plan_penalty.default, (plan.id, strength, tensors))
    _, r = torch.ops.tpp.plan_penalty.default(plan.id, strength, tensors)
    grad = torch.tensor(1.5, device=DEVICE)
    torch.library.opcheck(torch.ops.tpp.plan_penalty_bwd.default, (plan.id, grad, strength, r, tensors))


def test_penalty_compiles_fullgraph(seed):
    """The plan inside torch.compile(fullgraph=True), backward included: same value and gradients as eager."""
    grams, squares = random_terms(seed)
    plan = PenaltyPlan(grams, squares, gram_weight=2.0, l2_weight=1.0, mean=False, input_precision="ieee")
    tensors = [r.tensor.requires_grad_() for r in (*grams, *squares)]
    strength = torch.tensor(0.3, device=DEVICE)
    eager = plan.penalty(strength)
    eager_grads = torch.autograd.grad(eager, tensors)
    compiled = torch.compile(lambda: plan.penalty(strength), fullgraph=True, backend="aot_eager")()
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(torch.autograd.grad(compiled, tensors), eager_grads):
        torch.testing.assert_close(g, e)


def test_a_tensor_shared_by_two_terms_gets_both_gradients(seed):
    """A BatchNorm after a concatenation carries the channels of two units: both index sets land in one .grad."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, generator=gen).to(DEVICE)
    gamma = torch.randn(10, generator=gen).to(DEVICE)
    first, second = torch.tensor([0, 3], device=DEVICE), torch.tensor([6, 9], device=DEVICE)
    plan = PenaltyPlan([Rows(w, first)], [Rows(gamma, first), Rows(gamma, second)], gram_weight=1.0,
                       l2_weight=1.0, mean=True, input_precision="ieee")
    plan.add_grads_(torch.tensor(2.0, device=DEVICE))
    expected = torch.zeros_like(gamma)
    expected[[0, 3, 6, 9]] = 2 * gamma[[0, 3, 6, 9]]
    torch.testing.assert_close(gamma.grad, expected)
