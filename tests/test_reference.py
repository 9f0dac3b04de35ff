"""The reference penalties: forms agree with each other and with the paper's code, gradients are exact."""
import pytest
import torch
from tolerances import assert_close_to_reference

from tpp import reference

SHAPES = [(1, 3), (2, 1), (7, 5), (13, 3, 3, 3), (33, 17), (64, 2, 1, 1)]


def pruned_sets(n: int, gen: torch.Generator):
    """Empty, one, N−1 (when N > 1) and a random subset of range(n)."""
    perm = torch.randperm(n, generator=gen)
    sets = [perm[:0], perm[:1], perm[: max(n - 1, 0)], perm[: int(torch.randint(0, n + 1, (1,), generator=gen))]]
    return [s.sort().values for s in sets]


def cases(seed: int):
    gen = torch.Generator().manual_seed(seed)
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        for p in pruned_sets(shape[0], gen):
            yield w, p


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pruned_row_form_equals_full_gram_and_reference_run(reduction, seed):
    for w, p in cases(seed):
        fast = reference.decorrelation_penalty(w, p, reduction)
        full = reference.decorrelation_penalty_full(w, p, reduction)
        torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)
        if reduction == "mean":
            torch.testing.assert_close(fast, reference.decorrelation_penalty_reference_run(w, p),
                                       rtol=1e-12, atol=1e-12)


def test_penalty_values_by_hand():
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    g = w @ w.t()  # [[1,1,0],[1,2,2],[0,2,4]]
    p = torch.tensor([2])
    # entries touching filter 2: row 2 and column 2 → 0,2,4 in the row, 0,2 again in the column
    assert reference.decorrelation_penalty(w, p, "sum").item() == 0 + 4 + 16 + 0 + 4
    assert reference.decorrelation_penalty(w, p, "mean").item() == pytest.approx(24 / 9, abs=0)
    target = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    assert reference.diagonal_penalty(w, p, "sum").item() == (g - target).square().sum().item()
    gamma, beta = torch.tensor([3.0, -1.0, 2.0]), torch.tensor([0.5, 1.0, -4.0])
    assert reference.bn_penalty(gamma, beta, torch.tensor([0, 2])).item() == 9 + 4 + 0.25 + 16
    assert reference.bn_penalty(None, None, p).item() == 0


def test_gram_forms_gradcheck(seed):
    gen = torch.Generator().manual_seed(seed)
    for shape in [(5, 3), (6, 2, 2, 1), (1, 4)]:
        w = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        for p in pruned_sets(shape[0], gen):
            for reduction in ("mean", "sum"):
                for fn in (reference.decorrelation_penalty, reference.decorrelation_penalty_full,
                           reference.diagonal_penalty):
                    assert torch.autograd.gradcheck(lambda x: fn(x, p, reduction), (w,))
            assert torch.autograd.gradcheck(lambda x: reference.decorrelation_penalty_reference_run(x, p), (w,))
    gamma = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, b: reference.bn_penalty(g, b, torch.tensor([1, 4])), (gamma, beta))


@pytest.mark.parametrize("variant", reference.VARIANTS)
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
def test_closed_form_gradient_equals_autograd(variant, reduction, seed):
    for w, p in cases(seed):
        w = w.clone().requires_grad_(True)
        (auto,) = torch.autograd.grad(reference.gram_penalty(w, p, variant, reduction), w)
        closed = reference.gram_penalty_grad(w, p, variant, reduction)
        assert closed.shape == w.shape and closed.dtype == w.dtype
        torch.testing.assert_close(closed, auto, rtol=1e-11, atol=1e-12)


def test_gradient_formula_rows(seed):
    """Rows P get 4·R·W, rows K get 4·R[:,K]ᵀ·W_P (tpp-method §2), i.e. 4·(G⊙M)·W."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    p = torch.tensor([0, 3, 7])
    m = torch.ones(9, dtype=torch.float64)
    m[p] = 0
    expected = 4 * ((w @ w.t()) * (1 - torch.outer(m, m))) @ w
    torch.testing.assert_close(reference.gram_penalty_grad(w, p, "decorrelate", "sum"), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_accumulates_in_float32(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w64 = torch.randn(24, 3, 3, 3, generator=gen, dtype=torch.float64)
    p = torch.tensor([1, 5, 6, 20])
    w = w64.to(dtype)
    value = reference.decorrelation_penalty(w, p)
    assert value.dtype == torch.float32
    exact = reference.decorrelation_penalty(w.double(), p)  # same rounded inputs, exact arithmetic
    assert_close_to_reference(value, exact, torch.float32)
    grad = reference.gram_penalty_grad(w, p)
    assert grad.dtype == dtype
    assert_close_to_reference(grad, reference.gram_penalty_grad(w.double(), p), dtype)


def test_never_forms_the_full_gram_for_pruned_rows(monkeypatch):
    """The pruned-row form multiplies a p×D block by D×N: no N×N product is ever formed."""
    shapes = []
    real_matmul = torch.Tensor.__matmul__

    def recording_matmul(a, b):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", recording_matmul)
    w = torch.randn(50, 8, dtype=torch.float64)
    p = torch.tensor([3, 9])
    reference.decorrelation_penalty(w, p)
    reference.gram_penalty_grad(w, p)
    assert shapes and all(a[0] != 50 or b[-1] != 50 for a, b in shapes), shapes


def test_bad_inputs():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="variant"):
        reference.gram_penalty(w, torch.tensor([1]), variant="orth")
    with pytest.raises(ValueError, match="reduction"):
        reference.gram_penalty(w, torch.tensor([1]), reduction="avg")
    with pytest.raises(ValueError, match="at least 2 dims"):
        reference.gram_penalty(torch.randn(4), torch.tensor([1]))
    with pytest.raises(TypeError, match="floating-point"):
        reference.gram_penalty(torch.ones(4, 3, dtype=torch.int64), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        reference.check_pruned_indices(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="distinct"):
        reference.check_pruned_indices(torch.tensor([1, 1]), 4)
    with pytest.raises(ValueError, match="1-D"):
        reference.check_pruned_indices(torch.tensor([[1]]), 4)
    with pytest.raises(TypeError, match="integer"):
        reference.check_pruned_indices(torch.tensor([1.0]), 4)
    with pytest.raises(TypeError, match="tensor"):
        reference.check_pruned_indices([1, 2], 4)
    reference.check_pruned_indices(torch.tensor([], dtype=torch.int64), 4)
