"""One real local Triton server on the tiny model, shared by the whole session.

Environment variables:
  TEST_VENV         virtual environment with Triton and vLLM (default: .venv)
  TEST_START_TIMEOUT  seconds the server may take to become ready (default: 600)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.tritonserver import LocalServer, free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "qwen2.5-0.5b"
PYTHON = sys.executable


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


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    done = run_script("prepare_qwen_pt.py", "--tiny", "--repository", str(repo), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    return repo


@pytest.fixture(scope="session")
def server(tiny_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    srv = LocalServer(
        model_repository=tiny_repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        venv=Path(os.environ.get("TEST_VENV", ROOT / ".venv")),
        log_file=log,
        api_key="test-key",
    )
    srv.start(timeout_s=float(os.environ.get("TEST_START_TIMEOUT", 600)))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def generate_url(server) -> str:
    return f"{server.url}/v2/models/{MODEL}/generate"


@pytest.fixture(scope="session")
def grpc_url(server) -> str:
    return f"{server.host}:{server.grpc_port}"
