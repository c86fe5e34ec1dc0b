"""Download model weights from ModelScope or Hugging Face, failing fast when offline."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

COMPLETE_MARKER = ".download-complete"


class HubUnreachable(RuntimeError):
    pass


def hub_address(source: str) -> tuple[str, int]:
    """Host and port of the hub, honouring MODELSCOPE_DOMAIN and HF_ENDPOINT."""
    if source == "modelscope":
        url = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    else:
        url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(url if "//" in url else f"https://{url}")
    return parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)


def check_reachable(source: str, timeout_s: float = 5.0) -> None:
    host, port = hub_address(source)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise HubUnreachable(f"cannot reach {source} ({host}:{port}): {exc}") from None


def download(source: str, model_id: str, revision: str | None, dest: Path) -> Path:
    """Fetch a snapshot into ``dest`` unless a complete one is already there."""
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    check_reachable(source)
    dest.mkdir(parents=True, exist_ok=True)
    if source == "modelscope":
        from modelscope import snapshot_download

        snapshot_download(model_id, revision=revision or "master", local_dir=str(dest))
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(model_id, revision=revision, local_dir=str(dest))
    (dest / COMPLETE_MARKER).write_text(f"{source}:{model_id}@{revision or 'default'}\n")
    return dest
