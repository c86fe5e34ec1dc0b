#!/usr/bin/env python3
"""Ask the served model through Triton's HTTP generate endpoints.

  python client_http.py "What is Triton?"                  # whole answer
  python client_http.py --stream "Tell me a story"          # tokens as they arrive
  python client_http.py --chat --system "Be brief" "Hi"     # chat template
  python client_http.py -f prompts.txt -c 8 -o results.txt  # a batch, 8 at a time

Exit codes: 0 ok, 1 a request was rejected or its answer cut off, 2 bad usage,
3 server unreachable, 4 model unknown or not ready, 130 interrupted (requests
cancelled on the server).
"""

from __future__ import annotations

import argparse
import json
import sys

import requests

from serving import client
from serving.client import Chunk, ClientError, RequestFailed


def base_url(url: str) -> str:
    return (url if "://" in url else f"http://{url}").rstrip("/")


def check_model(session: requests.Session, base: str, model: str) -> None:
    try:
        ready = session.get(f"{base}/v2/models/{model}/ready", timeout=10)
    except requests.RequestException as exc:
        raise ClientError(
            client.UNREACHABLE, f"no Triton server at {base} ({exc.__class__.__name__}); is it running? ./start_triton.sh"
        ) from None
    if ready.status_code != 200:
        raise ClientError(
            client.NOT_READY,
            f"model '{model}' is not ready on {base} (HTTP {ready.status_code}); check the name with --model and the server log",
        )


def error_text(resp: requests.Response) -> str:
    try:
        return resp.json().get("error", resp.text)
    except ValueError:
        return resp.text or f"HTTP {resp.status_code}"


def to_chunk(data: dict) -> Chunk:
    if "error" in data:
        raise RequestFailed(data["error"])

    def first(key, default=None):  # with n > 1 each output is a list: show the first sequence
        value = data.get(key, default)
        return value[0] if isinstance(value, list) and value else value

    return Chunk(
        text=first("text_output", ""),
        finish_reason=first("finish_reason") or None,
        num_input_tokens=first("num_input_tokens"),
        num_output_tokens=first("num_output_tokens"),
    )


def request_body(prompt: str, messages, stream: bool, params: dict) -> dict:
    body = {
        "text_input": prompt,
        "stream": stream,
        "exclude_input_in_output": True,
        "return_finish_reason": True,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
        # An input rather than Triton request parameters, which cannot hold lists (stop=[...]).
        "sampling_parameters": json.dumps(params),
    }
    if messages is not None:
        body["messages"] = json.dumps(messages)
    return body


def make_generate(args: argparse.Namespace, params: dict):
    base = base_url(args.url)
    extra_headers = client.headers(args)
    probe = requests.Session()
    probe.headers.update(extra_headers)
    check_model(probe, base, args.model)
    probe.close()
    endpoint = "generate_stream" if args.stream else "generate"
    url = f"{base}/v2/models/{args.model}/{endpoint}"

    def generate(prompt, messages):
        session = requests.Session()  # one per call: sessions are not thread-safe
        session.headers.update(extra_headers)
        body = request_body(prompt, messages, args.stream, params)
        try:
            with session.post(url, json=body, stream=args.stream, timeout=args.timeout) as resp:
                if resp.status_code != 200:
                    raise RequestFailed(error_text(resp))
                if not args.stream:
                    yield to_chunk(resp.json())
                    return
                for event in client.iter_sse(resp):
                    yield to_chunk(event)
        except requests.RequestException as exc:
            raise RequestFailed(f"{exc.__class__.__name__}: {exc}") from None
        finally:
            session.close()

    return generate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    client.add_common_args(parser, default_url="http://localhost:8000")
    # On Ctrl-C the process exits at once; its closed connections make Triton cancel the requests.
    return client.main(parser, make_generate, argv)


if __name__ == "__main__":
    sys.exit(main())
