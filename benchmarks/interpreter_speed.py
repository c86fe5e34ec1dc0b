#!/usr/bin/env python3
"""How fast the Python of Triton's Python-backend stub runs, against python3's.

The stub is a program of its own that loads libpython's shared build; python3
may have the interpreter linked into itself (Debian, Ubuntu). vLLM's engine
core runs on whichever it is started from: a forked copy of the stub ("fork",
vLLM's default) or a fresh python3 ("spawn", what the model uses). This times
one pure-Python workload in all six places, python3's on this side and the
stub's on a real tritonserver with a small model
(benchmarks/interpreter_speed_model.py):

  .venv/bin/python benchmarks/interpreter_speed.py

Exit codes: 0 done, 1 the server failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from benchmarks import interpreter_speed_model as probe  # noqa: E402
from benchmarks.probe_server import with_probe_model  # noqa: E402
from serving.tritonserver import ServerError  # noqa: E402

PLACES = {"self": "", "fork": ", forked", "spawn": ", started anew"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repeat", type=int, default=5, help="runs of the workload per place; the best counts (default: %(default)s)"
    )
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="environment with Triton (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be positive")
    return args


def in_the_stub(url: str, repeat: int) -> dict:
    body = {"text_input": json.dumps({"repeat": repeat})}
    response = requests.post(f"{url}/v2/models/interpreter_speed/generate", json=body, timeout=600)
    if response.status_code != 200:
        raise ServerError(f"the probe model answered {response.status_code}: {response.text[:500]}")
    return json.loads(response.json()["text_output"])


def table(measured: dict[str, dict]) -> str:
    """One row per place, with its time against python3's own."""
    reference = measured["python3"]["seconds"]
    rows = [f"{'where':<22} {'seconds':>8} {'x python3':>9}  executable (libpython)"]
    for where, figures in measured.items():
        lib = f" ({figures['libpython']})" if figures["libpython"] else ""
        rows.append(
            f"{where:<22} {figures['seconds']:>8.3f} {figures['seconds'] / reference:>9.2f}  {figures['executable']}{lib}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    here = probe.all_places(args.repeat)
    measured = {f"python3{PLACES[place]}": figures for place, figures in here.items()}

    def measure_the_stub(url):
        stub = in_the_stub(url, args.repeat)
        measured.update({f"stub{PLACES[place]}": figures for place, figures in stub.items()})

    failed = with_probe_model("interpreter_speed", Path(probe.__file__), args.venv, measure_the_stub)
    if not failed:
        print(table(measured))
    return failed


if __name__ == "__main__":
    sys.exit(main())
