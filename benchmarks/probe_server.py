"""A local tritonserver with one small Python-backend model, for the scripts that measure the backend itself."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import requests

from serving.tritonserver import LocalServer, ServerError, tail


def with_probe_model(name: str, config: str, model_file: Path, venv: Path, use: Callable[[str], None]) -> int:
    """Serve ``model_file`` as model ``name`` on free ports, call ``use`` with the server's URL, stop.

    Returns 0, or 1 after printing the error and the server log's last lines.
    """
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / name
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(config)
        shutil.copyfile(model_file, model_dir / "1" / "model.py")
        server = LocalServer.on_free_ports(Path(tmp), venv=venv, log_file=Path(tmp) / "server.log")
        try:
            with server:
                use(server.url)
        except (ServerError, TimeoutError, requests.RequestException) as exc:
            print(f"error: {exc}\nlast lines of the server log:\n{tail(server.log_file)}", file=sys.stderr)
            return 1
    return 0
