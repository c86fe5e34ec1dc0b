"""A local tritonserver with one small Python-backend model, for the scripts that measure the backend itself."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import requests

from serving.tritonserver import LocalServer, ServerError, tail


def probe_config(name: str, decoupled: bool) -> str:
    """config.pbtxt of a probe model: one CPU instance, a string in, strings out."""
    policy = "model_transaction_policy { decoupled: true }\n" if decoupled else ""
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n{policy}'
        "instance_group [{ count: 1, kind: KIND_CPU }]\n"
        'input [{ name: "text_input", data_type: TYPE_STRING, dims: [1] }]\n'
        'output [{ name: "text_output", data_type: TYPE_STRING, dims: [-1] }]\n'
    )


def with_probe_model(name: str, model_file: Path, venv: Path, use: Callable[[str], None], decoupled: bool = False) -> int:
    """Serve ``model_file`` as model ``name`` on free ports, call ``use`` with the server's URL, stop.

    Returns 0, or 1 after printing the error and the server log's last lines.
    """
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / name
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(probe_config(name, decoupled))
        shutil.copyfile(model_file, model_dir / "1" / "model.py")
        server = LocalServer.on_free_ports(Path(tmp), venv=venv, log_file=Path(tmp) / "server.log")
        try:
            with server:
                use(server.url)
        except (ServerError, TimeoutError, requests.RequestException) as exc:
            print(f"error: {exc}\nlast lines of the server log:\n{tail(server.log_file)}", file=sys.stderr)
            return 1
    return 0
