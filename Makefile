# Day-to-day commands. The virtualenv is built on first use, from the lock (constraints.txt), and
# rebuilt when pyproject.toml or the lock changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Test files run side by side in this many processes (pytest-xdist; a file's tests stay in one,
# with its module fixtures): most of a test's time is waiting on real servers and workers.
# PYTEST_WORKERS=0 runs them in this one process.
PYTEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help venv lock run test lint docs bench clean-state

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(VENV)/.installed ## create .venv and install the project with its dev tools

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --constraint constraints.txt -e '.[dev]'
	$(BIN)/python scripts/check_lock.py constraints.txt
	touch $@

lock: ## resolve the newest releases pyproject.toml allows into constraints.txt (then: make lint test)
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install '.[dev]'
	{ echo '# The versions CI passed with: make installs exactly these. Refresh with make lock.'; \
	  .lock-venv/bin/python -m pip freeze --exclude optionstore; } > constraints.txt
	rm -rf .lock-venv build

run: venv ## migrate, then run a worker on the embedded default (or the configured services)
	$(BIN)/optionstore migrate && exec $(BIN)/optionstore worker --pool prefork --concurrency 2

test: venv ## run the test suite (extra arguments: PYTEST_ARGS='-k embedded -x'; PYTEST_WORKERS=0: one process)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: venv ## ruff lint, ruff format check, mypy --strict, no merge conflict markers
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy
	@! git grep -nE '^(<<<<<<<|>>>>>>>) ' -- . || { echo "merge conflict markers above"; exit 1; }

docs: venv ## build the documentation site into site/ (strict: a broken link fails)
	$(BIN)/mkdocs build --strict

bench: venv ## run the benchmarks
	$(BIN)/python -m bench

clean-state: ## stop the embedded servers and delete their state folder
	$(BIN)/optionstore embedded stop; rm -rf .optionstore
