"""Checks of the benchmark helpers themselves (no timing): ``pytest benchmarks -k helpers``."""
from __future__ import annotations

import json

import forms
import pytest
import roofline
import run
import torch
from report import write_report
from timing import Policy, run_case

from tpp import reference


@pytest.mark.parametrize("name", forms.NAMES)
def test_form_computes_the_reference_penalty_and_gradients(name):
    """Each form's wiring on CPU tensors (Triton and CUDA forms run their ops' CPU kernels here)."""
    form = forms.load(name)
    if isinstance(form, str):
        pytest.skip(form)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, *shape, generator=gen).requires_grad_(True) for n, shape in ((8, (3, 3, 3)), (5, (7,)))]
    pruned = [torch.tensor([1, 4, 6]), torch.tensor([0])]
    expected = sum(reference.decorrelation_penalty(w.double(), p) for w, p in zip(weights, pruned))
    grads = [reference.gram_penalty_grad(w.detach().double(), p) for w, p in zip(weights, pruned)]
    loss = form.penalty(weights, pruned)
    loss.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    for w, g in zip(weights, grads):
        torch.testing.assert_close(w.grad.double(), g, rtol=1e-5, atol=1e-7)
    if form.add_grad is not None:
        added = [torch.ones_like(w) for w in weights]
        form.add_grad(weights, added, pruned)
        for a, g in zip(added, grads):
            torch.testing.assert_close(a.double(), g + 1, rtol=1e-5, atol=1e-7)


def test_gram_work_counts_minimal_flops_and_bytes():
    n, d, p, s = 4, 3, 1, 4
    assert roofline.gram_work(n, d, p, "fwd", s) == (2 * p * n * d, (n + p) * d * s)
    macs = p * n * d + p * n * d + (n - p) * p * d
    assert roofline.gram_work(n, d, p, "fwd+bwd", s) == (2 * macs, (n + p) * d * s + n * d * s)
    assert roofline.gram_work(n, d, p, "in-place", s) == (2 * macs, (n + p) * d * s + 2 * n * d * s)
    assert roofline.gram_work(n, d, 0, "fwd+bwd", s)[0] == 0
    with pytest.raises(ValueError, match="mode"):
        roofline.gram_work(n, d, p, "bwd", s)


def test_floor_is_the_slower_of_memory_and_compute():
    rates = roofline.Rates(copy_bytes_per_s=1e9, matmul_flops_per_s={"float32": 1e12, "bfloat16": 4e12})
    assert rates.floor(flops=1e9, nbytes=1e9, dtype="float32") == pytest.approx(1.0)       # memory-bound
    assert rates.floor(flops=8e12, nbytes=1e6, dtype="bfloat16") == pytest.approx(2.0)     # compute-bound
    assert roofline.Rates.from_dict(json.loads(json.dumps(rates.to_dict()))) == rates


def test_policy_rounds_fill_the_budget_within_bounds():
    policy = Policy(warmup=1, budget_s=1.0, min_rounds=3, max_rounds=10)
    assert policy.rounds(0.2) == 5
    assert policy.rounds(10.0) == 3
    assert policy.rounds(0.0) == 10


def test_run_case_sets_up_before_every_timed_call():
    events = []

    class FakeBenchmark:
        def pedantic(self, target, setup, rounds, iterations, warmup_rounds):
            assert (iterations, warmup_rounds) == (1, 0)
            for _ in range(rounds):
                setup()
                target()

    run_case(FakeBenchmark(), lambda: events.append("call"), torch.device("cpu"), Policy(2, 0.0, 3, 3),
             setup=lambda: events.append("setup"))
    assert events == ["setup", "call"] * 5  # 2 warm-up + 3 timed


def _bench(kind: str, median: float, **info) -> dict:
    name = "-".join(str(v) for v in info.values())
    stats = {"median": median, "iqr": median / 10, "rounds": 5}
    return {"fullname": f"{kind}[{name}]", "extra_info": {"kind": kind, **info}, "stats": stats}


def _fake_run() -> dict:
    benches = []
    for form, t in (("paper", 0.1), ("pruned-row", 0.01), ("compiled", 0.004), ("triton-grouped", 0.001)):
        for mode in ("fwd", "fwd+bwd", "in-place"):
            if mode == "in-place" and form == "paper":
                continue
            benches.append(_bench("layer_set", t, layer_set="resnet50-2.31x", mode=mode, form=form, dtype="float32",
                                  layers=32, pruned=3346, flops=1e9, bytes=1e6, floor_s=0.0004))
            for ratio in (0.3, 0.9):
                benches.append(_bench("layer_set", t * ratio, layer_set=f"resnet56-{ratio}", mode=mode, form=form,
                                      dtype="float32", layers=27, pruned=100, flops=1e7, bytes=1e5, floor_s=1e-5))
                benches.append(_bench("sweep", t * ratio, dtype="float32", n=256, d=1152, ratio=ratio, p=77,
                                      mode=mode, form=form, flops=1e7, bytes=1e5, floor_s=1e-5))
    benches.append(_bench("step", 0.2, model="resnet50", batch=256, layer_set="resnet50-2.31x", variant="none"))
    for variant, t in (("paper", 0.250), ("triton", 0.201)):
        benches.append(_bench("step", t, model="resnet50", batch=256, layer_set="resnet50-2.31x", variant=variant,
                              paired_none_s=0.199, paired_overhead_s=t - 0.2))
    tpp = {"device": "Fake GPU", "device_type": "cuda", "driver": "1.0", "cuda_runtime": "13.0",
           "compute_capability": "9.0", "device_memory_gib": 80, "cpu": "Fake CPU", "torch_threads": 2,
           "torch": "2.x", "triton": "3.x", "python": "3.11", "float32_matmul_precision": "high", "suite": "full",
           "load_average": [0.5, 0.6], "unavailable": {"cuda": "not built"},
           "roofline": {"copy_bytes_per_s": 3e12, "matmul_flops_per_s": {"float32": 4e14}}}
    return {"machine_info": {"tpp": tpp}, "commit_info": {"id": "abc123", "dirty": False},
            "datetime": "2026-01-01T00:00:00", "benchmarks": benches}


def test_report_writes_tables_targets_and_plots(tmp_path):
    path = tmp_path / "fake-2026-01-01.json"
    path.write_text(json.dumps(_fake_run()))
    written = write_report(path)
    md = (tmp_path / "fake-2026-01-01.md").read_text()
    assert written[0].suffix == ".md" and all(p.stat().st_size > 1000 for p in written[1:])
    assert {p.name for p in written[1:]} == {"fake-2026-01-01-speedup-sweep-float32.png",
                                             "fake-2026-01-01-speedup-layer-sets.png", "fake-2026-01-01-floor.png"}
    assert "| triton-grouped | 1 | 1 | 1 | 100× | 10× | 4× | 40 % |" in md
    assert "- ≥ 50× `paper`: 100× met" in md and "- ≥ 1.5× `compiled`: 4× met" in md
    assert "2.5× the floor missed" in md
    assert "| resnet50 | 256 | resnet50-2.31x | none | 200 | 20 | – | – | – |" in md
    assert "| resnet50 | 256 | resnet50-2.31x | paper | 250 | 25 | 199 | 50 | 20 % |" in md
    assert "Not run: `cuda` — not built" in md
    assert "| resnet56-0.9 | 27 | 100 | 0.01 | 90 (1×) |" in md


def test_merge_keeps_old_cases_not_run_again():
    old, new = _fake_run(), _fake_run()
    new["benchmarks"] = [dict(new["benchmarks"][0], stats={"median": 9.0, "iqr": 0, "rounds": 1})]
    new["machine_info"]["tpp"].update(roofline=None, unavailable={})
    merged = run.merge(old, new)
    assert len(merged["benchmarks"]) == len(old["benchmarks"])
    assert merged["benchmarks"][-1]["stats"]["median"] == 9.0
    assert merged["machine_info"]["tpp"]["roofline"] == old["machine_info"]["tpp"]["roofline"]
    assert merged["machine_info"]["tpp"]["unavailable"] == {"cuda": "not built"}
