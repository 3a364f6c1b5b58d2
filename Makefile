# `make demo` and `make test` set everything up on first use: a .venv with the package installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gpumanager demo

test: $(STAMP)
	$(BIN)/pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/wake.py

server: $(STAMP)
	$(BIN)/gpumanager server

clean:
	rm -rf $(VENV) build src/*.egg-info
