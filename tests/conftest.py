"""One real local Triton server on the tiny model, shared by the whole session.

Fixtures and hooks only; what the tests share otherwise is in helpers.py.

Environment variables:
  TEST_VENV         virtual environment the servers run in, with Triton and vLLM (default: .venv)
  TEST_START_TIMEOUT  seconds the server may take to become ready (default: 600)
  TEST_DEVICE       cpu (default) or gpu: the engine defaults the models get; the
                    tests marked for the other device (``gpu``, ``cpu``) are deselected
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DEVICE, DEVICE_FLAGS, MODEL, run_script, start_server

from serving.openai_api.service import TRITON_KEY_HEADER, OpenAIService
from serving.tritonserver import free_port


def pytest_collection_modifyitems(config, items):
    other_device = "cpu" if DEVICE == "gpu" else "gpu"
    elsewhere = [item for item in items if item.get_closest_marker(other_device)]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if not item.get_closest_marker(other_device)]


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    done = run_script("prepare_qwen_pt.py", "--tiny", "--repository", str(repo), *DEVICE_FLAGS)
    assert done.returncode == 0, done.stderr
    return repo


@pytest.fixture(scope="session")
def server(tiny_repository, tmp_path_factory):
    srv = start_server(tiny_repository, tmp_path_factory.mktemp("logs") / "tritonserver.log", api_key="test-key")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def generate_url(server) -> str:
    return f"{server.url}/v2/models/{MODEL}/generate"


@pytest.fixture(scope="session")
def grpc_url(server) -> str:
    return f"{server.host}:{server.grpc_port}"


@pytest.fixture(scope="session")
def openai_service(server, tmp_path_factory):
    """The OpenAI-compatible service in front of the session's server."""
    service = OpenAIService(
        f"{server.host}:{server.grpc_port}",
        port=free_port(),
        triton_headers={TRITON_KEY_HEADER: server.api_key},
        log_file=tmp_path_factory.mktemp("logs") / "openai.log",
    ).start()
    yield service
    service.stop()
