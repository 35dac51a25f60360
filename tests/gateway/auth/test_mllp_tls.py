"""MLLP over mutual TLS: python-hl7's blocking client, its socket wrapped in TLS, as a LIS.

The peer's certificate is mapped to a registered client and its institution; a certificate
signed by the alliance CA but not registered, a peer with no certificate, and a plain
connection to the TLS port are all refused, and none of them writes anything. A plain
connection is allowed only from loopback (unit check of the identification function).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import hl7.client
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.auth.registry import ClientRecord
from gateway.auth.tls import fingerprint, mllp_identifier
from tests.gateway.auth.certs import CA, Issued
from tests.gateway.conftest import FIXTURES, settings_for

MESSAGE = (FIXTURES / "hl7v2" / "oru_r01_lab.hl7").read_bytes()


@pytest.fixture
async def tls_gateway(tmp_path: Path) -> AsyncIterator[tuple[FastAPI, CA, dict[str, Issued]]]:
    ca = CA(tmp_path / "pki")
    server = ca.issue("gateway", server=True)
    peers = {name: ca.issue(name, server=False) for name in ("lis-1", "stranger", "other-inst")}
    settings = settings_for(
        "embedded",
        tmp_path / "gw",
        mllp_enabled=True,
        mllp_port=0,
        tls_cert_file=server.cert,
        tls_key_file=server.key,
        tls_ca_file=ca.path,
        hl7_convert_workers=0,
    )
    app = create_app(settings)
    registry = app.state.auth.registry
    registry.put(
        ClientRecord(
            client_id="lis-1",
            institution=settings.institution,
            scopes=("system/*.c",),
            certificates=(fingerprint(peers["lis-1"].der),),
        )
    )
    registry.put(
        ClientRecord(
            client_id="lis-other",
            institution="another-hospital",
            scopes=("system/*.c",),
            certificates=(fingerprint(peers["other-inst"].der),),
        )
    )
    async with app.router.lifespan_context(app):
        yield app, ca, peers


def _send(port: int, ca: CA, peer: Issued | None) -> bytes:
    """python-hl7's MLLP client over TLS (blocking; run in a thread)."""
    client = hl7.client.MLLPClient("127.0.0.1", port)
    try:
        client.socket.settimeout(20)
        ctx = ssl.create_default_context(cafile=str(ca.path))
        if peer is not None:
            ctx.load_cert_chain(peer.cert, peer.key)
        client.socket = ctx.wrap_socket(client.socket, server_hostname="localhost")
        ack: bytes = client.send_message(MESSAGE)
        # the server may close only after the handshake (TLS 1.3): read until it does
        while ack and not ack.endswith(b"\x1c\r"):
            more = client.socket.recv(65536)
            if not more:
                break
            ack += more
        return ack
    except (ssl.SSLError, ConnectionError, TimeoutError, OSError):
        return b""
    finally:
        client.close()


def _plain(port: int) -> bytes:
    client = hl7.client.MLLPClient("127.0.0.1", port)
    try:
        client.socket.settimeout(20)
        return bytes(client.send_message(MESSAGE))
    except (ConnectionError, TimeoutError, OSError):
        return b""
    finally:
        client.close()


async def test_mllp_mutual_tls(tls_gateway: tuple[FastAPI, CA, dict[str, Issued]]) -> None:
    app, ca, peers = tls_gateway
    port = app.state.mllp.port
    gw = app.state.gateway
    size = gw.ledger.size
    for refused in (peers["stranger"], peers["other-inst"], None):
        ack = await asyncio.to_thread(_send, port, ca, refused)
        assert ack == b"", f"refused peer got an answer: {ack[:80]!r}"
    assert await asyncio.to_thread(_plain, port) == b""
    assert gw.ledger.size == size, "a refused MLLP peer wrote to the ledger"
    metrics = gw.metrics.registry
    assert (
        metrics.get_sample_value("gateway_auth_refusals_total", {"reason": "mllp-certificate"})
        == 1.0
    )
    assert metrics.get_sample_value("gateway_auth_refusals_total", {"reason": "institution"}) == 1.0
    ack = await asyncio.to_thread(_send, port, ca, peers["lis-1"])
    segments = ack.strip(b"\x0b\x1c\r").split(b"\r")
    msa = next(s for s in segments if s.startswith(b"MSA")).split(b"|")
    assert msa[1] in (b"AA", b"CA"), ack
    assert gw.ledger.size > size


def test_plain_mllp_only_on_loopback(tmp_path: Path) -> None:
    app = create_app(settings_for("embedded", tmp_path / "gw"))
    try:
        identify = mllp_identifier(app.state.auth)
        local = identify(None, "127.0.0.1")
        assert local is not None and local.kind == "local"
        assert local.institution == app.state.gateway.settings.institution
        assert identify(None, "::1") is not None
        assert identify(None, "10.1.2.3") is None
        assert identify(b"not a registered certificate", "10.1.2.3") is None
    finally:
        app.state.gateway.ledger.close()  # never started: close the stored tree it opened
