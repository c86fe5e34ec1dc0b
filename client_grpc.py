#!/usr/bin/env python3
"""Ask the served model over gRPC with tritonclient's streaming API.

  python client_grpc.py "What is Triton?"
  python client_grpc.py --stream --max-tokens 64 "Tell me a story"
  python client_grpc.py --url my-host:8001 --ssl --header authorization="Bearer T" "Hi"

Exit codes: 0 ok, 1 a request was rejected or its answer cut off, 2 bad usage,
3 server unreachable, 4 model unknown or not ready, 130 interrupted (requests
cancelled on the server).
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
import uuid
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving import client
from serving.client import Chunk, ClientError, RequestFailed
from serving.triton_inputs import request_inputs


def connect(args: argparse.Namespace) -> grpcclient.InferenceServerClient:
    root = args.root_certificates
    if root and not root.is_file():
        raise ClientError(client.USAGE, f"--root-certificates {root}: no such file")
    return grpcclient.InferenceServerClient(args.url, ssl=args.ssl, root_certificates=str(root) if root else None)


def error_text(error) -> str:
    return error.message() if hasattr(error, "message") else str(error)


def check_model(args: argparse.Namespace) -> None:
    extra_headers = client.headers(args)
    try:
        conn = connect(args)
        live = conn.is_server_live(headers=extra_headers)
    except InferenceServerException as exc:
        raise ClientError(
            client.UNREACHABLE, f"no Triton server at {args.url} ({exc.message()}); is it running? ./start_triton.sh"
        ) from None
    if not live:
        raise ClientError(client.UNREACHABLE, f"the Triton server at {args.url} is not live")
    try:
        ready = conn.is_model_ready(args.model, headers=extra_headers)
    except InferenceServerException:
        ready = False
    if not ready:
        raise ClientError(
            client.NOT_READY, f"model '{args.model}' is not ready on {args.url}; check the name with --model and the server log"
        )
    conn.close()


def to_chunk(result) -> Chunk:
    def first(name):
        array = result.as_numpy(name)
        return None if array is None or array.size == 0 else array.reshape(-1)[0]

    text = first("text_output")
    reason = first("finish_reason")
    n_in, n_out = first("num_input_tokens"), first("num_output_tokens")
    return Chunk(
        text=text.decode("utf-8") if isinstance(text, bytes) else (text or ""),
        finish_reason=(reason.decode() if isinstance(reason, bytes) else reason) or None,
        num_input_tokens=None if n_in is None else int(n_in),
        num_output_tokens=None if n_out is None else int(n_out),
    )


def make_generate(args: argparse.Namespace, params: dict):
    check_model(args)
    extra_headers = client.headers(args)

    def generate(prompt, messages):
        responses: queue.Queue = queue.Queue()
        conn = connect(args)
        try:
            conn.start_stream(callback=lambda result, error: responses.put((result, error)), headers=extra_headers)
            try:
                conn.async_stream_infer(
                    args.model,
                    request_inputs(prompt, messages, args.stream, params),
                    request_id=uuid.uuid4().hex,
                    enable_empty_final_response=True,
                )
            except InferenceServerException as exc:
                # The server may have closed the stream already; its reason reaches the callback.
                try:
                    _, error = responses.get(timeout=2)
                except queue.Empty:
                    error = None
                raise RequestFailed(error_text(error or exc)) from None
            deadline = time.monotonic() + args.timeout
            while True:
                try:
                    # Short waits, so that Ctrl-C is handled at once (see client.SIGNAL_POLL_S).
                    result, error = responses.get(timeout=client.SIGNAL_POLL_S)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise RequestFailed(f"no response within {args.timeout:.0f} s") from None
                    continue
                if error is not None:
                    raise RequestFailed(error_text(error))
                response = result.get_response()
                if response.outputs:
                    yield to_chunk(result)
                if response.parameters["triton_final_response"].bool_param:
                    return
        finally:
            conn.stop_stream(cancel_requests=True)
            conn.close()

    return generate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    client.add_common_args(parser, default_url="localhost:8001")
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--ssl", action="store_true", help="connect with TLS")
    tls.add_argument("--root-certificates", type=Path, help="PEM file of CA certificates for --ssl")
    return client.main(parser, make_generate, argv)


if __name__ == "__main__":
    sys.exit(main())
