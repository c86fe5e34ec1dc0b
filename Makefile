# make setup   create/refresh .venv (idempotent)
# make system-packages  the Debian packages the tests use (HAProxy; needs root or sudo)
# make test    lint, then the whole test suite against a real local server (unit tests included)
# make test-unit  the unit tests only: the model's logic, no server (tests/unit)
# make lint    ruff + shellcheck only
# make test-gpu  the suite on an NVIDIA GPU, GPU-only tests included
# make test-compat  the tests that exercise model.py, served by the Docker image's
#                vLLM version (its CPU build, in .venv-compat)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
COMPAT_VENV ?= .venv-compat
COMPAT_TESTS := tests/test_http.py tests/test_grpc.py tests/test_features.py tests/test_model_load.py \
	tests/test_platform.py tests/test_reliability.py tests/test_clients.py

.PHONY: setup system-packages test test-unit test-fast test-gpu test-compat lint clean

setup:
	scripts/setup.sh

system-packages:
	scripts/system-packages.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/shellcheck start_triton.sh scripts/*.sh .ci/run

test: lint system-packages
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit -q

test-fast: lint system-packages
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-gpu: lint system-packages
	TEST_DEVICE=gpu $(PY) -m pytest $(PYTEST_ARGS)

test-compat: lint
	VENV=$(COMPAT_VENV) scripts/setup.sh --compat
	TEST_VENV=$(COMPAT_VENV) $(PY) -m pytest -m "not slow" $(COMPAT_TESTS) $(PYTEST_ARGS)

clean:
	./start_triton.sh --stop || true
	rm -rf $(VENV) $(COMPAT_VENV) logs
