"""The gRPC client setting this project's asyncio clients of Triton share (the OpenAI
service and the benchmark)."""

from __future__ import annotations

import os

# gRPC's older TCP client reads Triton's responses on the thread that polls for them: one
# thread hop fewer per streamed response than its EventEngine client, about 15 % less CPU per
# chunk in the OpenAI service and a third less in the benchmark's client at 16 streams.
POLLING_CLIENT = "-event_engine_client"


def use_polling_client() -> None:
    """Ask gRPC for its polling TCP client, unless GRPC_EXPERIMENTS is set already.

    gRPC reads the variable when it is first imported: call this before anything imports it.
    Processes started afterwards inherit the setting.
    """
    os.environ.setdefault("GRPC_EXPERIMENTS", POLLING_CLIENT)
