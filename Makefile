# `make test` and `make demo` bootstrap .venv on first use, then run.
# TORCH_SPEC is what gets installed when the interpreter has no torch yet: the CPU
# build on these machines; bring your own CUDA torch by installing it into .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergekit-cd-installed

.PHONY: setup test demo bench bench-quality clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest

demo: setup
	$(PY) -m mergekit_cd.cli.demo

bench: setup
	$(PY) benchmarks/bench_solvers.py

bench-quality: setup
	$(PY) benchmarks/bench_quality.py

clean:
	rm -rf $(VENV) build *.egg-info
