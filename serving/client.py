"""What client_http.py and client_grpc.py share: flags, prompts, sampling
parameters, batching in prompt order, timings, output and exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_MODEL = "qwen2.5-0.5b"

# Exit codes, the same for both clients.
OK = 0
REQUEST_FAILED = 1  # the server answered a request with an error
USAGE = 2
UNREACHABLE = 3  # no server at the address
NOT_READY = 4  # the server is up but the model is unknown or not ready
INTERRUPTED = 130

SIGNAL_POLL_S = 0.2


class ClientError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Chunk:
    """One response of a request: new text and what came with it."""

    text: str
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None


@dataclass
class Result:
    prompt: str
    text: str = ""
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    error: str | None = None
    chunks: int = field(default=0, repr=False)

    @property
    def tokens_per_s(self) -> float | None:
        if not self.num_output_tokens or not self.latency_s:
            return None
        return self.num_output_tokens / self.latency_s


def add_common_args(parser: argparse.ArgumentParser, default_url: str) -> None:
    parser.add_argument("prompts", nargs="*", help="prompts to send; none: read --file or standard input")
    src = parser.add_argument_group("prompts and conversation")
    src.add_argument("-f", "--file", type=Path, help="read prompts from a file, one per line")
    src.add_argument("--chat", action="store_true", help="format prompts with the model's chat template")
    src.add_argument("--system", help="system message for --chat (implies --chat)")
    src.add_argument("-i", "--interactive", action="store_true", help="chat turn by turn, keeping the conversation")

    srv = parser.add_argument_group("server")
    srv.add_argument("-u", "--url", default=default_url, help="server address (default: %(default)s)")
    srv.add_argument("-m", "--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    srv.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one request (default: %(default)s)")
    srv.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra header sent with every call, e.g. a key the server or a proxy in front of it expects (repeatable)",
    )

    smp = parser.add_argument_group("sampling")
    smp.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: %(default)s)")
    smp.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy")
    smp.add_argument("--top-p", type=float, help="nucleus sampling probability mass")
    smp.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    smp.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    smp.add_argument("--stop", action="append", help="stop when this string is generated (repeatable)")
    smp.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sampling parameter, VALUE parsed as JSON when it can be (repeatable)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    out.add_argument(
        "--json", action="store_true", help="print one JSON object per prompt (text, finish reason, counts, timings)"
    )
    out.add_argument("-o", "--output", type=Path, help="also write prompt/answer pairs to this file")
    out.add_argument("-c", "--concurrency", type=int, default=1, help="requests in flight at once (default: %(default)s)")


def split_option(item: str, option: str, form: str = "KEY=VALUE") -> tuple[str, str]:
    """KEY and VALUE of a repeatable KEY=VALUE flag; ValueError naming the flag when KEY or "=" is missing."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{option} expects {form}, got {item!r}")
    return key, value


def json_or_text(raw: str):
    """A flag's VALUE parsed as JSON when it can be, else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def sampling_parameters(args: argparse.Namespace) -> dict:
    params = {"max_tokens": args.max_tokens}
    for key in ("temperature", "top_p", "top_k", "seed", "stop"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    for item in args.param:
        try:
            key, raw = split_option(item, "--param")
        except ValueError as exc:
            raise ClientError(USAGE, str(exc)) from None
        params[key] = json_or_text(raw)
    return params


def headers(args: argparse.Namespace) -> dict[str, str]:
    pairs = {}
    for item in args.header:
        try:
            key, value = split_option(item, "--header", "NAME=VALUE")
        except ValueError as exc:
            raise ClientError(USAGE, str(exc)) from None
        pairs[key.lower()] = value
    return pairs


def iter_sse(resp) -> Iterator[dict]:
    """The JSON events of a server-sent-events response (requests), as they arrive.

    Lines are split as bytes: generated text may hold characters such as U+2028
    or U+0085, at which str.splitlines() would also split.
    """
    for line in resp.iter_lines():
        if line.startswith(b"data:"):
            yield json.loads(line[len(b"data:") :])


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        return list(args.prompts)
    if args.file:
        try:
            lines = args.file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ClientError(USAGE, f"cannot read {args.file}: {exc}") from None
    elif not sys.stdin.isatty():
        lines = sys.stdin.read().splitlines()
    else:
        raise ClientError(USAGE, "give prompts as arguments, with --file, on standard input, or use --interactive")
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ClientError(USAGE, "no prompts found")
    return prompts


def messages_for(args: argparse.Namespace, prompt: str, history: list[dict] | None = None) -> list[dict] | None:
    """The chat messages to send, or None to send the prompt as plain text."""
    if not (args.chat or args.system or args.interactive):
        return None
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + (history or []) + [{"role": "user", "content": prompt}]


# A backend turns (prompt, messages) into a stream of Chunks; it raises
# ClientError for what ends the program and RequestFailed for one bad request.
Generate = Callable[[str, "list[dict] | None"], Iterator[Chunk]]


class RequestFailed(Exception):
    pass


# The model's last response always names a finish reason; an answer without one was cut off on the way.
CUT_SHORT = "the answer ended before the server's final response (no finish reason): it may be incomplete; send it again"


def run_one(generate: Generate, prompt: str, messages: list[dict] | None, on_text=None) -> Result:
    result = Result(prompt=prompt)
    start = time.perf_counter()
    try:
        for chunk in generate(prompt, messages):
            if result.ttft_s is None and chunk.text:
                result.ttft_s = time.perf_counter() - start
            result.text += chunk.text
            result.chunks += 1
            result.finish_reason = chunk.finish_reason or result.finish_reason
            if chunk.num_input_tokens is not None:
                result.num_input_tokens = chunk.num_input_tokens
            result.num_output_tokens += chunk.num_output_tokens or 0
            if on_text:
                on_text(chunk.text)
    except RequestFailed as exc:
        result.error = str(exc)
    else:
        if result.finish_reason is None:
            result.error = CUT_SHORT
    result.latency_s = time.perf_counter() - start
    return result


def run_batch(generate: Generate, args: argparse.Namespace, prompts: list[str]) -> list[Result]:
    """Send all prompts, ``--concurrency`` at a time; results come back in prompt order."""
    show_stream = args.stream and args.concurrency == 1 and not args.json
    if args.concurrency == 1:
        results = []
        for prompt in prompts:
            if show_stream and len(prompts) > 1:
                print(f">>> {prompt}", flush=True)
            on_text = (lambda t: print(t, end="", flush=True)) if show_stream else None
            result = run_one(generate, prompt, messages_for(args, prompt), on_text)
            if show_stream:
                print(flush=True)
            report(args, result, printed=show_stream, many=len(prompts) > 1)
            results.append(result)
        return results
    pool = ThreadPoolExecutor(max_workers=args.concurrency)
    futures = [pool.submit(run_one, generate, p, messages_for(args, p)) for p in prompts]
    # Wake up often: a Ctrl-C delivered to a worker thread only runs its handler
    # once the main thread executes Python code again.
    while not wait(futures, timeout=SIGNAL_POLL_S).done == set(futures):
        pass
    pool.shutdown()
    results = [f.result() for f in futures]
    for result in results:
        report(args, result, printed=False, many=True)
    return results


def report(args: argparse.Namespace, result: Result, printed: bool, many: bool) -> None:
    if args.json:
        data = asdict(result)
        data.pop("chunks")
        data["tokens_per_s"] = result.tokens_per_s
        print(json.dumps(data, ensure_ascii=False), flush=True)
    elif result.error:
        print(f"error: {result.prompt[:60]!r}: {result.error}", file=sys.stderr, flush=True)
    elif not printed:
        if many:
            print(f">>> {result.prompt}")
        print(result.text, flush=True)
    if not args.json and not result.error:
        print(timing_line(result), file=sys.stderr, flush=True)


def timing_line(result: Result) -> str:
    parts = [f"{result.num_output_tokens} new tokens", f"{result.latency_s:.2f} s"]
    if result.num_input_tokens is not None:
        parts.insert(0, f"{result.num_input_tokens} prompt tokens")
    if result.ttft_s is not None:
        parts.append(f"TTFT {result.ttft_s * 1000:.0f} ms")
    if result.tokens_per_s:
        parts.append(f"{result.tokens_per_s:.1f} tok/s")
    if result.finish_reason:
        parts.append(f"finish: {result.finish_reason}")
    return "[" + ", ".join(parts) + "]"


def summary_line(results: list[Result], wall_s: float) -> str:
    ok = [r for r in results if not r.error]
    tokens = sum(r.num_output_tokens for r in ok)
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    median = f", median TTFT {ttfts[len(ttfts) // 2] * 1000:.0f} ms" if ttfts else ""
    return (
        f"[{len(ok)}/{len(results)} succeeded, {tokens} tokens in {wall_s:.2f} s, "
        f"{tokens / wall_s if wall_s else 0:.1f} tok/s{median}]"
    )


def write_results(path: Path, results: list[Result]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in results:
            f.write(f"Prompt: {r.prompt}\n")
            f.write(f"Answer: {r.text if not r.error else 'ERROR: ' + r.error}\n")
            f.write("-" * 60 + "\n")


def interactive(generate: Generate, args: argparse.Namespace) -> list[Result]:
    history: list[dict] = []
    results = []
    print("Interactive chat: an empty line or Ctrl-D ends it.", file=sys.stderr)
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        print("assistant> ", end="", flush=True)
        result = run_one(generate, prompt, messages_for(args, prompt, history), lambda t: print(t, end="", flush=True))
        print(flush=True)
        if result.error:
            print(f"error: {result.error}", file=sys.stderr)
        else:
            history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": result.text}]
            print(timing_line(result), file=sys.stderr)
        results.append(result)
    return results


def exit_interrupted(signum=None, frame=None) -> None:
    """Ctrl-C: leave at once. Exiting closes every connection, which cancels the
    requests in flight on the server (gRPC stream reset, HTTP stream closed).

    Nothing here may wait: unwinding instead could block in a stream's teardown,
    and a thread started from a signal handler can hang before it runs.
    """
    with contextlib.suppress(Exception):  # a print the signal cut short may hold the buffer
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), b"\ninterrupted: requests in flight were cancelled\n")
    os._exit(INTERRUPTED)


def main(parser: argparse.ArgumentParser, make_generate: Callable, argv=None) -> int:
    """Parse flags, check the server, run the prompts; returns the exit code."""
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.system:
        args.chat = True

    signal.signal(signal.SIGINT, exit_interrupted)
    try:
        generate = make_generate(args, sampling_parameters(args))
        if args.interactive:
            results = interactive(generate, args)
        else:
            prompts = read_prompts(args)
            start = time.perf_counter()
            results = run_batch(generate, args, prompts)
            if len(results) > 1 and not args.json:
                print(summary_line(results, time.perf_counter() - start), file=sys.stderr)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        sys.stderr.close()
        return OK
    if args.output:
        write_results(args.output, results)
    return REQUEST_FAILED if any(r.error for r in results) else OK
