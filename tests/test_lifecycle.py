"""The launcher's start/stop, as start_triton.sh uses it: nothing left behind."""

import json
import os
import signal
import threading
import time

import psutil
import pytest
import requests
from helpers import MODEL, ROOT, run_script, start_server

from serving.client import iter_sse
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


@pytest.mark.slow
def test_stop_lets_a_stream_in_flight_finish(tiny_repository, tmp_path):
    server = start_server(tiny_repository, tmp_path / "server.log")
    params = {"max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    body = {"text_input": "Hi", "stream": True, "return_num_output_tokens": True, "sampling_parameters": json.dumps(params)}
    # Connection: close, or Triton waits for the idle keep-alive connection until its exit timeout.
    stream = requests.post(
        f"{server.url}/v2/models/{MODEL}/generate_stream",
        json=body,
        headers={"Connection": "close"},
        stream=True,
        timeout=120,
    )
    events = iter_sse(stream)
    first = next(events)  # about 2,000 tokens to go: several seconds of work for the tiny model
    stopping = threading.Thread(target=server.stop)
    began = time.monotonic()
    stopping.start()
    received = [first]
    arrived_during_stop = 0
    for event in events:
        received.append(event)
        arrived_during_stop += stopping.is_alive()
    stream.close()
    stopping.join()
    assert arrived_during_stop > 0, "the stream had ended before the server was stopped"
    assert sum(e["num_output_tokens"] for e in received) == 2000
    assert time.monotonic() - began < server.exit_timeout_s
    assert server.process.returncode == 0
    log = (tmp_path / "server.log").read_text()
    assert "shutdown complete" in log
