#!/usr/bin/env python3
"""How many streamed responses a second the Python backend's sender threads get out,
with and without another thread keeping the GIL busy, per interpreter switch interval
and number of senders.

A sender thread releases the GIL for each response's round trip to the server
process and then has to win it back from vLLM's output loop; Python makes a busy
thread give the GIL up only after the switch interval. Several senders wait for
their round trips at the same time. This measures that cap on a real tritonserver
with a small model (benchmarks/send_rate_model.py):

  .venv/bin/python benchmarks/send_rate.py

Exit codes: 0 done, 1 the server failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from benchmarks.probe_server import with_probe_model  # noqa: E402
from serving.client import iter_sse  # noqa: E402
from serving.tritonserver import ServerError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=2000, help="responses per measurement (default: %(default)s)")
    parser.add_argument(
        "--switch-intervals",
        default="0.005,0.001,0.0005,0.0002",
        help="comma-separated sys.setswitchinterval values in seconds; 0.005 is Python's default (default: %(default)s)",
    )
    parser.add_argument(
        "--senders",
        default="1,4",
        help="comma-separated numbers of sender threads sending at once, each for its own request; "
        "the model's SENDER_THREADS (default: %(default)s)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="measurements per setting (default: %(default)s)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="environment with Triton (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        args.switch_intervals = [float(v) for v in args.switch_intervals.split(",")]
    except ValueError:
        parser.error(f"--switch-intervals must be numbers separated by commas, got {args.switch_intervals!r}")
    try:
        args.senders = [int(v) for v in args.senders.split(",")]
    except ValueError:
        parser.error(f"--senders must be whole numbers separated by commas, got {args.senders!r}")
    if args.responses < 1 or args.repeat < 1 or not all(v > 0 for v in args.switch_intervals + args.senders):
        parser.error("--responses, --repeat, every switch interval and every number of senders must be positive")
    return args


def measure_one(url: str, config: dict) -> dict:
    response = requests.post(
        f"{url}/v2/models/send_rate/generate_stream", json={"text_input": json.dumps(config)}, stream=True, timeout=120
    )
    response.raise_for_status()
    events = list(iter_sse(response))
    # The report is the one event that holds JSON; every other one is "x". Once, on a
    # loaded machine, a stream's last event was an "x" (whether the report came before it
    # was not recorded), so the report is looked for, not assumed last.
    reports = [e["text_output"] for e in events if e.get("text_output", "").startswith("{")]
    if len(reports) != 1:
        raise ServerError(f"the send-rate model did not report its figures: {len(events)} events, the last {events[-2:]}")
    return json.loads(reports[0])


def measure(url: str, senders: int, config: dict) -> dict:
    """``senders`` requests at once share ``config["responses"]``: their responses and the busy
    thread's rounds a second, over the time from the first send to the last."""
    config = {**config, "responses": max(1, config["responses"] // senders)}
    with ThreadPoolExecutor(senders) as pool:
        results = list(pool.map(lambda _: measure_one(url, config), range(senders)))
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    rounds = max(r["rounds_at_end"] for r in results) - min(r["rounds_at_start"] for r in results)
    return {"responses_per_s": config["responses"] * senders / elapsed, "busy_rounds_per_s": rounds / elapsed}


def report(url: str, args: argparse.Namespace) -> None:
    print(f"{'switch interval':>16} {'senders':>8} {'busy thread':>12} {'responses/s':>12} {'busy rounds/s':>14}")
    for interval in args.switch_intervals:
        for senders in args.senders:
            for busy in (False, True):
                for _ in range(args.repeat):
                    config = {"responses": args.responses, "busy": busy, "switch_interval_s": interval}
                    result = measure(url, senders, config)
                    rounds = f"{result['busy_rounds_per_s']:14.0f}" if busy else f"{'-':>14}"
                    print(
                        f"{interval * 1000:13.2f} ms {senders:8d} {'yes' if busy else 'no':>12} "
                        f"{result['responses_per_s']:12.0f} {rounds}"
                    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_file = Path(__file__).with_name("send_rate_model.py")
    return with_probe_model("send_rate", model_file, args.venv, lambda url: report(url, args), decoupled=True)


if __name__ == "__main__":
    sys.exit(main())
