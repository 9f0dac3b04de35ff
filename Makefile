# The README's commands. `make test` and `make demo` install what they need into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint bench clean

setup: $(STAMP)

$(STAMP): setup.py requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests -q

lint: setup
	$(VENV)/bin/ruff check --select E,F,W,I --line-length 120 tpp tpp_kernels tests benchmarks

# Benchmarks (benchmarks/run.py): the quick CPU subset, or the full set on a GPU; writes benchmarks/results/.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--only sweep" or BENCH_ARGS="--threads 1".
bench: setup
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# The full set whatever the device (on a CPU it takes hours).
.PHONY: bench-full
bench-full: setup
	$(PY) benchmarks/run.py --set full $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache

.PHONY: cuda

# Build the csrc/ extension (torch.ops.tpp_cuda) now; tpp_kernels.cuda and the tests otherwise build it on first use.
cuda: setup
	$(PY) -m tpp_kernels.cuda_build --verbose

# On a GPU host, offline, with its own python3 (no venv, no pip): build csrc/, the GPU tests, the regularizer smoke, the
# ResNet50 2.31x timing table, the training throughput; <= 8 min; results in benchmarks/results/ (and $$OUT when set).
# GPU_CHECK_ARGS="--dry-run" runs every stage's plumbing on tiny CPU shapes.
.PHONY: gpu-check
gpu-check:
	env -u TRITON_INTERPRET PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The offline demo: L1 vs OrthP vs TPP on the embedded digits (MLP-7-Linear and a small CNN), a few minutes on a CPU.
.PHONY: demo
demo: setup
	$(PY) -m tpp.demo

# The kernel and regularizer tests on the GPU machine's versions (requirements-compat.txt: torch 2.11, triton 3.6,
# numpy < 2.4) in a second venv, on the CPU under the Triton interpreter. Not part of CI (which runs the dev set).
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_TESTS ?= tests/test_backend_contract.py tests/test_kernels.py tests/test_cuda_ops.py tests/test_regularizer.py

.PHONY: compat
compat: $(COMPAT_VENV)/.installed
	$(COMPAT_PY) -c "import torch, triton, numpy; print('compat set: torch', torch.__version__, \
		'triton', triton.__version__, 'numpy', numpy.__version__)"
	TRITON_INTERPRET=1 PYTHONPATH=. $(COMPAT_PY) -m pytest $(COMPAT_TESTS) -q -p no:cacheprovider

$(COMPAT_VENV)/.installed: requirements-compat.txt
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q -r requirements-compat.txt
	touch $@
