#!/usr/bin/env python3
"""Benchmark the Triton path against the bare vLLM engine and against `vllm serve`.

One run, one synthetic workload (fixed prompt and output lengths, ignore_eos,
temperature 0), a concurrency sweep, the same engine arguments (the model's
1/model.json) for every target:

  triton-http   our model through Triton's HTTP generate_stream (server-sent events)
  triton-grpc   our model through Triton's gRPC streaming API
  engine        vLLM's AsyncLLMEngine in this process, no server: the floor
  openai        our model through this project's OpenAI-compatible API
                (serving/openai_api, in front of Triton), streaming /v1/completions
  vllm-serve    vLLM's OpenAI-compatible server, streaming /v1/completions

Metrics follow `vllm bench serve`: TTFT, TPOT (per request, after the first
token), ITL (gaps between streamed chunks), end-to-end latency (median, p99),
output tokens/s and requests/s; the engine's own mean TPOT, from vLLM's metrics
(taken from the engine core's timestamps, so it tells the engine's pace apart
from the delivery's) and its steps per level, with the share that ran a prefill
beside the decodes (a step with more tokens than streams); the CPU time per
output token of each server's processes, of the client and of the engine core
alone; plus each server's start-up time to ready, resident memory and CPU
scheduling policy. Prints a table, writes
results/benchmark.json and, when matplotlib is installed, results/benchmark.png.

  .venv/bin/python benchmarks/benchmark.py                      # CPU, tiny model
  .venv/bin/python benchmarks/benchmark.py --concurrency 1,16,64,256 --venv /root/venv   # GPU
  .venv/bin/python benchmarks/benchmark.py --concurrency 16,64,256 --repeat 5 --interleave  # GPU, every
      target up at once (the repository prepared with --gpu-memory-utilization 0.25)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import prometheus_client  # noqa: E402
import uvloop  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from serving.client import DEFAULT_MODEL  # noqa: E402
from serving.grpc_client import use_polling_client  # noqa: E402
from serving.model_config import cpu_engine_environment  # noqa: E402
from serving.openai_api.service import OpenAIService  # noqa: E402
from serving.tritonserver import LocalServer, engine_core_cpu_s, free_port, stop_process_group, tree_cpu_s, tree_rss_mb  # noqa: E402

TARGETS = ["triton-http", "triton-grpc", "openai", "engine", "vllm-serve"]
TRITON_TARGETS = ("triton-http", "triton-grpc", "openai")
MEMORY_FOR_ENGINES = 0.9  # of the device's memory, for the engines --interleave keeps up at once


@dataclass
class Sample:
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


@dataclass
class Row:
    target: str
    concurrency: int
    requests: int
    failed: int
    duration_s: float
    output_tok_s: float
    req_s: float
    ttft_ms: dict
    tpot_ms: dict
    itl_ms: dict
    e2e_ms: dict
    first_error: str | None = None
    server_cpu_us_per_tok: float | None = None
    client_cpu_us_per_tok: float | None = None
    engine_cpu_us_per_tok: float | None = None
    engine_tpot_ms: float | None = None
    engine_steps: int | None = None
    engine_prefill_steps: int | None = None
    tok_s_runs: list[float] = field(default_factory=list)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered) * 1000, "p99": p99 * 1000}


def summarize(target: str, concurrency: int, samples: list[Sample], duration: float) -> Row:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.output_tokens for s in ok)
    tpots = [(s.e2e - s.ttft) / (s.output_tokens - 1) for s in ok if s.output_tokens > 1]
    return Row(
        target=target,
        concurrency=concurrency,
        requests=len(samples),
        failed=len(samples) - len(ok),
        duration_s=duration,
        output_tok_s=tokens / duration,
        req_s=len(ok) / duration,
        ttft_ms=percentiles([s.ttft for s in ok]),
        tpot_ms=percentiles(tpots),
        itl_ms=percentiles([gap for s in ok for gap in s.itl]),
        e2e_ms=percentiles([s.e2e for s in ok]),
        first_error=next((s.error for s in samples if s.error), None),
    )


class Timer:
    """Collects one request's chunk times into a Sample."""

    def __init__(self):
        self.start = time.perf_counter()
        self.last = None
        self.sample = Sample()

    def chunk(self, tokens: int) -> None:
        if tokens <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.sample.ttft = now - self.start
        else:
            self.sample.itl.append(now - self.last)
        self.last = now
        self.sample.output_tokens += tokens

    def done(self, error: str | None = None) -> Sample:
        self.sample.e2e = time.perf_counter() - self.start
        self.sample.error = error
        return self.sample


# ------------------------------------------------------------------ workload


def make_prompts(model_dir: str, count: int, input_len: int, seed: int) -> list[str]:
    """Random token ids decoded to text, re-encoded to check the length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(len(tokenizer), 30000)) if i not in special]
    prompts = []
    for _ in range(count):
        text = tokenizer.decode([rng.choice(ids) for _ in range(input_len)])
        prompts.append(tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:input_len]))
    return prompts


def sampling(output_len: int) -> dict:
    return {"max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True, "temperature": 0}


async def run_level(send, prompts: list[str], concurrency: int) -> tuple[list[Sample], float]:
    queue = list(prompts)
    samples: list[Sample] = []

    async def worker():
        while queue:
            samples.append(await send(queue.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - start


# -------------------------------------------------------------------- targets


def triton_http_sender(session: aiohttp.ClientSession, url: str, output_len: int):
    async def send(prompt: str) -> Sample:
        timer = Timer()
        body = lean_inputs(prompt, output_len)
        try:
            async with session.post(url, json=body) as resp:
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = json.loads(line[5:])
                    if "error" in data:
                        return timer.done(data["error"])
                    count = data.get("num_output_tokens")
                    timer.chunk(count[0] if isinstance(count, list) else count)
        except aiohttp.ClientError as exc:
            return timer.done(str(exc))
        return timer.done()

    return send


def lean_inputs(prompt: str, output_len: int) -> dict:
    """What the Triton targets send: the text, streaming, and the token count needed to time each chunk."""
    return {
        "text_input": prompt,
        "stream": True,
        "return_num_output_tokens": True,
        "sampling_parameters": json.dumps(sampling(output_len)),
    }


def grpc_request(model: str, prompt: str, output_len: int):
    import numpy as np
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import serialize_byte_tensor

    request = service_pb2.ModelInferRequest(model_name=model)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    for name, value in lean_inputs(prompt, output_len).items():
        is_bool = isinstance(value, bool)
        request.inputs.add(name=name, shape=[1], datatype="BOOL" if is_bool else "BYTES")
        array = np.array([value], dtype=bool if is_bool else np.object_)
        request.raw_input_contents.append(array.tobytes() if is_bool else serialize_byte_tensor(array).item())
    return request


def grpc_tokens(response) -> int:
    from tritonclient.grpc import InferResult

    counts = InferResult(response).as_numpy("num_output_tokens")
    return 0 if counts is None else int(counts.sum())


@contextlib.asynccontextmanager
async def triton_grpc_sender(url: str, model: str, output_len: int):
    """Triton's gRPC streaming API on one shared asyncio channel, one stream per request.

    Plain asyncio gRPC stubs rather than tritonclient's stream wrapper (a channel and a
    callback thread per stream) or blocking stubs on a thread per stream: both cost more
    CPU per response, and at one token per response the client becomes the limit it
    measures; on a small machine its CPU is taken from the server.
    """
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def send(prompt: str) -> Sample:
            timer = Timer()
            try:
                async for reply in stub.ModelStreamInfer(iter([grpc_request(model, prompt, output_len)])):
                    if reply.error_message:
                        return timer.done(reply.error_message)
                    timer.chunk(grpc_tokens(reply.infer_response))
                    if reply.infer_response.parameters["triton_final_response"].bool_param:
                        break
            except grpc.RpcError as exc:
                return timer.done(str(exc))
            return timer.done()

        yield send


def openai_sender(session: aiohttp.ClientSession, url: str, model: str, output_len: int):
    async def send(prompt: str) -> Sample:
        timer = Timer()
        body = {
            "model": model,
            "prompt": prompt,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            **sampling(output_len),
        }
        done_tokens = 0
        try:
            async with session.post(url, json=body) as resp:
                if resp.status != 200:
                    return timer.done(await resp.text())
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[5:])
                    usage = data.get("usage") or {}
                    text = "".join(c.get("text", "") for c in data.get("choices", []))
                    # Token counts from usage where the server sends it per chunk, else one per text chunk.
                    total = usage.get("completion_tokens", done_tokens + (1 if text else 0))
                    timer.chunk(total - done_tokens)
                    done_tokens = total
        except aiohttp.ClientError as exc:
            return timer.done(str(exc))
        return timer.done()

    return send


def engine_sender(engine, output_len: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(**sampling(output_len), output_kind=RequestOutputKind.DELTA)

    async def send(prompt: str) -> Sample:
        timer = Timer()
        async for out in engine.generate(prompt, params, os.urandom(8).hex()):
            timer.chunk(len(out.outputs[0].token_ids))
        return timer.done()

    return send


# ---------------------------------------------------------------------- runs


class CpuMeter:
    """CPU time of the server's process trees, of this process (the client) and of the engine cores among
    the servers' processes, over one level."""

    def __init__(self, server_pid: int, client_separate: bool, *more_server_pids: int):
        self.server_pids = [server_pid, *more_server_pids]
        self.client_separate = client_separate

    def read(self) -> tuple[float, float, float]:
        client = time.process_time() if self.client_separate else 0.0
        server = sum(tree_cpu_s(pid) for pid in self.server_pids)
        return server, client, sum(engine_core_cpu_s(pid) for pid in self.server_pids)


# vLLM's histogram of each request's time per output token, then the model's older name for it.
ENGINE_TPOT_METRICS = ("vllm:request_time_per_output_token_seconds", "vllm:time_per_output_token_seconds")
# vLLM's histogram of the tokens of each engine step (prefill and decode together).
STEP_TOKENS_METRIC = "vllm:iteration_tokens_total"


def metric_totals(families) -> dict[tuple[str, float | None], float]:
    """Every sample's value summed over its label sets, by sample name and histogram bound."""
    totals: dict[tuple[str, float | None], float] = {}
    for family in families:
        for sample in family.samples:
            le = sample.labels.get("le")
            key = (sample.name, float(le) if le is not None else None)
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def engine_tpot_totals(totals: dict) -> tuple[float, float] | None:
    """(seconds, requests) of the first ENGINE_TPOT_METRICS histogram present."""
    for name in ENGINE_TPOT_METRICS:
        if (name + "_count", None) in totals:
            return totals[(name + "_sum", None)], totals[(name + "_count", None)]
    return None


def engine_steps(before: dict, after: dict, concurrency: int) -> tuple[int, int] | None:
    """Engine steps between two readings, and how many of them carried more tokens than
    there are streams: those ran a prompt's prefill beside the decodes."""
    count = (STEP_TOKENS_METRIC + "_count", None)
    bounds = sorted(le for name, le in after if name == STEP_TOKENS_METRIC + "_bucket" and concurrency <= le < math.inf)
    if count not in before or count not in after or not bounds:
        return None
    within = (STEP_TOKENS_METRIC + "_bucket", bounds[0])
    steps = after[count] - before[count]
    return int(steps), int(steps - (after[within] - before.get(within, 0.0)))


def metrics_page_totals(url: str, settle_s: float = 0.0):
    """Reads the metric totals from a Prometheus page, after settle_s for the server to publish."""

    async def read() -> dict | None:
        await asyncio.sleep(settle_s)
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                text = await resp.text()
            return metric_totals(text_string_to_metric_families(text))
        except (aiohttp.ClientError, ValueError):
            return None

    return read


async def in_process_totals() -> dict:
    return metric_totals(prometheus_client.REGISTRY.collect())


async def run_measured(send, prompts, concurrency, meter: CpuMeter, name: str, engine_metrics=None) -> Row:
    before = await engine_metrics() if engine_metrics else None
    server0, client0, core0 = meter.read()
    samples, duration = await run_level(send, prompts, concurrency)
    server1, client1, core1 = meter.read()
    after = await engine_metrics() if engine_metrics else None
    row = summarize(name, concurrency, samples, duration)
    tokens = sum(s.output_tokens for s in samples if s.error is None)
    if tokens:
        row.server_cpu_us_per_tok = (server1 - server0) / tokens * 1e6
        row.client_cpu_us_per_tok = (client1 - client0) / tokens * 1e6 if meter.client_separate else None
        row.engine_cpu_us_per_tok = (core1 - core0) / tokens * 1e6 if core1 else None
    if before and after:
        tpot0, tpot1 = engine_tpot_totals(before), engine_tpot_totals(after)
        if tpot0 and tpot1 and tpot1[1] > tpot0[1]:
            row.engine_tpot_ms = (tpot1[0] - tpot0[0]) / (tpot1[1] - tpot0[1]) * 1000
        steps = engine_steps(before, after, concurrency)
        if steps:
            row.engine_steps, row.engine_prefill_steps = steps
    return row


async def warm_up(target: Target, prompts_for, args) -> None:
    await run_level(target.send, prompts_for(args.warmup), min(args.warmup, 4))


async def measure(target: Target, name: str, prompts, concurrency: int, progress) -> Row:
    row = await run_measured(target.send, prompts, concurrency, target.meter, name, target.engine_metrics)
    progress(row)
    return row


def median_runs(rounds: list[list[Row]]) -> list[Row]:
    """Per target and level, the run with the median output tokens/s; every run's tokens/s kept."""
    runs_of = {}  # (target, concurrency) -> its runs, in the first round's order
    for rows in rounds:
        for row in rows:
            runs_of.setdefault((row.target, row.concurrency), []).append(row)
    medians = []
    for runs in runs_of.values():
        row = sorted(runs, key=lambda r: r.output_tok_s)[len(runs) // 2]
        row.tok_s_runs = [r.output_tok_s for r in runs]
        medians.append(row)
    return medians


def vllm_serve_command(python: str, engine_args: dict, port: int, name: str, extra: str = "") -> list[str]:
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--served-model-name", name]
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if key == "model":
            cmd += ["--model", str(value)]
        elif value is True:
            cmd.append(flag)
        elif value is not False and value is not None:  # False: the CLI's default
            cmd += [flag, str(value)]
    return cmd + shlex.split(extra)


async def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


@dataclass
class Target:
    """A started target: how to send it a request, and what to measure it by."""

    send: typing.Callable
    meter: CpuMeter
    engine_metrics: typing.Callable | None
    pid: int  # the process tree whose resident memory is reported
    startup_s: float


def start_triton(stack: contextlib.AsyncExitStack, args) -> tuple[LocalServer, float]:
    server = LocalServer.on_free_ports(
        args.model_repository.resolve(),
        venv=args.venv.resolve(),
        log_file=args.out_dir.resolve() / "tritonserver.log",
        batch_scheduling=args.batch_scheduling,
    )
    start = time.perf_counter()
    server.start(timeout_s=900)
    stack.callback(server.stop)
    return server, time.perf_counter() - start


async def start_vllm_serve(stack: contextlib.AsyncExitStack, args, engine_args) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    log = stack.enter_context(open(args.out_dir / "vllm-serve.log", "wb"))
    proc = subprocess.Popen(
        vllm_serve_command(str(args.venv / "bin" / "python"), engine_args, port, args.name, args.vllm_serve_args),
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # the engine arguments' worker extension is in triton_vllm_model
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack.callback(stop_process_group, proc.pid, 60)
    start = time.perf_counter()
    await wait_http(f"http://127.0.0.1:{port}/health", proc, 900)
    return proc, port, time.perf_counter() - start


async def open_target(stack: contextlib.AsyncExitStack, target: str, args, engine_args, triton: dict) -> Target:
    """Start ``target`` and register its shutdown on ``stack``. The Triton targets start one
    server the first time and keep it in ``triton`` for the others."""
    session_timeout = aiohttp.ClientTimeout(total=None, sock_read=600)

    async def session():
        connector = aiohttp.TCPConnector(limit=0)
        return await stack.enter_async_context(aiohttp.ClientSession(timeout=session_timeout, connector=connector))

    if target in TRITON_TARGETS:
        if "server" not in triton:
            triton["server"], triton["startup_s"] = start_triton(stack, args)
        server = triton["server"]
        extra_pids = []
        if target == "triton-http":
            send = triton_http_sender(await session(), f"{server.url}/v2/models/{args.name}/generate_stream", args.output_len)
        elif target == "triton-grpc":
            send = await stack.enter_async_context(
                triton_grpc_sender(f"127.0.0.1:{server.grpc_port}", args.name, args.output_len)
            )
        else:
            service = OpenAIService(
                f"127.0.0.1:{server.grpc_port}",
                port=free_port(),
                log_file=args.out_dir.resolve() / "openai.log",
                workers=args.openai_workers,
                batch_scheduling=args.batch_scheduling,
            ).start()
            stack.callback(service.stop)
            extra_pids.append(service.process.pid)
            send = openai_sender(await session(), f"{service.url}/v1/completions", args.name, args.output_len)
        # The model publishes its metrics every quarter second.
        metrics = metrics_page_totals(f"http://127.0.0.1:{server.metrics_port}/metrics", settle_s=0.6)
        return Target(send, CpuMeter(server.process.pid, True, *extra_pids), metrics, server.process.pid, triton["startup_s"])
    if target == "engine":
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.usage.usage_lib import UsageContext

        start = time.perf_counter()
        # The server defaults the model and `vllm serve` get (max_num_batched_tokens by GPU).
        engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**engine_args), usage_context=UsageContext.OPENAI_API_SERVER)
        startup_s = time.perf_counter() - start
        stack.callback(engine.shutdown)
        meter = CpuMeter(os.getpid(), client_separate=False)
        return Target(engine_sender(engine, args.output_len), meter, in_process_totals, os.getpid(), startup_s)
    proc, port, startup_s = await start_vllm_serve(stack, args, engine_args)
    send = openai_sender(await session(), f"http://127.0.0.1:{port}/v1/completions", args.name, args.output_len)
    metrics = metrics_page_totals(f"http://127.0.0.1:{port}/metrics")
    return Target(send, CpuMeter(proc.pid, client_separate=True), metrics, proc.pid, startup_s)


SCHEDULING_POLICIES = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_BATCH: "SCHED_BATCH", os.SCHED_IDLE: "SCHED_IDLE"}


def server_info(target: Target) -> dict:
    policy = SCHEDULING_POLICIES.get(os.sched_getscheduler(target.pid), "real-time")
    return {"startup_s": target.startup_s, "rss_mb": tree_rss_mb(target.pid), "policy": policy}


async def rounds_one_target_at_a_time(targets, args, engine_args, levels, prompts_for, progress):
    """Each round starts each target afresh, runs its levels and stops it, each round one target later."""
    rounds, servers = [], {}
    for round_no in range(args.repeat):
        rows = []
        for name in rotated(targets, round_no):
            print(f"[{name}] starting{f' (round {round_no + 1} of {args.repeat})' if args.repeat > 1 else ''} ...", flush=True)
            async with contextlib.AsyncExitStack() as stack:
                target = await open_target(stack, name, args, engine_args, {})
                await warm_up(target, prompts_for, args)
                for concurrency, prompts in levels:
                    rows.append(await measure(target, name, prompts, concurrency, progress))
                servers.setdefault(name, server_info(target))
            del target  # the in-process engine, held by its sender, is collected now, not at exit
            gc.collect()
        rounds.append(rows)
    return rounds, servers


async def rounds_interleaved(targets, args, engine_args, levels, prompts_for, progress):
    """Every target started once (the Triton targets share one server); then each round runs
    each level on every target in turn, each round one target later."""
    rounds, started = [], {}
    async with contextlib.AsyncExitStack() as stack:
        triton = {}
        for name in targets:
            print(f"[{name}] starting ...", flush=True)
            started[name] = await open_target(stack, name, args, engine_args, triton)
        for name in targets:
            await warm_up(started[name], prompts_for, args)
        for round_no in range(args.repeat):
            print(f"round {round_no + 1} of {args.repeat}", flush=True)
            rows = []
            for concurrency, prompts in levels:
                for name in rotated(targets, round_no):
                    rows.append(await measure(started[name], name, prompts, concurrency, progress))
            rounds.append(rows)
        servers = {name: server_info(target) for name, target in started.items()}
    started.clear()
    gc.collect()
    return rounds, servers


# ---------------------------------------------------------------------- output


def prefill_share(row: Row) -> str:
    if not row.engine_steps:
        return "-"
    return f"{100 * row.engine_prefill_steps / row.engine_steps:.0f} %"


def table(rows: list[Row]) -> str:
    head = (
        f"{'target':<12} {'conc':>4} {'req':>4} {'fail':>4} {'out tok/s':>10} {'req/s':>7} {'TTFT med':>9} {'TTFT p99':>9} "
        f"{'TPOT med':>9} {'ITL med':>8} {'E2E med':>8} {'srv us/tok':>10} {'cli us/tok':>10} {'eng us/tok':>10} {'eng TPOT':>8} {'eng steps':>9} {'w/ prefill':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:

        def ms(d, k="median"):
            return f"{d[k]:.1f}" if d[k] is not None else "-"

        def us(value):
            return f"{value:.0f}" if value is not None else "-"

        lines.append(
            f"{r.target:<12} {r.concurrency:>4} {r.requests:>4} {r.failed:>4} {r.output_tok_s:>10.1f} {r.req_s:>7.2f} "
            f"{ms(r.ttft_ms):>9} {ms(r.ttft_ms, 'p99'):>9} {ms(r.tpot_ms):>9} {ms(r.itl_ms):>8} {ms(r.e2e_ms):>8} "
            f"{us(r.server_cpu_us_per_tok):>10} {us(r.client_cpu_us_per_tok):>10} {us(r.engine_cpu_us_per_tok):>10} "
            f"{f'{r.engine_tpot_ms:.1f}' if r.engine_tpot_ms is not None else '-':>8} "
            f"{r.engine_steps if r.engine_steps is not None else '-':>9} {prefill_share(r):>10}"
        )
    return "\n".join(lines)


# What each target through this project is compared with: the bare engine and `vllm serve`;
# the OpenAI API also with the Triton gRPC path it forwards to.
BASELINES = {
    "triton-http": ("engine", "vllm-serve"),
    "triton-grpc": ("engine", "vllm-serve"),
    "openai": ("engine", "vllm-serve", "triton-grpc"),
}


def ratios(rows: list[Row]) -> list[dict]:
    by = {(r.target, r.concurrency): r for r in rows}
    out = []
    for r in rows:
        if r.target not in BASELINES:
            continue
        entry = {"target": r.target, "concurrency": r.concurrency}
        for base in BASELINES[r.target]:
            b = by.get((base, r.concurrency))
            if b and b.output_tok_s:
                entry[f"tok_s_vs_{base}"] = r.output_tok_s / b.output_tok_s
            if b and b.ttft_ms["median"] and r.ttft_ms["median"] is not None:
                entry[f"ttft_vs_{base}"] = r.ttft_ms["median"] / b.ttft_ms["median"]
            if b and b.itl_ms["median"] and r.itl_ms["median"] is not None:
                entry[f"itl_vs_{base}"] = r.itl_ms["median"] / b.itl_ms["median"]
        out.append(entry)
    return out


def ratios_by_round(rounds: list[list[Row]]) -> list[dict]:
    """Per target, level and baseline: the target's tokens/s against the baseline's of the same
    round, for every round, and their median. A machine's drift between rounds cancels out."""
    runs = {}  # (target, concurrency, baseline) -> one ratio per round
    for rows in rounds:
        for entry in ratios(rows):
            for base in BASELINES[entry["target"]]:
                if f"tok_s_vs_{base}" in entry:
                    runs.setdefault((entry["target"], entry["concurrency"], base), []).append(entry[f"tok_s_vs_{base}"])
    return [
        {"target": t, "concurrency": c, "baseline": base, "tok_s_median": statistics.median(v), "tok_s_by_round": v}
        for (t, c, base), v in runs.items()
    ]


def plot(rows: list[Row], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for target in dict.fromkeys(r.target for r in rows):
        mine = [r for r in rows if r.target == target]
        xs = [r.concurrency for r in mine]
        ax1.plot(xs, [r.output_tok_s for r in mine], marker="o", label=target)
        ax2.plot(xs, [r.ttft_ms["median"] for r in mine], marker="o", label=target)
        ax3.plot(xs, [r.server_cpu_us_per_tok for r in mine], marker="o", label=target)
    for ax, title in ((ax1, "output tokens/s"), (ax2, "median TTFT (ms)"), (ax3, "server CPU per output token (us)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def rotated(targets: list[str], shift: int) -> list[str]:
    """The targets in the order of round ``shift``: each round starts one target later."""
    shift %= len(targets)
    return targets[shift:] + targets[:shift]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model-repository", type=Path, default=ROOT / "model_repository", help="Triton model repository (default: %(default)s)"
    )
    p.add_argument("--name", default=DEFAULT_MODEL, help="model name in the repository (default: %(default)s)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ", ".join(TARGETS))
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrency levels (default: %(default)s)")
    p.add_argument(
        "--requests-per-level",
        type=int,
        default=4,
        help="requests per level = this x concurrency, at least 16 (default: %(default)s)",
    )
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request, ignore_eos (default: %(default)s)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds over all targets, each round starting one target later, so that a machine's drift reaches every target "
        "alike (each server started afresh each round, unless --interleave); per level the run with the median output "
        "tokens/s is reported, all runs' tokens/s are kept, and with more than one round each target's tokens/s against "
        "its baselines' of the same round (default: %(default)s)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="start every target once and keep them all up (the Triton targets share one server), then run each level on "
        "every target in turn, round after round: targets measured minutes apart compare less well than targets measured "
        "seconds apart. Needs memory for every engine at once: prepare the repository with a --gpu-memory-utilization "
        "that leaves room for them",
    )
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests per target, not measured (default: %(default)s)")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv", help="environment with Triton and vLLM (default: %(default)s)")
    p.add_argument(
        "--out-dir", type=Path, default=ROOT / "results", help="where JSON, PNG and server logs go (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="prompt generation seed")
    p.add_argument(
        "--openai-workers", type=int, default=1, help="processes of the OpenAI API for the openai target (default: %(default)s)"
    )
    p.add_argument(
        "--batch-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the Triton targets' server and the OpenAI API under Linux's SCHED_BATCH policy, as start_triton.sh "
        "does (default: as start_triton.sh, on where no NVIDIA GPU answers nvidia-smi); the other targets run as they are",
    )
    p.add_argument(
        "--vllm-serve-args",
        default="",
        help="more arguments for the vllm-serve target, e.g. '--api-server-count 4' (default: none)",
    )
    return p.parse_args(argv)


async def main_async(args) -> int:
    levels_c = [int(c) for c in args.concurrency.split(",")]
    targets = [t.strip() for t in args.targets.split(",")]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        print(f"error: unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("error: --repeat must be at least 1", file=sys.stderr)
        return 2
    version_dir = args.model_repository / args.name / "1"
    if not (version_dir / "model.json").is_file():
        print(f"error: {version_dir / 'model.json'} is missing: run prepare_qwen_pt.py first", file=sys.stderr)
        return 2
    engine_args = json.loads((version_dir / "model.json").read_text())
    if not os.path.isabs(engine_args["model"]):
        engine_args["model"] = str((version_dir / engine_args["model"]).resolve())
    # Every target runs its engine as the model does (the servers inherit this environment).
    environment = cpu_engine_environment(engine_args, len(os.sched_getaffinity(0)))
    for key, value in environment.items():
        os.environ.setdefault(key, value)
    if args.interleave:
        engines = any(t in TRITON_TARGETS for t in targets) + ("engine" in targets) + ("vllm-serve" in targets)
        share = engine_args.get("gpu_memory_utilization", 0.9)  # vLLM's default
        if engines * share > MEMORY_FOR_ENGINES:
            print(
                f"error: --interleave keeps {engines} engines up at once and model.json gives each gpu_memory_utilization "
                f"{share}; prepare the repository with --gpu-memory-utilization {MEMORY_FOR_ENGINES / engines:.2f} or less",
                file=sys.stderr,
            )
            return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(max(16, args.requests_per_level * c) for c in levels_c)
    pool = make_prompts(engine_args["model"], total + args.warmup, args.input_len, args.seed)
    levels, used = [], 0
    for c in levels_c:
        n = max(16, args.requests_per_level * c)
        levels.append((c, pool[used : used + n]))
        used += n

    def prompts_for(n):
        return pool[-n:]

    def progress(row: Row):
        print(
            f"  {row.target:<12} c={row.concurrency:<4} {row.output_tok_s:9.1f} tok/s  "
            f"TTFT {row.ttft_ms['median'] or 0:8.1f} ms  server CPU {row.server_cpu_us_per_tok or 0:5.0f} us/tok  failed {row.failed}"
            + (f" (first error: {row.first_error[:200]})" if row.first_error else ""),
            flush=True,
        )

    if "engine" in targets:
        # vLLM keeps an exception from its first import, and with it the frames that imported it: an engine one of
        # them holds would live to the interpreter's exit, where its __del__ fails. Import it where none is held.
        from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams  # noqa: F401
    run_rounds = rounds_interleaved if args.interleave else rounds_one_target_at_a_time
    rounds, servers = await run_rounds(targets, args, engine_args, levels, prompts_for, progress)
    rows = median_runs(rounds)

    result = {
        "engine_args": engine_args,
        "environment": {key: os.environ[key] for key in [*environment, "LD_PRELOAD"] if key in os.environ},
        "workload": {"input_len": args.input_len, "output_len": args.output_len, "concurrency": levels_c},
        "servers": servers,
        "rows": [asdict(r) for r in rows],
        "ratios": ratios(rows),
        "ratios_by_round": ratios_by_round(rounds),
    }
    (args.out_dir / "benchmark.json").write_text(json.dumps(result, indent=2))
    print()
    print(table(rows))
    print()
    for r in result["ratios"]:
        parts = [f"{k}={v:.2f}" for k, v in r.items() if k not in ("target", "concurrency")]
        print(f"{r['target']:<12} c={r['concurrency']:<4} " + "  ".join(parts))
    if args.repeat > 1:
        print("\ntokens/s against the baseline of the same round: median (each round)")
        for r in result["ratios_by_round"]:
            each = " ".join(f"{v:.2f}" for v in r["tok_s_by_round"])
            print(f"{r['target']:<12} c={r['concurrency']:<4} vs {r['baseline']:<12} {r['tok_s_median']:.2f} ({each})")
    for target, info in servers.items():
        print(f"{target:<12} start-up {info['startup_s']:.1f} s  resident {info['rss_mb']:.0f} MB  {info['policy']}")
    if plot(rows, args.out_dir / "benchmark.png"):
        print(f"\nwrote {args.out_dir / 'benchmark.json'} and {args.out_dir / 'benchmark.png'}")
    else:
        print(f"\nwrote {args.out_dir / 'benchmark.json'} (install matplotlib for the plot)")
    return 0


def main(argv=None) -> int:
    # The triton-grpc client polls as the OpenAI service does; set before its first import of gRPC.
    use_polling_client()
    # uvloop, as `vllm serve` and the model run theirs: the in-process engine is the floor.
    return uvloop.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
