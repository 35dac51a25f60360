"""TLS contexts (HTTPS, MLLP, gateway to gateway) and the mapping of a peer certificate to a
registered client.

Modern settings only: TLS 1.2 or later, ECDHE with AEAD ciphers for TLS 1.2 (TLS 1.3 suites are
all AEAD), no compression, no renegotiation. Mutual TLS: the server asks for a client
certificate signed by the alliance CA (``tls_ca_file``); the MLLP listener maps the
certificate's SHA-256 fingerprint to a registered client (:func:`mllp_identifier`). Raises
ConfigurationError for missing or unreadable files.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
from collections.abc import Callable
from pathlib import Path

from gateway.auth.caller import Caller
from gateway.auth.errors import AuthError, ForbiddenError
from gateway.auth.guard import Authenticator, local_caller
from gateway.auth.policy import Rule, authorize
from gateway.config import Settings
from gateway.errors import ConfigurationError

#: TLS 1.2 suites allowed: forward secret and AEAD only.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def server_context(
    cert: Path, key: Path, ca: Path | None, *, require_client_cert: bool
) -> ssl.SSLContext:
    """A server context; with ``ca``, client certificates signed by it are verified
    (required when ``require_client_cert``, else optional). Raises ConfigurationError."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load TLS certificate, key or CA: {exc}") from exc
    return ctx


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client context verifying the server against ``ca`` (else the system's CAs) and
    presenting ``cert`` (mutual TLS). Raises ConfigurationError."""
    ctx = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    try:
        if ca is not None:
            ctx.load_verify_locations(ca)
        if cert is not None:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load TLS certificate, key or CA: {exc}") from exc
    return ctx


def mllp_server_context(settings: Settings) -> ssl.SSLContext | None:
    """The MLLP listener's context (mutual TLS required), or None without a certificate.
    Raises ConfigurationError when a certificate is configured without its key or CA."""
    if settings.tls_cert_file is None:
        return None
    if settings.tls_key_file is None or settings.tls_ca_file is None:
        raise ConfigurationError("MLLP over TLS needs tls_key_file and tls_ca_file (mutual TLS)")
    return server_context(
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_ca_file,
        require_client_cert=True,
    )


def is_loopback(host: str) -> bool:
    """True for a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint (hex) of a DER certificate, as registered for a client."""
    return hashlib.sha256(der).hexdigest()


def mllp_identifier(
    auth: Authenticator,
) -> Callable[[bytes | None, str], Caller | None]:
    """A function (peer certificate DER or None, peer host) -> the caller, or None to refuse:
    a certificate registered for an enabled client of this institution allowed to send HL7
    v2; without TLS, the configured local sender, on loopback only. Refusals are counted."""
    settings = auth.settings
    local = local_caller(settings)

    def identify(der: bytes | None, host: str) -> Caller | None:
        try:
            if der is None:
                if not is_loopback(host):
                    raise ForbiddenError(
                        "plain MLLP is allowed on loopback only", reason="mllp-plain"
                    )
                return local
            client = auth.registry.by_certificate(fingerprint(der))
            if client is None or client.disabled:
                raise ForbiddenError(
                    "the MLLP peer's certificate is not registered", reason="mllp-certificate"
                )
            caller = Caller(
                client_id=client.client_id,
                institution=client.institution,
                kind="system",
                scopes=client.parsed_scopes(),
            )
            authorize(caller, Rule("hl7"), {}, "POST", institution=settings.institution)
            return caller
        except AuthError as exc:
            auth.refused(exc)
            return None

    return identify
