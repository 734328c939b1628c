# The commands the README gives. Everything installs itself into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test lint fmt bench demo soak clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

## run: start the local mesh (mock IdP, authorizer, demo services) on loopback
run: $(STAMP)
	$(BIN)/authz run

## demo: walk through the story against the mesh `make run` started (in another terminal)
demo: $(STAMP)
	$(BIN)/authz demo

## test: lint, type-check and run every test
test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## lint: ruff and mypy (strict) on the package
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: benchmarks with ratio tables against real Envoy measured in the same run
bench: $(STAMP)
	$(BIN)/python -m bench

## soak: the reliability suite with 10x the load and durations (on demand, not in CI)
soak: $(STAMP)
	MESHAUTHZ_SOAK=1 $(BIN)/python -m pytest -m reliability tests/reliability

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
