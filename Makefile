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

# The GPU node's door is tested against a real nginx: installed here when missing (Debian, as root).
NGINX_MISSING := $(shell command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || echo yes)

test: $(STAMP)
ifeq ($(NGINX_MISSING),yes)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx >/dev/null \
		|| { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx >/dev/null; }; \
	else echo "note: nginx is not installed; the GPU node door test needs it (sudo apt-get install nginx)"; fi
endif
	$(BIN)/pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/wake.py

server: $(STAMP)
	$(BIN)/gpumanager server

clean:
	rm -rf $(VENV) build src/*.egg-info
