"""Test-wide setup.

* Without a GPU, Triton kernels run in the interpreter (set before they are imported); tests that run kernels pick
  CPU tensors whenever ``tpp_kernels.config.INTERPRET`` is on, GPU or not.
* ``$TPP_BACKEND`` is cleared; tests that assume a prebuilt or missing CUDA extension set that up themselves.
* ``$TPP_CACHE_DIR`` (ImageFolder file lists) points into a temporary folder: tests write nothing to ``~/.cache``.
* Random inputs use fresh seeds on every run; the header prints the base seed and ``TPP_TEST_SEED`` replays it.
"""
import os
import random
import tempfile
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests name their backend; $TPP_BACKEND would override every one of them (tests of it set it with monkeypatch).
os.environ.pop("TPP_BACKEND", None)
os.environ["TPP_CACHE_DIR"] = tempfile.mkdtemp(prefix="tpp-test-cache-")

BASE_SEED = int(os.environ.get("TPP_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"tpp test seed: {BASE_SEED} (TPP_TEST_SEED={BASE_SEED} reproduces this run)"


@pytest.fixture
def seed(request) -> int:
    """A seed fresh per run and distinct per test; failures print it."""
    value = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    request.node.user_properties.append(("seed", value))
    return value


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            item.add_report_section(call.when, "seed", f"seed={seeds[0]} base TPP_TEST_SEED={BASE_SEED}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train fastest on one torch thread, and are then not slowed down by other busy processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
