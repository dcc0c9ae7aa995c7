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
	$(BIN)/python -m lmforge.models.native || echo "lmforge: no C++ decoding step (decoding runs in Python)"
	touch $(STAMP)

.PHONY: setup demo train-demo test test-slow bench
setup: $(STAMP)

demo: $(STAMP)  ## the main job: a 3-minute search on the built-in demo corpus, then a sample from the best model
	$(BIN)/lmforge tune --data demo --out runs/demo --budget 3m
	$(BIN)/lmforge generate runs/demo "def " --do-sample --temperature 0.8 --top-k 50 --seed 0 --max-new-tokens 300

train-demo: $(STAMP)  ## a single training run on the demo corpus (about a minute)
	$(BIN)/lmforge train --data demo --out runs/train-demo --train.resume auto --config examples/demo.yaml

test: $(STAMP)  ## the default test suite (no slow tests), after lint, the layer contracts and the type check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q -m "not slow"

test-slow: $(STAMP)  ## the long tests
	$(BIN)/pytest -q -m slow

bench: $(STAMP)  ## every benchmark (tens of minutes; each prints a table and a RESULT line)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/recipe_nanogpt.py
	$(BIN)/python benchmarks/generate_throughput.py
	$(BIN)/python benchmarks/task_metrics.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/search_vs_baselines.py
