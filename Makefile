# Strata: `make run` starts the whole suite, `make test` runs every test. `make help` lists the rest.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
UV_VERSION := 0.13.8
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format typecheck bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Strata needs Python 3.11 or newer" or 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Re-sync only when a pyproject changed; the stamp makes a second `make run` start at once.
$(VENV)/.synced: $(UV) pyproject.toml libs/*/pyproject.toml services/*/pyproject.toml
	$(UV) sync --all-packages --python $(BIN)/python
	@touch $@

install: $(VENV)/.synced ## Create .venv and install the workspace

run: install ## Start NATS and the five services (gateway on :8000; STRATA_DATA_DIR, STRATA_GATEWAY_PORT move them)
	$(BIN)/python -m strata.common.devrun

test: install ## Run every test (CI=true turns missing PostgreSQL into a failure)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install ## ruff check, ruff format --check, mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy libs/common/src services/*/src

format: install ## Format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install ## Run the benchmarks (not part of make test)
	$(BIN)/python -m bench

clean: ## Remove .venv and the local data folder
	rm -rf $(VENV) .data
