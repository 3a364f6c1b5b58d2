# `make demo` and `make test` set everything up on first use: a .venv with the package installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# `make demo PORT=8001 HOST=0.0.0.0` and `make server PORT=8001` pass them on. HOST counts only on the
# command line: some shells export HOST as the machine's name.
LISTEN := $(if $(PORT),--port $(PORT)) $(if $(filter command line,$(origin HOST)),--host $(HOST))

demo: $(STAMP)
	$(BIN)/gpumanager demo $(LISTEN)

# Tests run real servers where users have them: the GPU node's door is a real nginx, the dashboard
# is driven in a real headless Chromium, the replicas share a real Redis and PostgreSQL. Debian's
# packages, installed here when missing (as root).
SYSTEM_MISSING := $(strip \
	$(shell command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || echo nginx) \
	$(shell [ -x /usr/bin/chromium ] || echo chromium) \
	$(shell [ -x /usr/bin/chromedriver ] || echo chromium-driver) \
	$(shell [ -n "$$(ls /usr/lib/postgresql/*/bin/postgres 2>/dev/null)" ] || echo postgresql) \
	$(shell command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || echo redis-server))

test: $(STAMP)
ifneq ($(SYSTEM_MISSING),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYSTEM_MISSING) >/dev/null \
		|| { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYSTEM_MISSING) >/dev/null; }; \
	else echo "note: the tests need $(SYSTEM_MISSING) (sudo apt-get install $(SYSTEM_MISSING))"; fi
endif
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest -q -n 2 --ignore=tests/test_cluster.py
	@# The replicas' suite runs three servers per test: alone, so its load times no other test.
	$(BIN)/pytest -q -n 2 tests/test_cluster.py

# Types, lint, formatting and the import layers of pyproject.toml: part of `make test`, run first.
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/wake.py
	$(BIN)/python bench/cluster.py

server: $(STAMP)
	@if [ -z "$$GPUMANAGER_CONFIG" ] && [ ! -e config.toml ]; then \
		echo "no config.toml here: write one with $(BIN)/gpumanager init --ollama http://HOST:11434 (see --help)"; \
		exit 2; fi
	$(BIN)/gpumanager server $(LISTEN)

clean:
	rm -rf $(VENV) build src/*.egg-info
