"""Loading models: LoRA adapters, and clear load-time errors for a bad model.json
or config.pbtxt. A server of its own in explicit model-control mode, so that each
model loads, or fails to, on request while the others keep serving."""

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from helpers import DEVICE_FLAGS, MODEL, run_script, sse_events, start_server, wait_for

from serving.tiny_model import make_lora_adapter

ADAPTERS = {"shout": 1, "whisper": 2}  # adapter name -> seed of its random weights


def prepare(repo: Path, weights: Path, name: str, *flags: str) -> Path:
    done = run_script(
        "prepare_qwen_pt.py", "--local-dir", str(weights), "--repository", str(repo),
        "--name", name, *DEVICE_FLAGS, *flags,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return repo / name


@pytest.fixture(scope="module")
def repository(tiny_repository, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("load_repository")
    weights = tiny_repository / MODEL / "1" / "weights"
    lora_flags = []
    for name, seed in ADAPTERS.items():
        adapter = make_lora_adapter(weights, repo.parent / f"adapter-{name}", seed=seed)
        lora_flags += ["--lora", f"{name}={adapter}"]
    prepare(repo, weights, "lora", *lora_flags)

    (prepare(repo, weights, "bad-json") / "1" / "model.json").write_text('{"model": "weights",')
    prepare(repo, weights, "unknown-arg", "--engine-arg", "max_tokenz=5")
    prepare(repo, weights, "lora-without-adapters", "--engine-arg", "enable_lora=true")
    prepare(repo, weights, "context-too-long", "--max-model-len", "1000000")
    prepare(repo, weights, "gpu-split", "--instance-kind", "KIND_GPU", "--tensor-parallel-size", "2")
    prepare(repo, weights, "gpu-instance", "--instance-kind", "KIND_GPU")
    prepare(repo, weights, "too-many-gpus", "--tensor-parallel-size", "64")
    prepare(repo, weights, "paced", "--max-responses-per-second", "10")
    prepare(repo, weights, "direct", "--max-responses-per-second", "0")
    prepare(repo, weights, "threads", "--max-responses-per-second", "0", "--sender-threads", "3")
    prepare(repo, weights, "shared", "--instances", "2")
    prepare(repo, weights, "shared-no-memory", "--instances", "2", "--gpu-memory-utilization", "0.99")
    config = prepare(repo, weights, "no-budget") / "config.pbtxt"
    config.write_text(re.sub(r'parameters: \{ key: "MAX_RESPONSES_PER_SECOND".*\n', "", config.read_text()))
    config = prepare(repo, weights, "bad-rate") / "config.pbtxt"
    config.write_text(re.sub(r'(MAX_RESPONSES_PER_SECOND", value: \{ string_value: )"[^"]*"', r'\1"fast"', config.read_text()))
    return repo


@pytest.fixture(scope="module")
def load_server(repository, tmp_path_factory):
    srv = start_server(
        repository,
        tmp_path_factory.mktemp("logs") / "tritonserver.log",
        extra_args=["--model-control-mode=explicit", "--load-model=lora"],
    )
    yield srv
    srv.stop()


def generate(server, lora_name=None, stream=False):
    params = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    if lora_name:
        params["lora_name"] = lora_name
    body = {"text_input": "Hello world", "exclude_input_in_output": True, "sampling_parameters": json.dumps(params)}
    url = f"{server.url}/v2/models/lora/generate" + ("_stream" if stream else "")
    resp = requests.post(url, json=body, timeout=120)
    if not stream or resp.status_code != 200:
        return resp
    return "".join(e["text_output"] for e in sse_events(resp))


def load(server, name):
    return requests.post(f"{server.url}/v2/repository/models/{name}/load", timeout=300)


def test_each_lora_adapter_changes_the_answer_deterministically(load_server):
    base = generate(load_server).json()["text_output"]
    answers = {name: generate(load_server, name).json()["text_output"] for name in ADAPTERS}
    assert base not in answers.values()
    assert answers["shout"] != answers["whisper"]
    assert generate(load_server, "shout").json()["text_output"] == answers["shout"]
    assert generate(load_server).json()["text_output"] == base  # the adapter leaves the base model alone


def test_lora_streaming_matches_non_streaming(load_server):
    assert generate(load_server, "whisper", stream=True) == generate(load_server, "whisper").json()["text_output"]


def test_unknown_lora_adapter_is_rejected_with_the_available_names(load_server):
    resp = generate(load_server, "sing")
    assert resp.status_code == 400
    assert resp.json()["error"] == "unknown LoRA adapter 'sing'; available: ['shout', 'whisper']"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bad-json", "model.json is not valid JSON"),
        ("unknown-arg", "model.json: unknown engine argument(s) ['max_tokenz']"),
        ("lora-without-adapters", "sets enable_lora, so"),
        ("context-too-long", "vLLM engine failed to start with"),
        ("gpu-split", "KIND_GPU"),
        ("bad-rate", "config.pbtxt: parameter MAX_RESPONSES_PER_SECOND must be a number, 0 or more; got 'fast'"),
        # The shared core cannot start (no machine has 99 % of its memory free): instance 1 stops waiting at once.
        pytest.param("shared-no-memory", "vLLM engine failed to start with", marks=pytest.mark.cpu),
    ],
)
def test_a_model_that_cannot_load_says_why_and_harms_no_other(load_server, name, expected):
    resp = load(load_server, name)
    assert resp.status_code == 400
    assert expected in resp.json()["error"], resp.json()["error"]
    ready = requests.get(f"{load_server.url}/v2/models/{name}/ready", timeout=10)
    assert ready.status_code != 200
    assert generate(load_server).status_code == 200


def test_streams_under_a_response_budget_get_merged_text_at_most_every_interval(load_server):
    """MAX_RESPONSES_PER_SECOND 10: two streams share 10 responses a second, so each waits
    the longest interval, 50 ms, between responses; no text is lost or reordered."""
    assert load(load_server, "paced").status_code == 200
    try:
        url = f"{load_server.url}/v2/models/paced/generate"
        params = json.dumps({"max_tokens": 200, "temperature": 0, "ignore_eos": True})
        body = {"text_input": "Hello world", "return_num_output_tokens": True, "sampling_parameters": params}

        def stream(_):
            start = time.monotonic()
            events = sse_events(requests.post(url + "_stream", json={**body, "stream": True}, timeout=120))
            return events, time.monotonic() - start

        with ThreadPoolExecutor(2) as pool:
            streams = list(pool.map(stream, range(2)))
        whole = requests.post(url, json={**body, "exclude_input_in_output": True}, timeout=120).json()["text_output"]
        for events, elapsed in streams:
            assert sum(e["num_output_tokens"] for e in events) == 200
            assert "".join(e["text_output"] for e in events) == whole
            # The first response goes at once, the final one as soon as it is ready.
            assert len(events) <= elapsed / 0.05 + 2, f"{len(events)} responses in {elapsed:.2f} s"
    finally:
        requests.post(f"{load_server.url}/v2/repository/models/paced/unload", timeout=120)


@pytest.mark.parametrize(
    "model, ready_line_end",
    [
        ("direct", "; MAX_RESPONSES_PER_SECOND 0"),  # the event loop sends
        ("threads", "; MAX_RESPONSES_PER_SECOND 0; SENDER_THREADS 3"),  # sender threads, the GPU default
    ],
)
def test_without_a_budget_every_stream_gets_its_whole_text(load_server, model, ready_line_end):
    """MAX_RESPONSES_PER_SECOND 0: each engine output leaves at once, from the engine's event
    loop or from the sender threads; streams side by side, one of them dropped by its client,
    each get all their text in order."""
    assert load(load_server, model).status_code == 200
    try:
        url = f"{load_server.url}/v2/models/{model}/generate"
        params = json.dumps({"max_tokens": 96, "temperature": 0, "ignore_eos": True})
        body = {"text_input": "Hello world", "return_num_output_tokens": True, "sampling_parameters": params}
        dropped = requests.post(url + "_stream", json={**body, "stream": True}, stream=True, timeout=120)
        assert next(dropped.iter_lines()).startswith(b"data: ")
        dropped.close()

        def stream(_):
            return sse_events(requests.post(url + "_stream", json={**body, "stream": True}, timeout=120))

        with ThreadPoolExecutor(4) as pool:
            streams = list(pool.map(stream, range(4)))
        whole = requests.post(url, json={**body, "exclude_input_in_output": True}, timeout=120).json()["text_output"]
        for events in streams:
            assert sum(e["num_output_tokens"] for e in events) == 96
            assert "".join(e["text_output"] for e in events) == whole
        assert any(line.endswith(ready_line_end) for line in log_lines(load_server, f"model '{model}' ready"))
    finally:
        requests.post(f"{load_server.url}/v2/repository/models/{model}/unload", timeout=120)


def generated_by_instance(server, model):
    """Tokens each instance of ``model`` generated, by instance, as the metrics port reports them."""
    text = requests.get(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).text
    counts = {}
    for labels, value in re.findall(r"^vllm:generation_tokens_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("model") == model and float(value) > 0:
            counts[found.get("instance")] = float(value)
    return counts


def engine_cores(server):
    return {p.pid for p in psutil.Process(server.process.pid).children(recursive=True) if "EngineCor" in p.name()}


def assert_started_from_python(cores):
    """The engine core runs on python3 as `vllm serve`'s does, not on a copy of the stub's interpreter.

    vLLM's CPU platform always spawns its engine processes; on a GPU this checks the model's choice.
    """
    for pid in cores:
        exe = os.path.basename(psutil.Process(pid).exe())
        assert exe.startswith("python"), f"engine core {pid} runs {exe}"


def test_two_instances_share_one_engine_core_and_survive_its_death(load_server):
    """--instances 2: two model processes on one engine core. Streams through either get their
    whole text and each instance counts what it served; when the core dies, requests fail at
    once and a new core serves both instances again."""
    cores_before = engine_cores(load_server)
    assert load(load_server, "shared").status_code == 200
    try:
        ready = log_lines(load_server, "model 'shared' ready")
        for index in (0, 1):
            assert any(line.endswith(f"; instance {index} of 2 on one shared engine core") for line in ready), ready
        core = engine_cores(load_server) - cores_before
        assert len(core) == 1, f"engine cores started for the model: {core}"
        assert_started_from_python(core)

        url = f"{load_server.url}/v2/models/shared/generate"
        params = json.dumps({"max_tokens": 48, "temperature": 0, "ignore_eos": True})
        body = {"text_input": "Hello world", "return_num_output_tokens": True, "sampling_parameters": params}

        def stream(_):
            return sse_events(requests.post(url + "_stream", json={**body, "stream": True}, timeout=120))

        def serves_whole():
            with ThreadPoolExecutor(16) as pool:
                streams = list(pool.map(stream, range(32)))
            whole = requests.post(url, json={**body, "exclude_input_in_output": True}, timeout=120).json()["text_output"]
            for events in streams:
                assert sum(e.get("num_output_tokens", 0) for e in events) == 48, events[-1:]
                assert "".join(e["text_output"] for e in events) == whole

        serves_whole()
        assert wait_for(lambda: set(generated_by_instance(load_server, "shared")) == {"0", "1"}, 5), "both instances served"

        long_body = {**body, "sampling_parameters": json.dumps({"max_tokens": 1500, "ignore_eos": True})}
        with ThreadPoolExecutor(8) as pool:  # in flight at the kill, on both instances
            in_flight = [pool.submit(requests.post, url, json=long_body, timeout=30) for _ in range(8)]
            time.sleep(1.0)
            os.kill(core.pop(), signal.SIGKILL)
            killed_at = time.monotonic()
            answers = [requests.post(url, json=body, timeout=30) for _ in range(4)]  # either instance, at once
            answers += [f.result() for f in in_flight]
        assert all(r.status_code != 200 and "engine" in r.json()["error"] for r in answers), [r.text for r in answers]
        assert time.monotonic() - killed_at < 10, "requests waited on the dead core"

        def serving_again():
            return all(requests.post(url, json=body, timeout=30).status_code == 200 for _ in range(4))

        assert wait_for(serving_again, 90), "not serving again 90 s after the core was killed"
        serves_whole()
        assert len(engine_cores(load_server) - cores_before) == 1
        assert_started_from_python(engine_cores(load_server) - cores_before)

        # Unloading stops the core once, quietly: no instance takes it for dead and starts another.
        died, handler_failures = len(log_lines(load_server, "engine died")), len(log_lines(load_server, "output_handler failed"))
        assert requests.post(f"{load_server.url}/v2/repository/models/shared/unload", timeout=120).status_code == 200
        assert wait_for(lambda: log_lines(load_server, "successfully unloaded 'shared'"), 60), "not unloaded in 60 s"
        assert not engine_cores(load_server) - cores_before
        assert len(log_lines(load_server, "engine died")) == died
        assert len(log_lines(load_server, "output_handler failed")) == handler_failures
    finally:
        requests.post(f"{load_server.url}/v2/repository/models/shared/unload", timeout=120)


def log_lines(server, text):
    return [line.rstrip('"') for line in server.log_file.read_text().splitlines() if text in line]


def test_a_config_without_a_response_budget_gets_the_default(load_server, repository):
    """A hand-written config.pbtxt may leave MAX_RESPONSES_PER_SECOND out."""
    assert "MAX_RESPONSES_PER_SECOND" not in (repository / "no-budget" / "config.pbtxt").read_text()
    assert load(load_server, "no-budget").status_code == 200
    try:
        ready = log_lines(load_server, "model 'no-budget' ready")
        assert ready and ready[-1].endswith("; MAX_RESPONSES_PER_SECOND 500"), ready
        url = f"{load_server.url}/v2/models/no-budget/generate"
        params = json.dumps({"max_tokens": 64, "temperature": 0, "ignore_eos": True})
        body = {"text_input": "Hello world", "exclude_input_in_output": True, "sampling_parameters": params}
        events = sse_events(requests.post(url + "_stream", json={**body, "stream": True}, timeout=120))
        whole = requests.post(url, json=body, timeout=120).json()["text_output"]
        assert "".join(e["text_output"] for e in events) == whole
    finally:
        requests.post(f"{load_server.url}/v2/repository/models/no-budget/unload", timeout=120)


@pytest.mark.gpu
def test_kind_gpu_instance_serves_on_its_gpu(load_server):
    assert load(load_server, "gpu-instance").status_code == 200
    resp = requests.post(f"{load_server.url}/v2/models/gpu-instance/generate", json={"text_input": "Hi"}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert "KIND_GPU instance on GPU 0" in load_server.log_file.read_text()
    assert requests.post(f"{load_server.url}/v2/repository/models/gpu-instance/unload", timeout=120).status_code == 200


@pytest.mark.gpu
def test_more_gpus_than_visible_is_refused_at_load(load_server):
    resp = load(load_server, "too-many-gpus")
    assert resp.status_code == 400
    assert "asks for 64 GPUs" in resp.json()["error"], resp.json()["error"]
