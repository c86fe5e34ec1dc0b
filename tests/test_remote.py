"""The clients against a server set up like a remote one: gRPC over TLS, and
inference restricted to callers that send a key header."""

import datetime
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import run_script, start_server

RESTRICTION = "x-team-key=s3cret"
HTTP_KEY = RESTRICTION
GRPC_KEY = "triton-grpc-protocol-" + RESTRICTION  # Triton's prefix for gRPC metadata


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "server.crt", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@pytest.fixture(scope="module")
def remote_server(tiny_repository, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(folder)
    restricted = f"inference:{RESTRICTION}"
    srv = start_server(
        tiny_repository,
        folder / "tritonserver.log",
        extra_args=[
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={cert}",
            f"--grpc-server-key={key}",
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
        ],
    )
    srv.certificate = cert
    yield srv
    srv.stop()


def grpc_client(server, *args):
    url = f"localhost:{server.grpc_port}"
    return run_script("client_grpc.py", "--url", url, "--max-tokens", "4", "--json", *args, "Hi", timeout=180)


def http_client(server, *args):
    return run_script("client_http.py", "--url", server.url, "--max-tokens", "4", "--json", *args, "Hi", timeout=180)


def test_grpc_client_over_tls_with_the_key_header(remote_server):
    done = grpc_client(remote_server, "--ssl", "--root-certificates", str(remote_server.certificate), "-H", GRPC_KEY)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_output_tokens"] == 4


def test_grpc_client_without_tls_cannot_reach_a_tls_server(remote_server):
    done = grpc_client(remote_server, "-H", GRPC_KEY)
    assert done.returncode == 3, done.stderr
    assert "no Triton server" in done.stderr
    assert "Traceback" not in done.stderr


def test_grpc_client_without_the_key_header_is_refused(remote_server):
    done = grpc_client(remote_server, "--ssl", "--root-certificates", str(remote_server.certificate))
    assert done.returncode == 1
    assert "x-team-key" in done.stdout  # the server's own error text, in the JSON result


def test_http_client_sends_the_key_header(remote_server):
    refused = http_client(remote_server)
    assert refused.returncode == 1
    assert "x-team-key" in refused.stdout
    done = http_client(remote_server, "-H", HTTP_KEY)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_output_tokens"] == 4
