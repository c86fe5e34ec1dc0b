"""Start and stop the OpenAI-compatible service in the background, as start_triton.sh does.

    python -m serving.openai_api.service start --triton-url 127.0.0.1:8001 [--port 9000] [...]
    python -m serving.openai_api.service stop [--pid-file FILE]

``start`` returns once ``/health`` answers 200 (Triton is ready behind it). Exit codes:
0 serving (or stopped), 1 the service failed to start.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import requests

from serving.tritonserver import (
    ServerError,
    batch_scheduled,
    batch_scheduling_by_default,
    port_in_use,
    start_logged,
    stop_process_group,
    stop_recorded,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LOG = ROOT / "logs" / "openai.log"
DEFAULT_PID_FILE = ROOT / "logs" / "openai.pid"
# The gRPC metadata that carries the key of a Triton started with --api-key.
TRITON_KEY_HEADER = "triton-grpc-protocol-x-triton-key"


@dataclass
class OpenAIService:
    """``python -m serving.openai_api`` as a background process of this Python."""

    triton_url: str
    host: str = "127.0.0.1"
    port: int = 9000
    api_key: str = ""
    triton_headers: dict[str, str] = field(default_factory=dict)
    log_file: Path = DEFAULT_LOG
    workers: int = 1
    batch_scheduling: bool | None = None  # SCHED_BATCH, as the local server; None: when the engine runs on the CPU
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "serving.openai_api", "--host", self.host, "--port", str(self.port)]
        cmd += ["--triton-url", self.triton_url, "--workers", str(self.workers)]
        for name, value in self.triton_headers.items():
            cmd += ["--triton-header", f"{name}={value}"]
        return batch_scheduled(cmd) if self.batch_scheduling else cmd

    def start(self, timeout_s: float = 60) -> OpenAIService:
        if port_in_use(self.host, self.port):
            raise ServerError(f"port {self.port} on {self.host} is already in use: stop the other service or set OPENAI_PORT")
        if self.batch_scheduling is None:
            self.batch_scheduling = batch_scheduling_by_default()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": self.api_key}  # the key never shows in ps
        self.process = start_logged(self.command(), self.log_file, env, cwd=ROOT)
        try:
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        wait_until(self.healthy, self.process, "the OpenAI service", self.log_file, timeout_s, interval_s=0.2)

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> int | None:
        if self.process is None:
            return None
        code = stop_process_group(self.process.pid, 15)
        self.process.wait()
        return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start the service in the background and wait until /health answers 200")
    p.add_argument("--triton-url", required=True, help="host:port of Triton's gRPC endpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=9000, help="port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes serving the API (default: %(default)s)")
    p.add_argument("--triton-api-key", default="", help="key of a Triton started with --api-key (for GET /v1/models)")
    p.add_argument("--log-file", type=Path, default=DEFAULT_LOG, help="service log, appended (default: logs/openai.log)")
    p.add_argument("--pid-file", type=Path, default=DEFAULT_PID_FILE, help="where to record the pid (default: logs/openai.pid)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for /health (default: %(default)s)")
    p.add_argument(
        "--batch-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the service under Linux's SCHED_BATCH policy, as the local server on the CPU, so that its "
        "threads do not preempt the engine core (default: on where no NVIDIA GPU answers nvidia-smi)",
    )
    p = sub.add_parser("stop", help="stop the service recorded in the pid file")
    p.add_argument("--pid-file", type=Path, default=DEFAULT_PID_FILE, help="pid file written by start")
    args = parser.parse_args(argv)

    if args.command == "stop":
        recorded, _ = stop_recorded(args.pid_file, 15)
        print("OpenAI service stopped" if recorded else f"no OpenAI service recorded in {args.pid_file}", file=sys.stderr)
        return 0

    headers = {TRITON_KEY_HEADER: args.triton_api_key} if args.triton_api_key else {}
    service = OpenAIService(
        args.triton_url,
        host=args.host,
        port=args.port,
        api_key=os.environ.get("OPENAI_API_KEY", ""),
        triton_headers=headers,
        log_file=args.log_file.resolve(),
        workers=args.workers,
        batch_scheduling=args.batch_scheduling,
    )
    try:
        service.start(args.timeout)
    except (ServerError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.pid_file.parent.mkdir(parents=True, exist_ok=True)
    args.pid_file.write_text(f"{service.process.pid}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
