"""How the OpenAI service's launcher builds its command line."""

import pytest

from serving import tritonserver
from serving.openai_api import service
from serving.openai_api.service import OpenAIService


def test_batch_scheduling_starts_the_service_under_chrt(monkeypatch):
    monkeypatch.setattr(tritonserver.shutil, "which", lambda name: f"/usr/bin/{name}")
    command = OpenAIService("127.0.0.1:8001", batch_scheduling=True).command()
    assert command[:3] == ["/usr/bin/chrt", "--batch", "0"]
    assert command[4:6] == ["-m", "serving.openai_api"]


@pytest.mark.parametrize("device, expected", [("cpu", True), ("gpu", False)])
def test_by_default_batch_scheduling_follows_the_engine_device(monkeypatch, tmp_path, device, expected):
    monkeypatch.setattr(tritonserver, "detect_device", lambda: device)
    monkeypatch.setattr(tritonserver.shutil, "which", lambda name: f"/usr/bin/{name}")
    commands = []

    def start_logged(command, *args, **kwargs):
        commands.append(command)
        raise tritonserver.ServerError("not started")

    monkeypatch.setattr(service, "start_logged", start_logged)
    with pytest.raises(tritonserver.ServerError, match="not started"):
        OpenAIService("127.0.0.1:8001", port=tritonserver.free_port(), log_file=tmp_path / "openai.log").start()
    assert (commands[0][0] == "/usr/bin/chrt") == expected
