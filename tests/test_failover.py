"""Failover for real: two local Triton replicas behind HAProxy (deploy/haproxy/haproxy.cfg),
32 streams of steady load, one replica's engine killed, then the replica stopped and
started again. Every request is answered once, or fails with a clear error; none is lost."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter

import pytest
import requests
from helpers import MODEL, ROOT, engine_core_pids, metrics, start_server, wait_for

from serving.client import iter_sse
from serving.tritonserver import free_port, is_ready

STREAMS = 32
TOKENS = 32


@dataclasses.dataclass
class Outcome:
    started: float
    ended: float = 0.0
    kind: str = "hung"  # ok, error (a clear error from the server), dropped (no answer), hung
    detail: str = ""


def one_request(url) -> Outcome:
    outcome = Outcome(started=time.monotonic())
    body = {"id": uuid.uuid4().hex, "text_input": "Tell me", "stream": True, "return_num_output_tokens": True}
    body["parameters"] = {"max_tokens": TOKENS, "ignore_eos": True}
    try:
        with requests.post(url, json=body, stream=True, timeout=(5, 60)) as resp:
            if resp.status_code != 200:
                outcome.kind, outcome.detail = "error", error_message(resp)
            else:
                events = list(iter_sse(resp))
                errors = [e["error"] for e in events if "error" in e]
                tokens = sum(e.get("num_output_tokens", 0) for e in events)
                if errors:
                    outcome.kind, outcome.detail = "error", errors[0]
                elif tokens == TOKENS:
                    outcome.kind = "ok"
                else:
                    outcome.kind, outcome.detail = "dropped", f"{tokens} of {TOKENS} tokens, no error"
    except requests.Timeout:
        outcome.kind = "hung"
    except requests.RequestException as exc:
        outcome.kind, outcome.detail = "dropped", str(exc)
    outcome.ended = time.monotonic()
    return outcome


def error_message(resp) -> str:
    """The message of an error answer (JSON, or one server-sent event holding JSON)."""
    text = resp.text.strip().removeprefix("data:")
    try:
        return json.loads(text).get("error", "")
    except ValueError:
        return ""


def generated(server) -> float:
    try:
        return metrics(server).get("vllm:generation_tokens_total", 0.0)
    except requests.RequestException:
        return 0.0


@pytest.fixture
def haproxy(tmp_path):
    def start(replica_1, replica_2):
        assert shutil.which("haproxy"), "HAProxy is missing: make test installs it (scripts/system-packages.sh)"
        bind = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "LB_BIND": bind, "REPLICA_1": replica_1, "REPLICA_2": replica_2}
        log = open(tmp_path / "haproxy.log", "wb")
        proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(ROOT / "deploy/haproxy/haproxy.cfg")], env=env, stdout=log, stderr=log
        )
        procs.append(proc)
        assert wait_for(lambda: is_ready(f"http://{bind}"), 10), (tmp_path / "haproxy.log").read_text()
        return f"http://{bind}"

    procs = []
    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_failover_loses_no_request(tiny_repository, tmp_path, haproxy, record_property):
    replicas = [start_server(tiny_repository, tmp_path / f"replica-{i}.log") for i in (1, 2)]
    first, second = replicas
    try:
        lb = haproxy(*(f"127.0.0.1:{r.http_port}" for r in replicas))
        url = f"{lb}/v2/models/{MODEL}/generate_stream"
        outcomes, stop_load = [], threading.Event()

        def client():
            while not stop_load.is_set():
                outcomes.append(one_request(url))

        clients = [threading.Thread(target=client) for _ in range(STREAMS)]
        for c in clients:
            c.start()
        try:
            assert wait_for(lambda: generated(first) > 0 and generated(second) > 0, 30), "the load did not reach both replicas"
            time.sleep(3)

            killed_at = time.monotonic()
            for pid in engine_core_pids(first):
                os.kill(pid, signal.SIGKILL)
            time.sleep(3)
            stopping_at = time.monotonic()
            stopping = threading.Thread(target=first.stop)
            stopping.start()
            time.sleep(10)

            stopping.join()
            first = replicas[0] = dataclasses.replace(first, process=None).start()  # the same ports: it rejoins
            assert wait_for(lambda: generated(first) > 0, 30), "the restarted replica got no requests back"
        finally:
            stop_load.set()
            for c in clients:
                c.join(90)
    finally:
        for r in replicas:
            r.stop()

    counts = Counter(o.kind for o in outcomes)
    failed_after_stop = [o for o in outcomes if o.kind != "ok" and o.started >= stopping_at]
    last_failure_s = max((o.started - stopping_at for o in failed_after_stop), default=0.0)
    report = (
        f"sent {len(outcomes)}, answered {counts['ok']}, failed with a clear error {counts['error']}, "
        f"lost {counts['dropped'] + counts['hung']}; last failed request started {last_failure_s:.1f} s after the stop"
    )
    print(report)
    record_property("failover", report)
    assert not any(c.is_alive() for c in clients), "a client was still waiting for an answer"
    lost = [(round(o.started - stopping_at, 2), o.detail) for o in outcomes if o.kind in ("hung", "dropped")]
    assert not lost, f"(start time after the stop, what happened): {lost[:5]}; HAProxy's log: {tmp_path / 'haproxy.log'}"
    assert counts["error"] > 0, "no request was on the killed engine: the test did not test failover"
    # The engine died or restarts, or the replica is shutting down: each a message that says so.
    unclear = Counter(o.detail for o in outcomes if o.kind == "error" and not re.search("engine|shutting down", o.detail))
    assert not unclear, unclear
    assert last_failure_s < 5.0, "new requests still failed 5 s after the replica began to stop"
    assert all(o.started < killed_at or o.kind in ("ok", "error") for o in outcomes)
