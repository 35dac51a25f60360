"""Gateway to gateway: this gateway's own client identity, and the transport that gets it
tokens from its peers.

Each gateway is a SMART Backend Services client of every other member: its client id is its
institution, its key an ES384 key in ``data_dir/auth/gateway-key.json`` (created on first use,
mode 0600); ``gateway clients self`` prints the public JWKS a peer registers with ``gateway
clients add --gateway``. :class:`PeerTokenTransport` wraps the transport the witness collector
uses: before a ``POST /ledger/witness`` it obtains (and caches until shortly before expiry) an
access token from that peer's ``/auth/token`` with a signed assertion. Over TLS the inner
transport presents this gateway's certificate too (mutual TLS).

Raises ConfigurationError for an unreadable key file; token failures surface as the peer's
401 to the witness collector, which retries as for any refusal.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey

from gateway.auth.tokens import ASSERTION_TYPE
from gateway.config import Settings
from gateway.errors import ConfigurationError

#: What a gateway asks its peers for.
GATEWAY_SCOPE = "system/*.rs"
GATEWAY_PURPOSE = "TREAT"


def gateway_key(settings: Settings) -> ECKey:
    """This gateway's client key (ES384), created on first use. Raises ConfigurationError."""
    path = settings.data_dir / "auth" / "gateway-key.json"
    if path.exists():
        try:
            return ECKey.import_key(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    key = ECKey.generate_key("P-384", private=True, auto_kid=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.as_dict(private=True)
    data["alg"] = "ES384"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return gateway_key(settings)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    return key


def public_jwks(key: ECKey) -> dict[str, Any]:
    """The public JWKS of a client key (what a peer registers)."""
    public = key.as_dict(private=False)
    public["alg"] = "ES384"
    return {"keys": [public]}


def client_assertion(key: ECKey, client_id: str, token_url: str, *, lifetime: int = 60) -> str:
    """A SMART Backend Services client assertion for ``token_url``."""
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "exp": now + lifetime,
        "iat": now,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode({"alg": "ES384", "kid": key.kid}, claims, key, algorithms=["ES384"])


class PeerTokenTransport(httpx.AsyncBaseTransport):
    """Adds a peer's access token to witness requests sent to it."""

    def __init__(self, inner: httpx.AsyncBaseTransport, *, client_id: str, key: ECKey) -> None:
        self._inner = inner
        self._client_id = client_id
        self._key = key
        self._tokens: dict[str, tuple[str, float]] = {}

    async def _token(self, base: str) -> str | None:
        cached = self._tokens.get(base)
        if cached is not None and cached[1] > time.time() + 30:
            return cached[0]
        url = base + "/auth/token"
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(self._key, self._client_id, url),
            "scope": GATEWAY_SCOPE,
            "purpose_of_use": GATEWAY_PURPOSE,
        }
        response = await self._inner.handle_async_request(httpx.Request("POST", url, data=form))
        body = await response.aread()
        await response.aclose()
        if response.status_code != 200:
            return None
        try:
            answer = json.loads(body)
            token = str(answer["access_token"])
            expires = time.time() + float(answer["expires_in"])
        except (ValueError, KeyError, TypeError):
            return None
        self._tokens[base] = (token, expires)
        return token

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``, with a token when it goes to a peer's witness."""
        if request.url.path.endswith("/ledger/witness") and request.method == "POST":
            base = str(request.url.copy_with(path="/", query=None, fragment=None)).rstrip("/")
            token = await self._token(base)
            if token is not None:
                request.headers["Authorization"] = f"Bearer {token}"
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._inner.aclose()
