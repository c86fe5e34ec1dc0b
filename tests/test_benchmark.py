"""benchmarks/benchmark.py: its request senders against the real server, and one whole run of the script."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys

import aiohttp
import pytest
from helpers import DEVICE, MODEL, ROOT, SERVER_VENV, run_script
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(ROOT / "benchmarks"))
import benchmark  # noqa: E402

OUTPUT_LEN = 12


def test_summarize_follows_vllm_bench_definitions():
    a = benchmark.Sample(ttft=0.1, e2e=0.5, itl=[0.1, 0.1, 0.2], output_tokens=5)
    b = benchmark.Sample(ttft=0.3, e2e=0.7, itl=[0.4], output_tokens=3)
    failed = benchmark.Sample(error="boom")
    row = benchmark.summarize("t", 2, [a, b, failed], duration=2.0)
    assert (row.requests, row.failed, row.first_error) == (3, 1, "boom")
    assert row.output_tok_s == pytest.approx(4.0)  # 8 tokens of the successful requests in 2 s
    assert row.req_s == pytest.approx(1.0)
    assert row.ttft_ms["median"] == pytest.approx(200)
    assert row.tpot_ms["median"] == pytest.approx(150)  # (0.4/4 + 0.4/2) / 2 seconds
    assert row.itl_ms["median"] == pytest.approx(150)  # gaps 100, 100, 200, 400 ms
    assert row.e2e_ms["median"] == pytest.approx(600)


def test_each_round_starts_one_target_later():
    targets = ["a", "b", "c"]
    orders = [benchmark.rotated(targets, shift) for shift in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_the_grpc_client_polls_unless_the_user_chose(monkeypatch):
    monkeypatch.setenv("GRPC_EXPERIMENTS", "")  # restored after the test
    monkeypatch.delenv("GRPC_EXPERIMENTS")
    assert benchmark.main(["--targets", "no-such-target"]) == 2
    assert os.environ["GRPC_EXPERIMENTS"] == "-event_engine_client"
    monkeypatch.setenv("GRPC_EXPERIMENTS", "")
    assert benchmark.main(["--targets", "no-such-target"]) == 2
    assert os.environ["GRPC_EXPERIMENTS"] == ""


def test_importing_the_benchmark_leaves_grpc_unimported():
    # gRPC reads GRPC_EXPERIMENTS once, at its first import: main() must come first.
    check = "import sys; sys.path.insert(0, 'benchmarks'); import benchmark; print('grpc' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_vllm_serve_gets_the_models_engine_arguments_and_the_extra_ones():
    engine_args = {"model": "/m", "max_model_len": 512, "enforce_eager": True, "enable_prefix_caching": False}
    cmd = benchmark.vllm_serve_command("py", engine_args, 8123, "qwen", "--api-server-count 4")
    assert cmd[cmd.index("--model") + 1] == "/m"
    assert cmd[cmd.index("--max-model-len") + 1] == "512"
    assert "--enforce-eager" in cmd and "--enable-prefix-caching" not in cmd
    assert cmd[-2:] == ["--api-server-count", "4"]


def test_median_runs_pairs_each_target_and_level_across_rotated_rounds():
    def row(target, tok_s):
        return benchmark.summarize(target, 2, [benchmark.Sample(ttft=0.1, e2e=0.2, itl=[], output_tokens=tok_s)], 1.0)

    rounds = [[row("a", 10), row("b", 100)], [row("b", 300), row("a", 30)], [row("a", 20), row("b", 200)]]
    medians = benchmark.median_runs(rounds)
    assert [(r.target, r.output_tok_s, r.tok_s_runs) for r in medians] == [("a", 20, [10, 30, 20]), ("b", 200, [100, 300, 200])]


def test_ratios_by_round_set_each_target_against_its_baseline_of_the_same_round():
    def row(target, concurrency, tok_s):
        return benchmark.summarize(target, concurrency, [benchmark.Sample(ttft=0.1, e2e=0.2, output_tokens=tok_s)], 1.0)

    # the machine runs twice as fast in round 2: the ratios of each round stay what they are
    rounds = [
        [row("engine", 16, 100), row("triton-grpc", 16, 90), row("vllm-serve", 16, 120)],
        [row("triton-grpc", 16, 200), row("engine", 16, 200), row("vllm-serve", 16, 180)],
        [row("vllm-serve", 16, 100), row("engine", 16, 100), row("triton-grpc", 16, 80)],
    ]
    ratios = {(r["target"], r["baseline"]): r for r in benchmark.ratios_by_round(rounds)}
    assert set(ratios) == {("triton-grpc", "engine"), ("triton-grpc", "vllm-serve")}
    assert ratios["triton-grpc", "engine"]["tok_s_by_round"] == pytest.approx([0.9, 1.0, 0.8])
    assert ratios["triton-grpc", "engine"]["tok_s_median"] == pytest.approx(0.9)
    assert ratios["triton-grpc", "vllm-serve"]["tok_s_by_round"] == pytest.approx([0.75, 200 / 180, 0.8])


def test_interleave_refuses_engines_that_do_not_fit_in_memory_together(tmp_path):
    version = tmp_path / "repo" / MODEL / "1"
    version.mkdir(parents=True)
    (version / "model.json").write_text(json.dumps({"model": "weights", "gpu_memory_utilization": 0.4}))
    flags = ["--model-repository", str(tmp_path / "repo"), "--out-dir", str(tmp_path / "out"), "--interleave"]
    done = run_script("benchmarks/benchmark.py", *flags, "--targets", "triton-grpc,engine,vllm-serve", timeout=120)
    assert done.returncode == 2
    assert "3 engines" in done.stderr and "--gpu-memory-utilization 0.30" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything started


def totals(page: str) -> dict:
    return benchmark.metric_totals(text_string_to_metric_families(page))


def test_engine_tpot_sums_every_label_set_and_prefers_vllms_name():
    page = """# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{instance="0",le="+Inf"} 3
vllm:time_per_output_token_seconds_sum{instance="0"} 0.03
vllm:time_per_output_token_seconds_count{instance="0"} 3
vllm:time_per_output_token_seconds_bucket{instance="1",le="+Inf"} 1
vllm:time_per_output_token_seconds_sum{instance="1"} 0.05
vllm:time_per_output_token_seconds_count{instance="1"} 1
"""
    assert benchmark.engine_tpot_totals(totals(page)) == pytest.approx((0.08, 4))
    newer = """# TYPE vllm:request_time_per_output_token_seconds histogram
vllm:request_time_per_output_token_seconds_sum{engine="0"} 0.5
vllm:request_time_per_output_token_seconds_count{engine="0"} 10
"""
    assert benchmark.engine_tpot_totals(totals(page + newer)) == pytest.approx((0.5, 10))
    assert benchmark.engine_tpot_totals(totals("# nothing\n")) is None


def step_page(within_16: int, count: int) -> str:
    return f"""# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{{engine="0",le="8.0"}} 1
vllm:iteration_tokens_total_bucket{{engine="0",le="16.0"}} {within_16}
vllm:iteration_tokens_total_bucket{{engine="0",le="32.0"}} {within_16}
vllm:iteration_tokens_total_bucket{{engine="0",le="+Inf"}} {count}
vllm:iteration_tokens_total_count{{engine="0"}} {count}
vllm:iteration_tokens_total_sum{{engine="0"}} 1000
"""


def test_engine_steps_with_a_prefill_are_those_with_more_tokens_than_streams():
    before, after = totals(step_page(10, 12)), totals(step_page(110, 137))
    assert benchmark.engine_steps(before, after, 16) == (125, 25)  # 100 steps of at most 16 tokens
    assert benchmark.engine_steps(before, after, 12) == (125, 25)  # the next bound up, 16
    assert benchmark.engine_steps(before, after, 64) is None  # no bound that high but +Inf
    assert benchmark.engine_steps(totals("# nothing\n"), after, 16) is None


def measure(server, send_factory, concurrency=4, requests=8):
    async def main():
        async with aiohttp.ClientSession() as session, send_factory(session) as send:
            meter = benchmark.CpuMeter(server.process.pid, client_separate=True)
            prompts = [f"prompt number {i} about rivers" for i in range(requests)]
            return await benchmark.run_measured(send, prompts, concurrency, meter, "t")

    return asyncio.run(main())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sender_counts_every_token_and_the_cpu_it_costs(server, protocol):
    def factory(session):
        if protocol == "grpc":
            return benchmark.triton_grpc_sender(f"{server.host}:{server.grpc_port}", MODEL, OUTPUT_LEN)
        url = f"{server.url}/v2/models/{MODEL}/generate_stream"
        return contextlib.nullcontext(benchmark.triton_http_sender(session, url, OUTPUT_LEN))

    row = measure(server, factory)
    assert row.failed == 0, row.first_error
    assert row.output_tok_s * row.duration_s == pytest.approx(8 * OUTPUT_LEN)
    assert row.ttft_ms["median"] > 0 and row.e2e_ms["median"] >= row.ttft_ms["median"]
    assert row.server_cpu_us_per_tok > 0 and row.client_cpu_us_per_tok > 0
    assert 0 < row.engine_cpu_us_per_tok < row.server_cpu_us_per_tok  # the engine core, one of the server's processes


def test_openai_sender_counts_every_token_through_the_openai_api(server, openai_service):
    def factory(session):
        return contextlib.nullcontext(benchmark.openai_sender(session, f"{openai_service.url}/v1/completions", MODEL, OUTPUT_LEN))

    row = measure(server, factory)
    assert row.failed == 0, row.first_error
    assert row.output_tok_s * row.duration_s == pytest.approx(8 * OUTPUT_LEN)
    assert row.ttft_ms["median"] > 0 and row.itl_ms["median"] is not None


def test_grpc_sender_reports_the_servers_error(server):
    async def main():
        async with benchmark.triton_grpc_sender(f"{server.host}:{server.grpc_port}", "no-such-model", OUTPUT_LEN) as send:
            return await send("hello")

    sample = asyncio.run(main())
    assert "no-such-model" in sample.error


def run_benchmark(repository, out_dir, *flags):
    done = run_script(
        "benchmarks/benchmark.py",
        "--model-repository", str(repository),
        "--concurrency", "2",
        "--requests-per-level", "8",
        "--output-len", str(OUTPUT_LEN),
        "--warmup", "2",
        "--repeat", "2",
        "--venv", os.environ.get("TEST_VENV", str(ROOT / ".venv")),
        "--out-dir", str(out_dir),
        *flags,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done, json.loads((out_dir / "benchmark.json").read_text())


@pytest.mark.slow
def test_whole_run_writes_table_json_and_plot(tiny_repository, tmp_path):
    # the HTTP sender is tested above
    done, result = run_benchmark(tiny_repository, tmp_path, "--targets", "triton-grpc,openai,engine,vllm-serve", "--interleave")
    rows = {r["target"]: r for r in result["rows"]}
    assert sorted(rows) == ["engine", "openai", "triton-grpc", "vllm-serve"]
    for row in rows.values():
        assert row["failed"] == 0, row["first_error"]
        assert row["requests"] == 16 and len(row["tok_s_runs"]) == 2
        assert row["output_tok_s"] * row["duration_s"] == pytest.approx(16 * OUTPUT_LEN)
        # the engine core found among each target's processes, its CPU a part of theirs
        assert 0 < row["engine_cpu_us_per_tok"] < row["server_cpu_us_per_tok"], row["target"]
        # the engine's own time per token, read from its metrics: present, and shorter than a whole request
        assert 0 < row["engine_tpot_ms"] < row["e2e_ms"]["median"], row["target"]
        # its steps: 16 requests of OUTPUT_LEN tokens, two at a time; each prefill in a step of its own or shared
        assert 8 * OUTPUT_LEN <= row["engine_steps"] <= 16 * OUTPUT_LEN, row["target"]
        assert 8 <= row["engine_prefill_steps"] <= 16, row["target"]
    ratios = {r["target"]: r for r in result["ratios"]}
    assert {"tok_s_vs_engine", "tok_s_vs_vllm-serve", "ttft_vs_vllm-serve", "itl_vs_vllm-serve"} <= set(ratios["triton-grpc"])
    assert {"tok_s_vs_triton-grpc", "tok_s_vs_vllm-serve"} <= set(ratios["openai"])
    by_round = {(r["target"], r["baseline"]): r for r in result["ratios_by_round"]}
    assert len(by_round["triton-grpc", "engine"]["tok_s_by_round"]) == 2
    assert len(by_round["openai", "triton-grpc"]["tok_s_by_round"]) == 2
    for target, info in result["servers"].items():
        assert info["startup_s"] > 0 and info["rss_mb"] > 100, target
    assert result["servers"]["openai"]["startup_s"] == result["servers"]["triton-grpc"]["startup_s"]  # one Triton server
    # Triton runs under SCHED_BATCH on the CPU, as start_triton.sh starts it; the baselines as vLLM starts them
    assert result["servers"]["triton-grpc"]["policy"] == ("SCHED_BATCH" if DEVICE == "cpu" else "SCHED_OTHER")
    assert result["servers"]["engine"]["policy"] == result["servers"]["vllm-serve"]["policy"] == "SCHED_OTHER"
    assert done.stdout.count("starting ...") == 4  # each target started once, not once a round
    assert (tmp_path / "benchmark.png").stat().st_size > 10_000
    for column in ("tok_s_vs_vllm-serve", "srv us/tok", "eng us/tok", "eng TPOT"):
        assert column in done.stdout
    if DEVICE == "cpu":  # every target's engine process asked for AMX, as the model's does
        assert "AMX tile permission" in done.stdout + done.stderr
        assert "AMX tile permission" in (tmp_path / "vllm-serve.log").read_text()


@pytest.mark.slow
def test_rounds_start_each_target_afresh_one_target_later_each_round(tiny_repository, tmp_path):
    done, result = run_benchmark(tiny_repository, tmp_path, "--targets", "engine,triton-grpc")
    starts = [line for line in done.stdout.splitlines() if line.startswith("[") and "starting" in line]
    assert starts == [
        "[engine] starting (round 1 of 2) ...",
        "[triton-grpc] starting (round 1 of 2) ...",
        "[triton-grpc] starting (round 2 of 2) ...",
        "[engine] starting (round 2 of 2) ...",
    ]
    for row in result["rows"]:
        assert row["failed"] == 0 and len(row["tok_s_runs"]) == 2, row
    (ratios,) = result["ratios_by_round"]
    assert (ratios["target"], ratios["baseline"], len(ratios["tok_s_by_round"])) == ("triton-grpc", "engine", 2)
    assert "against the baseline of the same round" in done.stdout


@pytest.mark.parametrize("flags", [["--repeat", "0"], ["--targets", "triton-grpc,nonsense"]])
def test_bad_flags_exit_2(flags, tmp_path):
    done = run_script("benchmarks/benchmark.py", *flags, "--out-dir", str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert "error:" in done.stderr


def test_send_rate_measures_the_senders_with_and_without_a_busy_thread():
    done = run_script(
        "benchmarks/send_rate.py", "--responses", "200", "--switch-intervals", "0.005", "--senders", "1,3", "--repeat", "1"
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("5.00 ms")]
    assert [(row[2], row[3]) for row in rows] == [("1", "no"), ("1", "yes"), ("3", "no"), ("3", "yes")]
    assert all(float(row[4]) > 0 for row in rows)  # responses a second
    assert all(float(row[5]) > 0 for row in rows if row[3] == "yes")  # the busy thread's rounds a second


@pytest.mark.parametrize(
    "flags",
    [["--switch-intervals", "fast"], ["--switch-intervals", "0"], ["--repeat", "0"], ["--senders", "0"], ["--senders", "two"]],
)
def test_send_rate_bad_flags_exit_2(flags):
    done = run_script("benchmarks/send_rate.py", *flags, timeout=60)
    assert done.returncode == 2
    assert "error:" in done.stderr


def test_interpreter_speed_times_python3_and_the_stub_where_an_engine_core_can_run():
    done = run_script("benchmarks/interpreter_speed.py", "--repeat", "1", "--venv", str(SERVER_VENV))
    assert done.returncode == 0, done.stderr
    rows = {line[:22].strip(): line[22:].split() for line in done.stdout.splitlines()[1:]}
    assert list(rows) == ["python3", "python3, forked", "python3, started anew", "stub", "stub, forked", "stub, started anew"]
    assert all(float(row[0]) > 0 for row in rows.values())
    assert rows["python3"][1] == "1.00"
    stub = SERVER_VENV / "tritonserver" / "backends" / "python" / "triton_python_backend_stub"
    assert rows["stub"][2] == rows["stub, forked"][2] == str(stub)  # a fork runs the stub's own interpreter
    assert os.path.basename(rows["stub, started anew"][2]).startswith("python")  # what vLLM's "spawn" runs


def test_interpreter_speed_bad_flags_exit_2():
    done = run_script("benchmarks/interpreter_speed.py", "--repeat", "0", timeout=60)
    assert done.returncode == 2
    assert "error:" in done.stderr
