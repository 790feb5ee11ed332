# Developer entry points. `make test` on a fresh clone sets everything up and runs the suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast bench gpu-check lint build clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): requirements-dev.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $(STAMP)

BUILT := $(VENV)/.built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)

# Rebuilds densefuse._C only when its sources change (an editable install builds from scratch).
$(BUILT): $(STAMP) $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(BUILT)

build: $(BUILT)

test: build
	$(BIN)/python -m pytest -q

bench: build
	$(BIN)/python -m pytest benchmarks -q --benchmark-enable --benchmark-only \
		--benchmark-columns=median,iqr,rounds --benchmark-sort=name

# On a CUDA machine: installs the project, runs the GPU tests and the GPU benchmark report.
gpu-check:
	bash benchmarks/gpu_check.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf build *.egg-info densefuse/_C*.so
