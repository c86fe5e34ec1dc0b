"""The launcher's start/stop, as start_triton.sh uses it: nothing left behind."""

import os
import signal
import time

import psutil
import pytest
import requests
from conftest import ROOT, run_script

from serving.tritonserver import free_port


@pytest.mark.slow
def test_stop_after_the_engine_was_killed_leaves_no_process(tiny_repository, tmp_path):
    pid_file = tmp_path / "server.pid"
    http = free_port()
    start = run_script(
        "-m", "serving.tritonserver", "start",
        "--model-repository", str(tiny_repository),
        "--http-port", str(http), "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
        "--venv", os.environ.get("TEST_VENV", str(ROOT / ".venv")),
        "--log-file", str(tmp_path / "server.log"), "--pid-file", str(pid_file),
        timeout=900,
    )  # fmt: skip
    assert start.returncode == 0, start.stderr
    pid = int(pid_file.read_text())
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    assert requests.get(f"http://127.0.0.1:{http}/v2/health/ready", timeout=10).status_code == 200
    for proc in tree:
        if proc.name().startswith("VLLM::EngineCor"):
            os.kill(proc.pid, signal.SIGKILL)
    time.sleep(1)

    stop = run_script("-m", "serving.tritonserver", "stop", "--pid-file", str(pid_file), timeout=120)
    assert stop.returncode == 0, stop.stderr
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[p.name() for p in alive]}"
    assert not pid_file.exists()
