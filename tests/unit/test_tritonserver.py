"""How the local launcher builds tritonserver's command line."""

import subprocess
import sys
from pathlib import Path

import pytest

from serving import tritonserver
from serving.tritonserver import LocalServer


def server(**options) -> LocalServer:
    return LocalServer(model_repository=Path("/models"), venv=Path("/venv"), **options)


def test_batch_scheduling_starts_tritonserver_under_chrt(monkeypatch):
    monkeypatch.setattr(tritonserver.shutil, "which", lambda name: f"/usr/bin/{name}")
    command = server(batch_scheduling=True).command()
    assert command[:4] == ["/usr/bin/chrt", "--batch", "0", "/venv/tritonserver/bin/tritonserver"]
    assert "--model-repository=/models" in command


@pytest.mark.parametrize("batch_scheduling", [False, None])
def test_without_batch_scheduling_tritonserver_is_the_command(batch_scheduling):
    assert server(batch_scheduling=batch_scheduling).command()[0] == "/venv/tritonserver/bin/tritonserver"


def test_without_chrt_tritonserver_runs_as_it_is(monkeypatch):
    monkeypatch.setattr(tritonserver.shutil, "which", lambda name: None)
    assert server(batch_scheduling=True).command()[0] == "/venv/tritonserver/bin/tritonserver"


@pytest.mark.parametrize("device, expected", [("cpu", True), ("gpu", False)])
def test_by_default_batch_scheduling_follows_the_engine_device(monkeypatch, tmp_path, device, expected):
    binary = tmp_path / "tritonserver" / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.touch()
    monkeypatch.setattr(tritonserver, "detect_device", lambda: device)
    monkeypatch.setattr(tritonserver.shutil, "which", lambda name: f"/usr/bin/{name}")
    commands = []

    def start_logged(command, *args):
        commands.append(command)
        raise tritonserver.ServerError("not started")

    monkeypatch.setattr(tritonserver, "start_logged", start_logged)
    with pytest.raises(tritonserver.ServerError, match="not started"):
        LocalServer.on_free_ports(Path("/models"), venv=tmp_path).start()
    assert (commands[0][0] == "/usr/bin/chrt") == expected


BUSY_CHILD = """
import ctypes, sys, time
if sys.argv[1] == "core":
    ctypes.CDLL(None).prctl(15, b"VLLM::EngineCore")  # PR_SET_NAME, as vLLM titles its engine core
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("done", flush=True)
time.sleep(30)
"""


def test_engine_core_cpu_counts_only_the_engine_core_processes():
    children = [subprocess.Popen([sys.executable, "-c", BUSY_CHILD, name], stdout=subprocess.PIPE) for name in ("core", "other")]
    try:
        for child in children:
            assert child.stdout.readline() == b"done\n"
        core, other = (child.pid for child in children)
        assert 0.3 <= tritonserver.engine_core_cpu_s(core) < 0.6
        assert tritonserver.tree_cpu_s(other) >= 0.3 and tritonserver.engine_core_cpu_s(other) == 0
    finally:
        for child in children:
            child.kill()
            child.wait()
