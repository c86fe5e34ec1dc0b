"""client_http.py and client_grpc.py run as a user would run them."""

import io
import json
import os
import re
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from helpers import PYTHON, ROOT, metric, run_script, wait_for

from serving.client import iter_sse
from serving.tritonserver import free_port

CLIENTS = ["client_http.py", "client_grpc.py"]


@pytest.fixture(params=CLIENTS)
def client(request, server):
    url = server.url if request.param == "client_http.py" else f"{server.host}:{server.grpc_port}"
    return request.param, url


def ask(client, *args, timeout=180, **kwargs):
    script, url = client
    return run_script(script, "--url", url, *args, timeout=timeout, **kwargs)


def test_answers_a_prompt(client):
    done = ask(client, "--max-tokens", "8", "--temperature", "0", "Hello world")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "8 new tokens" in done.stderr


def test_stream_prints_the_same_text_as_non_stream(client):
    args = ["--max-tokens", "10", "--temperature", "0", "--json", "Tell me"]
    whole = json.loads(ask(client, *args).stdout)
    streamed = json.loads(ask(client, "--stream", *args).stdout)
    assert streamed["text"] == whole["text"]
    assert streamed["num_output_tokens"] == whole["num_output_tokens"] == 10
    assert streamed["finish_reason"] == "length"
    assert streamed["ttft_s"] > 0


def test_batch_keeps_prompt_order_and_writes_results(client, tmp_path):
    prompts = [f"Prompt number {i}" for i in range(6)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "results.txt"
    done = ask(client, "-f", str(tmp_path / "prompts.txt"), "-c", "3", "--json", "--max-tokens", "4", "-o", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    written = out.read_text()
    assert written.count("Prompt: ") == 6 and written.index("Prompt number 0") < written.index("Prompt number 5")


def test_prompts_from_standard_input(client):
    done = ask(client, "--max-tokens", "3", "--json", input="first\nsecond\n")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["prompt"] for line in done.stdout.splitlines()] == ["first", "second"]


def test_chat_uses_the_template(client):
    done = ask(client, "--chat", "--system", "Be brief.", "--max-tokens", "3", "--json", "Hi")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # system + user turns of the template, far more than the two words typed
    assert result["num_input_tokens"] > 20


def test_extra_parameter_flag_reaches_the_engine(client):
    done = ask(client, "--max-tokens", "3", "--param", "no_such_key=1", "Hi")
    assert done.returncode == 1
    assert "unknown sampling parameter 'no_such_key'" in done.stderr


def test_unreachable_server_exits_3(client):
    script, _ = client
    port = free_port()
    url = f"http://127.0.0.1:{port}" if script == "client_http.py" else f"127.0.0.1:{port}"
    done = run_script(script, "--url", url, "Hi", timeout=60)
    assert done.returncode == 3
    assert "no Triton server" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_model_exits_4(client):
    done = ask(client, "--model", "no-such-model", "Hi")
    assert done.returncode == 4
    assert "model 'no-such-model' is not ready" in done.stderr


def cancellations(server) -> int:
    return server.log_file.read_text().count("cancelled by the client")


def interrupt_a_long_stream(script, url):
    """Run the client on a long streamed request and press Ctrl-C once text shows."""
    proc = subprocess.Popen(
        [PYTHON, script, "--url", url, "--stream", "--max-tokens", "2000", "-p", "ignore_eos=true", "-p", "n=32", "Go on"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    assert proc.stdout.read(1), "no streamed text before the interrupt"  # as a user sees tokens, then presses Ctrl-C
    return proc


def test_ctrl_c_cancels_requests_on_the_server(client, server):
    script, url = client
    # 32 sequences of 2,000 tokens: many seconds of work for the tiny model, far more than the interrupt takes.
    requested = 32 * 2000
    # Triton's gRPC front end now and then misses a client's disconnect (README, Limitations):
    # one of three interrupts must be cancelled on the server.
    for _ in range(3):
        assert wait_for(lambda: metric(server, "vllm:num_requests_in_flight") == 0, 90)
        tokens_before = metric(server, "vllm:generation_tokens_total")
        cancelled_before = cancellations(server)
        proc = interrupt_a_long_stream(script, url)
        assert wait_for(lambda: metric(server, "vllm:num_requests_running") > 0, 10)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert b"interrupted" in err and b"Traceback" not in err
        if wait_for(lambda before=cancelled_before: cancellations(server) > before, 10):
            break
    else:
        pytest.fail("the server did not cancel the request of an interrupted client, three times")
    assert wait_for(lambda: metric(server, "vllm:num_requests_in_flight") == 0, 10)
    assert wait_for(lambda: metric(server, "vllm:num_requests_running") == 0, 10)
    generated = metric(server, "vllm:generation_tokens_total") - tokens_before
    assert generated < requested, "the engine kept generating after the client was interrupted"


def test_interactive_keeps_the_conversation(client, tmp_path):
    out = tmp_path / "chat.txt"
    done = ask(client, "-i", "--max-tokens", "8", "--temperature", "0", "-o", str(out), input="Hello\nAgain\n\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("assistant> ") == 2
    turns = [tuple(map(int, m)) for m in re.findall(r"\[(\d+) prompt tokens, (\d+) new tokens", done.stderr)]
    assert len(turns) == 2
    (first_in, first_out), (second_in, _) = turns
    # The second turn's prompt carries the first question and answer: far longer than a fresh chat.
    assert second_in >= first_in + first_out
    assert out.read_text().count("Prompt: ") == 2


def test_sse_events_stay_whole_across_unicode_line_separators():
    # Generated text can hold U+2028 or U+0085, which str.splitlines() treats as line ends.
    resp = requests.models.Response()
    resp.raw = io.BytesIO('data: {"text_output": "a\u2028b\x85c"}\n\ndata: {"text_output": "d"}\n\n'.encode())
    assert [event["text_output"] for event in iter_sse(resp)] == ["a\u2028b\x85c", "d"]


class CutStream(BaseHTTPRequestHandler):
    """A server whose generate_stream ends after two responses, without the final one."""

    def do_GET(self):  # the client's readiness check
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for text in ("Once", " upon"):
            self.wfile.write(f"data: {json.dumps({'text_output': text, 'finish_reason': ''})}\n\n".encode())
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_http_stream_cut_short_is_an_error():
    # Triton's HTTP front end has been seen ending a stream early, with no error, on a saturated machine.
    server = ThreadingHTTPServer(("127.0.0.1", 0), CutStream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        done = run_script("client_http.py", "--url", url, "--stream", "Tell me a story", timeout=60)
        as_json = run_script("client_http.py", "--url", url, "--stream", "--json", "Tell me a story", timeout=60)
    finally:
        server.shutdown()
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip() == "Once upon"
    assert "ended before the server's final response" in done.stderr
    result = json.loads(as_json.stdout)
    assert result["text"] == "Once upon" and result["finish_reason"] is None
    assert "ended before the server's final response" in result["error"]
