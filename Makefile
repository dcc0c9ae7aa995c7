# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: setup demo test test-slow lint bench
setup: $(STAMP)

demo: $(STAMP)  ## the main job: train on the built-in demo corpus, print a sample
	$(BIN)/lmforge train --data demo --out runs/demo --train.resume auto --config examples/demo.yaml

test: $(STAMP)  ## the default test suite (no slow tests)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q -m "not slow"

test-slow: $(STAMP)  ## the long tests
	$(BIN)/pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/recipe_nanogpt.py
