# Two commands from a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup test test-slow lint demo bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[test,fast]'
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/pytest

test-slow: setup
	$(BIN)/pytest -m slow

demo: setup
	$(BIN)/profile-relay demo

bench: setup
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/diff.py
	$(BIN)/python bench/dispatch.py

clean:
	rm -rf $(VENV) demo-run .pytest_cache .ruff_cache *.egg-info
