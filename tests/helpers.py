"""What the end-to-end tests share: paths, the model's name, scripts, servers, metrics, streams."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import requests

from serving.client import DEFAULT_MODEL, iter_sse
from serving.tritonserver import ENGINE_CORE_NAME, LocalServer

ROOT = Path(__file__).resolve().parent.parent
MODEL = DEFAULT_MODEL  # the name prepare_qwen_pt.py gives the model by default
PYTHON = sys.executable
SERVER_VENV = Path(os.environ.get("TEST_VENV", ROOT / ".venv"))
DEVICE = os.environ.get("TEST_DEVICE", "cpu")
# prepare_qwen_pt.py flags for the device. On a GPU several test servers share the
# card, and the tiny model's context (2,048) is shorter than the GPU default.
GPU_FLAGS = ["--gpu-memory-utilization", "0.15", "--max-model-len", "2048"]
DEVICE_FLAGS = ["--device", DEVICE] + (GPU_FLAGS if DEVICE == "gpu" else [])


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


def start_server(repository: Path, log_file: Path, **options) -> LocalServer:
    """A real local tritonserver on free ports, started and ready."""
    srv = LocalServer.on_free_ports(
        repository,
        venv=SERVER_VENV,
        log_file=log_file,
        **options,
    )
    return srv.start(timeout_s=float(os.environ.get("TEST_START_TIMEOUT", 600)))


def grpc_inputs(prompt, stream, params, **flags) -> list:
    """The inputs of a gRPC request: text_input (str or bytes), stream,
    sampling_parameters (JSON) and any other boolean inputs."""
    import json

    from serving.triton_inputs import tensor

    inputs = [tensor("text_input", prompt), tensor("stream", stream), tensor("sampling_parameters", json.dumps(params))]
    return inputs + [tensor(name, value) for name, value in flags.items()]


def grpc_stream(url, inputs, timeout_s=120):
    """Send one request on a gRPC stream; return (its responses, None) or (those before the error, the error)."""
    import tritonclient.grpc as grpcclient

    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
    got = []
    try:
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                return got, error
            got.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return got, None
    finally:
        client.stop_stream()
        client.close()


def engine_core_pids(server) -> list[int]:
    """The vLLM engine-core processes under a running ``server``."""
    import psutil

    procs = psutil.Process(server.process.pid).children(recursive=True)
    return [p.pid for p in procs if "EngineCore" in " ".join(p.cmdline()) or p.name().startswith(ENGINE_CORE_NAME)]


def thread_policies(pid: int) -> list[tuple]:
    """Each process of the tree under ``pid``, with the scheduling policies its threads run under."""
    import psutil

    root = psutil.Process(pid)
    return [(p, {os.sched_getscheduler(t.id) for t in p.threads()}) for p in [root, *root.children(recursive=True)]]
