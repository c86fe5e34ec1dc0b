# make setup   create/refresh .venv (idempotent)
# make test    lint, then the whole test suite against a real local server
# make lint    ruff + shellcheck only
# make test-gpu  the suite on an NVIDIA GPU, GPU-only tests included
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast test-gpu lint clean

setup:
	scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck start_triton.sh scripts/*.sh .ci/run

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-gpu: lint
	TEST_DEVICE=gpu $(PY) -m pytest $(PYTEST_ARGS)

clean:
	./start_triton.sh --stop || true
	rm -rf $(VENV) logs
