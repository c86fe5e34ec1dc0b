"""Download model weights from ModelScope or Hugging Face, failing fast when offline."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

COMPLETE_MARKER = ".download-complete"


class HubUnreachable(RuntimeError):
    pass


def hub_host(source: str) -> str:
    if source == "modelscope":
        domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
        return urlparse(domain if "//" in domain else f"https://{domain}").hostname
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname


def check_reachable(source: str, timeout_s: float = 5.0) -> None:
    host = hub_host(source)
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as exc:
        raise HubUnreachable(f"cannot reach {source} ({host}:443): {exc}") from None


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
