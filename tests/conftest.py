"""One real local Triton server on the tiny model, shared by the whole session.

Environment variables:
  TEST_VENV         virtual environment the servers run in, with Triton and vLLM (default: .venv)
  TEST_START_TIMEOUT  seconds the server may take to become ready (default: 600)
  TEST_DEVICE       cpu (default) or gpu: the engine defaults the models get; the
                    tests marked for the other device (``gpu``, ``cpu``) are deselected
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from serving.client import iter_sse
from serving.tritonserver import LocalServer

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-0.5b"
PYTHON = sys.executable
SERVER_VENV = Path(os.environ.get("TEST_VENV", ROOT / ".venv"))
DEVICE = os.environ.get("TEST_DEVICE", "cpu")
# prepare_qwen_pt.py flags for the device. On a GPU several test servers share the
# card, and the tiny model's context (2,048) is shorter than the GPU default.
GPU_FLAGS = ["--gpu-memory-utilization", "0.15", "--max-model-len", "2048"]
DEVICE_FLAGS = ["--device", DEVICE] + (GPU_FLAGS if DEVICE == "gpu" else [])


def pytest_collection_modifyitems(config, items):
    other_device = "cpu" if DEVICE == "gpu" else "gpu"
    elsewhere = [item for item in items if item.get_closest_marker(other_device)]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if not item.get_closest_marker(other_device)]


def run_script(*args: str, timeout: float = 300, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def metrics(server) -> dict:
    """This model's figures on the metrics port, by metric name."""
    values = {}
    for line in requests.get(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:") and f'model="{MODEL}"' in line and 'version="1"' in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values


def metric(server, name) -> float:
    values = metrics(server)
    if name not in values:
        raise AssertionError(f"{name} missing from /metrics")
    return values[name]


def sse_events(resp) -> list[dict]:
    return list(iter_sse(resp))


def vllm_version(venv: Path) -> str:
    """The version of vLLM that the servers of ``venv`` run."""
    done = subprocess.run(
        [venv / "bin" / "python", "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def wait_for(condition, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    done = run_script("prepare_qwen_pt.py", "--tiny", "--repository", str(repo), *DEVICE_FLAGS)
    assert done.returncode == 0, done.stderr
    return repo


def start_server(repository: Path, log_file: Path, **options) -> LocalServer:
    """A real local tritonserver on free ports, started and ready."""
    srv = LocalServer.on_free_ports(
        repository,
        venv=SERVER_VENV,
        log_file=log_file,
        **options,
    )
    return srv.start(timeout_s=float(os.environ.get("TEST_START_TIMEOUT", 600)))


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
