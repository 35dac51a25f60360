"""HTTPS: ``gateway serve`` with a certificate answers over TLS (modern settings), refuses a
plain port off loopback, and the token check works the same behind it."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx

from gateway.auth.dev import dev_token
from gateway.cli import https_options
from gateway.config import Settings
from gateway.demo import free_port
from gateway.errors import ConfigurationError
from tests.gateway.auth.certs import CA
from tests.gateway_process import gateway_env, serve, stop


def test_plain_http_only_on_loopback(tmp_path: Path) -> None:
    assert https_options(Settings(data_dir=tmp_path, host="127.0.0.1")) == {}
    try:
        https_options(Settings(data_dir=tmp_path, host="0.0.0.0"))
    except ConfigurationError as exc:
        assert "loopback" in str(exc)
    else:
        raise AssertionError("a plain port off loopback was accepted")


def test_serve_over_https(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("gateway", server=True)
    settings = Settings(profile="embedded", data_dir=tmp_path / "gw", institution="tls-hospital")
    port = free_port()
    env = gateway_env(
        settings,
        GATEWAY_HL7_CONVERT_WORKERS="0",
        GATEWAY_TLS_CERT_FILE=str(server.cert),
        GATEWAY_TLS_KEY_FILE=str(server.key),
        GATEWAY_TLS_CA_FILE=str(ca.path),
    )
    verify = ssl.create_default_context(cafile=str(ca.path))
    base = f"https://localhost:{port}"
    proc = serve(env, port, tmp_path / "serve.log", base=base, verify=verify)
    try:
        assert httpx.get(base + "/ledger/checkpoint", verify=verify).status_code == 401
        token = dev_token(settings, client_id="his", scope="system/*.rs")
        r = httpx.get(
            base + "/ledger/checkpoint",
            verify=verify,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200, r.text
        # plain HTTP on the TLS port gets no answer
        try:
            plain = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3)
            assert plain.status_code >= 400
        except httpx.TransportError:
            pass
        # modern settings: TLS 1.2 at most one version back, AEAD ciphers only
        tls12 = ssl.create_default_context(cafile=str(ca.path))
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        for ctx in (verify, tls12):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                cipher = tls.cipher()
                assert cipher is not None
                name = cipher[0]
                assert "GCM" in name or "CHACHA20" in name, name
    finally:
        stop([proc])
