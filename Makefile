# fastbert: `make demo`, `make test`, `make bench`, `make gpu-check`.
# Each target sets itself up on a fresh machine: a .venv with `pip install -e .[dev]`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastbert-installed
# where bench / gpu-check write (unset: benchmarks/results on a GPU, its git-ignored _scratch/
# on CPU)
RESULTS ?=

.PHONY: setup demo test test-fast bench gpu-check clean

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

bench: $(STAMP)
	$(if $(RESULTS),FASTBERT_RESULTS=$(RESULTS)) $(PY) -m benchmarks.run_all

# For the GPU test machine (no network; its own torch and triton): runs from the checkout.
gpu-check:
	FASTBERT_RESULTS=$(or $(RESULTS),benchmarks/results) PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
