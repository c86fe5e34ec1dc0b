"""The platform under the model: a fresh engine's first forward pass (Intel AMX),
the CPU scheduling policy of the server's processes and the vLLM version the server runs."""

import os
from pathlib import Path

import pytest
import requests
from helpers import MODEL, SERVER_VENV, start_server, thread_policies, vllm_version


@pytest.fixture(scope="module")
def fresh_server(tiny_repository, tmp_path_factory):
    srv = start_server(tiny_repository, tmp_path_factory.mktemp("logs") / "tritonserver.log")
    yield srv
    srv.stop()


def generate(server, prompt, max_tokens):
    body = {
        "text_input": prompt,
        "parameters": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
    }
    return requests.post(f"{server.url}/v2/models/{MODEL}/generate", json=body, timeout=120)


def test_a_fresh_server_answers_a_one_token_prompt_first(fresh_server):
    # On a CPU with AMX, vLLM's attention kernel killed an engine whose process had not
    # asked Linux for AMX, on the first short prompt it saw.
    first = generate(fresh_server, "Hello", 1)
    assert first.status_code == 200, first.text
    assert (first.json()["num_input_tokens"], first.json()["num_output_tokens"]) == (1, 1)
    second = generate(fresh_server, "The quick brown fox jumps over the lazy dog.", 16)
    assert second.status_code == 200, second.text
    assert second.json()["num_output_tokens"] == 16


@pytest.mark.cpu
def test_the_engine_process_asks_for_amx(fresh_server):
    log = fresh_server.log_file.read_text()
    lines = [line for line in log.splitlines() if "AMX tile permission for process" in line]
    assert lines, "the engine process did not load the AMX worker extension"
    if "amx_tile" in Path("/proc/cpuinfo").read_text():
        assert all(line.endswith(": granted") for line in lines), lines


@pytest.mark.cpu
def test_the_server_and_its_engine_run_under_sched_batch_on_the_cpu(fresh_server):
    tree = thread_policies(fresh_server.process.pid)
    names = [process.name() for process, _ in tree]
    assert names[0] == "tritonserver" and "triton_python_backend_stub" in names, names
    assert any(p.cmdline()[:1] == ["VLLM::EngineCore"] for p, _ in tree), [p.cmdline()[:1] for p, _ in tree]
    for process, policies in tree:
        assert policies == {os.SCHED_BATCH}, (process.name(), policies)


def test_the_model_logs_the_vllm_version_it_runs_on(fresh_server):
    assert f"ready on vLLM {vllm_version(SERVER_VENV)}:" in fresh_server.log_file.read_text()
