"""The launcher's start/stop, as start_triton.sh uses it: nothing left behind."""

import json
import os
import signal
import subprocess
import threading
import time

import openai
import psutil
import pytest
import requests
from helpers import MODEL, ROOT, run_script, start_server

from serving.client import iter_sse
from serving.tritonserver import free_port, port_in_use


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


def start_script(*args, env, timeout=900):
    return subprocess.run(
        ["./start_triton.sh", *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("flags, starts_openai", [((), True), (("--no-openai",), False)])
def test_start_script_starts_the_openai_api_unless_told_not_to(tiny_repository, tmp_path, flags, starts_openai):
    env = {"MODEL_REPOSITORY": str(tiny_repository), "LOG_DIR": str(tmp_path)}
    dry = start_script("--mode", "local", "--dry-run", *flags, env=env)
    assert dry.returncode == 0, dry.stderr
    assert ("serving.openai_api.service start" in dry.stdout) == starts_openai


@pytest.mark.parametrize("gpu, workers", [(False, "1"), (True, "4")])
def test_start_script_runs_four_openai_processes_beside_a_gpu(tiny_repository, tmp_path, monkeypatch, gpu, workers):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvidia_smi = bin_dir / "nvidia-smi"  # lists a GPU, or fails as it does on a machine without a driver
    nvidia_smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n" if gpu else "#!/bin/sh\nexit 9\n")
    nvidia_smi.chmod(0o755)
    env = {"MODEL_REPOSITORY": str(tiny_repository), "LOG_DIR": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    monkeypatch.delenv("OPENAI_WORKERS", raising=False)
    dry = start_script("--mode", "local", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"--workers {workers} " in dry.stdout
    dry = start_script("--mode", "local", "--dry-run", env={**env, "OPENAI_WORKERS": "2"})
    assert "--workers 2 " in dry.stdout


@pytest.mark.parametrize("value, flag", [("1", " --batch-scheduling"), ("0", " --no-batch-scheduling"), ("", "")])
def test_start_script_passes_batch_scheduling_to_the_server_and_the_openai_api(tiny_repository, tmp_path, value, flag):
    env = {"MODEL_REPOSITORY": str(tiny_repository), "LOG_DIR": str(tmp_path), "BATCH_SCHEDULING": value}
    dry = start_script("--mode", "local", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    server = next(line for line in lines if "serving.tritonserver start" in line)
    assert server.endswith(f"--pid-file {tmp_path}/tritonserver.pid{flag}")
    openai = next(line for line in lines if "serving.openai_api.service start" in line)
    assert openai.endswith(f"--pid-file {tmp_path}/openai.pid{flag}")


def test_start_script_refuses_a_bad_batch_scheduling_value(tmp_path):
    bad = start_script("--mode", "local", "--dry-run", env={"BATCH_SCHEDULING": "yes", "LOG_DIR": str(tmp_path)})
    assert bad.returncode == 2
    assert "BATCH_SCHEDULING must be 1 or 0, not 'yes'" in bad.stderr


@pytest.mark.slow
def test_start_script_serves_triton_and_openai_then_stop_ends_both(tiny_repository, tmp_path):
    ports = {name: free_port() for name in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT", "OPENAI_PORT")}
    env = {**{k: str(v) for k, v in ports.items()}, "MODEL_REPOSITORY": str(tiny_repository), "LOG_DIR": str(tmp_path)}
    env["OPENAI_API_KEY"] = "sk-local"
    try:
        start = start_script("--mode", "local", env=env)
        assert start.returncode == 0, start.stdout + start.stderr
        assert f"OpenAI   http://127.0.0.1:{ports['OPENAI_PORT']}/v1" in start.stdout
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['OPENAI_PORT']}/v1", api_key="sk-local", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=3).usage.completion_tokens >= 1
        # Requests the model refuses: the stop after them must still unload the model gracefully.
        too_long = "hello " * 3000
        for _ in range(300):
            with pytest.raises(openai.BadRequestError, match="context length"):
                client.completions.create(model=MODEL, prompt=too_long, max_tokens=2)
    finally:
        stopping = time.monotonic()
        stop = start_script("--stop", env=env, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert time.monotonic() - stopping < 30, "the stop waited for Triton's exit timeout"
    log = (tmp_path / "tritonserver.log").read_text()
    assert "[vllm] shutdown complete" in log and "Non-graceful" not in log
    assert not [p for p in ports.values() if port_in_use("127.0.0.1", p)], "a port is still served after --stop"
    assert not list(tmp_path.glob("*.pid"))
