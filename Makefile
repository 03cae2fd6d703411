# Day-to-day commands. The virtualenv is built on first use and rebuilt when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv run test lint bench clean-state

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(VENV)/.installed ## create .venv and install the project with its dev tools

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

run: venv ## migrate, then run a worker on the embedded default (or the configured services)
	$(BIN)/optionstore migrate && exec $(BIN)/optionstore worker --pool prefork --concurrency 2

test: venv ## run the test suite (extra arguments: PYTEST_ARGS='-k embedded -x')
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv ## ruff lint, ruff format check, mypy --strict, no merge conflict markers
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy
	@! git grep -nE '^(<<<<<<<|>>>>>>>) ' -- . || { echo "merge conflict markers above"; exit 1; }

bench: venv ## run the benchmarks
	$(BIN)/python -m bench

clean-state: ## stop the embedded servers and delete their state folder
	$(BIN)/optionstore embedded stop; rm -rf .optionstore
