# The commands the README gives. Everything installs itself into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

NATIVE := authz/_native.json
NATIVE_SOURCES := $(shell find authz -name '*.py') tools/build_native.py

.PHONY: run test lint fmt bench demo soak clean native

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

## native: compile the per-request modules with mypyc (authz/native.py); without a C compiler they stay Python
native: $(NATIVE)
$(NATIVE): $(STAMP) $(NATIVE_SOURCES)
	@mkdir -p build
	@$(BIN)/python tools/build_native.py > build/native.log 2>&1 \
		&& tail -n 1 build/native.log \
		|| echo "warning: the mypyc build failed (build/native.log): everything runs as pure Python"

## run: start the local mesh (mock IdP, authorizer, demo services) on loopback
run: $(STAMP) $(NATIVE)
	$(BIN)/authz run

## demo: walk through the story against the mesh `make run` started (in another terminal)
demo: $(STAMP) $(NATIVE)
	$(BIN)/authz demo

## test: lint, type-check and run every test; the unit and proxy tests again on the pure-Python build
test: $(STAMP) $(NATIVE) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	MESHAUTHZ_PURE_PYTHON=1 $(BIN)/python -m pytest $(PYTEST_ARGS) tests/unit $(wildcard tests/integration/test_proxy_*.py)

## lint: ruff and mypy (strict) on the package
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: benchmarks with ratio tables against real Envoy measured in the same run
bench: $(STAMP) $(NATIVE)
	$(BIN)/python -m bench

## soak: the reliability suite with 10x the load and durations (on demand, not in CI)
soak: $(STAMP) $(NATIVE)
	MESHAUTHZ_SOAK=1 $(BIN)/python -m pytest -m reliability tests/reliability

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
	find authz -name '*.so' -delete
	rm -f $(NATIVE)
