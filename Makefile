# kvbench-buzz. `make run` and `make test` set up .venv first when needed (see scripts/setup.sh).
PY ?= .venv/bin/python
ARGS ?=
STAMP := .venv/.stamp

.PHONY: setup run test lint format check bench bench-report train-less wheelhouse clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

## The default job: embedded model, full cache, XSUM, 8 samples, offline.
run: $(STAMP)
	$(PY) run.py $(ARGS)

## The test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

check: lint test

## Decode benchmark on a GPU (random Llama-2-7B-shape model): results/perf/
bench: $(STAMP)
	$(PY) -m buzz.bench $(ARGS)

## Merge benchmark outputs into results/perf (tables, summary.json, plots): make bench-report ARGS="--grid a.json ..."
bench-report: $(STAMP)
	$(PY) -m buzz.perf_report $(ARGS)

## Train LESS kernels for cache=less: make train-less ARGS="model=smollm2-135m base=h2o budget=0.1 steps=300"
train-less: $(STAMP)
	$(PY) -m buzz.less_train $(ARGS)

## Wheels for an offline GPU machine that has torch and transformers: .whl/
wheelhouse:
	bash scripts/wheelhouse.sh .whl

clean:
	rm -rf .venv .pytest_cache .ruff_cache outputs multirun

# Paper tables (experiments/tables.mk): make tables, make table-summarization, make tables-render, ...
-include experiments/tables.mk
