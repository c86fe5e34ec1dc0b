"""The documented deployment's guard rails: loopback only, and a key on the control APIs."""

import requests
import tritonclient.grpc as grpcclient
from helpers import MODEL
from tritonclient.utils import InferenceServerException


def test_server_listens_on_loopback_only(server):
    assert server.host == "127.0.0.1"
    assert f"--http-address={server.host}" in server.command()
    assert f"--grpc-address={server.host}" in server.command()


def test_model_control_api_needs_the_key_while_inference_does_not(server, generate_url):
    index = f"{server.url}/v2/repository/index"
    refused = requests.post(index, timeout=10)
    assert refused.status_code == 403
    assert "restricted" in refused.text.lower() or "x-triton-key" in refused.text.lower()
    allowed = requests.post(index, headers={"x-triton-key": "test-key"}, timeout=10)
    assert allowed.status_code == 200
    assert requests.post(generate_url, json={"text_input": "Hi", "parameters": {"max_tokens": 2}}, timeout=60).ok


def test_unload_over_grpc_without_the_key_is_refused(server):
    client = grpcclient.InferenceServerClient(f"{server.host}:{server.grpc_port}")
    try:
        client.unload_model(MODEL)
        raise AssertionError("unload_model succeeded without the key")
    except InferenceServerException as exc:
        assert "restricted" in str(exc).lower() or "permission" in str(exc).lower() or "unavailable" in str(exc).lower()
    assert client.is_model_ready(MODEL)


def test_shared_memory_api_needs_the_key(server):
    resp = requests.get(f"{server.url}/v2/systemsharedmemory/status", timeout=10)
    assert resp.status_code == 403
