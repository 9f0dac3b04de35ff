"""pytest-benchmark setup of the tpp benchmarks. ``make test`` never collects them (pytest.ini: testpaths = tests).

Options: ``--bench-set quick|full`` (default: full on CUDA, else quick), ``--bench-device`` (default: ``cuda``
when available, else ``cpu``) and ``--bench-threads`` (torch CPU threads). ``make bench`` (``benchmarks/run.py``)
runs them and writes the report.

The cases are generated here from the suite (:mod:`workloads`) and the forms that can run on the device
(:mod:`forms`). On CUDA, float32 matmuls run as TF32 in every form (``torch.set_float32_matmul_precision("high")``,
the Triton kernels' default), so all forms compute at the same precision. The JSON's ``machine_info["tpp"]``
records the device, driver and versions (:mod:`machine`), the suite, the measured roofline rates, the load average
at the start and end, and the forms that could not run with the reason.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import forms
import machine
import pytest
import roofline
import torch
from workloads import LAYER_SETS, SUITES, Suite

os.environ.pop("TPP_BACKEND", None)  # every case names its backend; the override would make them all the same

_CONTEXT = pytest.StashKey["BenchContext"]()


@dataclass
class BenchContext:
    device: torch.device
    suite: Suite
    rates: roofline.Rates | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    load_average: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class SweepCase:
    dtype: str
    n: int
    d: int
    ratio: float
    mode: str
    form: str

    def __str__(self) -> str:
        return f"{self.dtype}-N{self.n}-D{self.d}-r{self.ratio}-{self.mode}-{self.form}"


@dataclass(frozen=True)
class LayerSetCase:
    layer_set: str
    mode: str
    form: str

    def __str__(self) -> str:
        return f"{self.layer_set}-{self.mode}-{self.form}"


def _modes(form: str, suite: Suite) -> list[str]:
    return [m for m in suite.modes if m != "in-place" or form not in forms.FULL_GRAM]


def pytest_addoption(parser):
    group = parser.getgroup("tpp benchmarks")
    group.addoption("--bench-set", choices=tuple(SUITES), default=None,
                    help="quick (CPU subset) or full; default: full on CUDA, else quick")
    group.addoption("--bench-device", default=None, help="cpu or cuda[:i]; default: cuda when available")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch CPU threads (torch.set_num_threads); default: torch's own choice")


def pytest_configure(config):
    device = torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    suite = SUITES[config.getoption("--bench-set") or ("full" if device.type == "cuda" else "quick")]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if config.getoption("--bench-threads"):
        torch.set_num_threads(config.getoption("--bench-threads"))
    config.stash[_CONTEXT] = BenchContext(device, suite, load_average=[os.getloadavg()[0]])


def pytest_generate_tests(metafunc):
    ctx = metafunc.config.stash[_CONTEXT]
    s = ctx.suite
    name = metafunc.function.__name__
    if name == "test_sweep":
        cases = [SweepCase(dt, n, d, r, mode, f) for dt in s.sweep_dtypes for n in s.sweep_n for d in s.sweep_d
                 for r in s.sweep_ratios for f in forms.available(ctx.device, single_layer=True)
                 for mode in _modes(f, s)]
    elif name == "test_layer_set":
        cases = [LayerSetCase(ls, mode, f) for ls in s.layer_sets for f in forms.available(ctx.device)
                 for mode in _modes(f, s)]
    elif name == "test_train_step":
        cases = [(step, variant) for step in s.steps if ctx.device.type == "cuda" or not step.cuda_only
                 for variant in metafunc.module.variants(ctx.device)]
        metafunc.parametrize("step,variant", cases, ids=[f"{st.model}-bs{st.batch}-{v}" for st, v in cases])
        return
    else:
        return
    metafunc.parametrize("case", cases, ids=str)


@pytest.fixture(scope="session")
def bench(request) -> BenchContext:
    """The run's device, suite and (once measured) roofline."""
    return request.config.stash[_CONTEXT]


@pytest.fixture(scope="session")
def rates(bench) -> roofline.Rates:
    """Copy bandwidth and matmul rates of the device, measured once per run before the first case that needs them."""
    bench.rates = roofline.measure(bench.device)
    return bench.rates


@pytest.fixture
def form(bench, case) -> forms.Form:
    """The form named by the case, or a skip saying why it cannot run here."""
    loaded = forms.load(case.form)
    if isinstance(loaded, str):
        bench.unavailable[case.form] = loaded
        pytest.skip(loaded)
    return loaded


def pytest_benchmark_update_machine_info(config, machine_info):
    ctx = config.stash.get(_CONTEXT, None)
    if ctx is None:
        return
    info = machine.describe(ctx.device)
    info.update(suite=ctx.suite.name, load_average=ctx.load_average + [os.getloadavg()[0]],
                roofline=ctx.rates.to_dict() if ctx.rates else None, unavailable=dict(ctx.unavailable),
                layer_sets={k: {"model": v.model, "spec": v.spec, "skip": list(v.skip)} for k, v in LAYER_SETS.items()})
    machine_info["tpp"] = info

