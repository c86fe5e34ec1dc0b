"""Serve the OpenAI-compatible API in front of a running Triton server.

  python -m serving.openai_api                          # Triton's gRPC at 127.0.0.1:8001
  python -m serving.openai_api --triton-url host:8001 --port 9000 --api-key KEY

Exit codes: 0 stopped cleanly, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os

import uvicorn

from serving.client import split_option
from serving.grpc_client import use_polling_client


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serving.openai_api",
        description="OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions, /health) "
        "that forwards every request to Triton over gRPC streaming.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("OPENAI_PORT", 9000)), help="port (default: OPENAI_PORT or 9000)"
    )
    parser.add_argument(
        "--triton-url",
        default=f"127.0.0.1:{os.environ.get('GRPC_PORT', 8001)}",
        help="host:port of Triton's gRPC endpoint (default: 127.0.0.1:GRPC_PORT, GRPC_PORT defaulting to 8001)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: OPENAI_API_KEY; unset: no key)",
    )
    parser.add_argument(
        "--triton-header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="gRPC metadata sent to Triton with every call, e.g. the key of a server started with --api-key: "
        "triton-grpc-protocol-x-triton-key=KEY (repeatable)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("OPENAI_WORKERS", 1)),
        help="processes serving the API on the one port; more than one lets it use more CPU cores "
        "under many streams (default: OPENAI_WORKERS or 1)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="(default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        args.triton_headers = dict(split_option(h, "--triton-header", "NAME=VALUE") for h in args.triton_header)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    use_polling_client()
    from serving.openai_api.app import SETTINGS_VARIABLE  # imports gRPC

    # Each worker process builds its app from these settings (see app.from_environment).
    os.environ[SETTINGS_VARIABLE] = json.dumps(
        {"triton_url": args.triton_url, "triton_headers": args.triton_headers, "api_key": args.api_key}
    )
    uvicorn.run(
        "serving.openai_api.app:from_environment",
        factory=True,
        workers=args.workers,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        loop="uvloop",
        access_log=False,
        # A stop cancels the requests in flight at once (and so on Triton) instead of waiting for them.
        timeout_graceful_shutdown=0,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
