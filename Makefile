# fastbert: `make demo`, `make test`, `make bench`, `make gpu-check`.
# Each target sets itself up on a fresh machine: a .venv with `pip install -e .[dev]`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastbert-installed
# where bench / gpu-check write (unset: benchmarks/results on a GPU, its git-ignored _scratch/
# on CPU)
RESULTS ?=

.PHONY: setup demo test test-fast test-min-torch bench bench-wheels gpu-check clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastbert.cli demo

# over every core (pytest-xdist, a dev dependency): on the 2-core CI machine ~5 min instead
# of ~20 one process at a time (the interpreter and the AOT compiles are CPU-bound)
test: $(STAMP)
	$(PY) -m pytest tests -q -n auto

# The oldest torch that pyproject admits (2.11, the GPU machine's) in its own venv, with a
# Triton whose interpreter runs our kernels (3.8; the GPU machine's 3.6 interpreter cannot):
# Dynamo's tracing rules differ between torch releases (2.11 cannot trace some calls 2.14 can),
# and CI runs only the newest. Not part of `make test` (a ~3 GB download). PYTEST_ARGS narrows
# it, e.g. PYTEST_ARGS='-k "compile or fullgraph"'.
MIN_VENV ?= .venv-torch-min
PYTEST_ARGS ?=
test-min-torch:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -c "import torch, triton, pytest, xdist, pytest_timeout, numpy; \
	  assert torch.__version__.startswith('2.11.') and triton.__version__ == '3.8.0'" 2>/dev/null || { \
	  $(MIN_VENV)/bin/python -m pip install --quiet "torch==2.11.0" numpy "pytest>=8" pytest-xdist pytest-timeout && \
	  $(MIN_VENV)/bin/python -m pip install --quiet --no-deps "triton==3.8.0"; }
	TRITON_INTERPRET=1 PYTHONPATH=$(CURDIR) $(MIN_VENV)/bin/python -m pytest tests -q -n auto $(PYTEST_ARGS)

bench: $(STAMP)
	$(if $(RESULTS),FASTBERT_RESULTS=$(RESULTS)) $(PY) -m benchmarks.run_all

# peers the GPU machine (no network) lacks, as wheels for gpu-check to install for the benches:
# run here, then carry .bench_wheels to the device call
BENCH_WHEELS := liger-kernel==0.8.5
bench-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps -d .bench_wheels $(BENCH_WHEELS)

# For the GPU test machine (no network; its own torch and triton): runs from the checkout.
gpu-check:
	FASTBERT_RESULTS=$(or $(RESULTS),benchmarks/results) PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
