"""Access tokens: SMART Backend Services issuance, verification, patient and dev tokens.

Issuance (:meth:`TokenService.issue`) checks a client's signed JWT assertion (RFC 7523, SMART
Backend Services): ``iss`` = ``sub`` = a registered, enabled client; ``aud`` = this token URL;
``exp`` in the future and at most five minutes ahead; the key named by ``kid`` among the
client's, and only that key's registered algorithm; then the ``jti`` is claimed atomically in
the state store (Redis ``SET NX`` in production, keyed by the issuer, living past ``exp``), so a
replayed assertion is refused by every process of the gateway. The access token is a JWT
(HS256 with the gateway's token key, which only this gateway's processes hold and check),
lasting at most five minutes, carrying the granted scopes and purposes, the user and role, the
break-glass reason and, for a patient token, the patient's pseudonym.

Verification (:meth:`TokenService.verify`) caches each verified token until it expires, so the
signature is checked once per token and not once per request; the client's registration is
looked up on every request (a disabled client is refused at once). Dev tokens (``gateway
dev-token``) are the same JWTs marked ``dev``; the production profile refuses them.

JOSE is joserfc's. Raises :class:`gateway.auth.errors.TokenRequestError` (token endpoint),
:class:`AuthenticationError` (a bad bearer token).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OctKey

from gateway.auth.caller import Caller
from gateway.auth.errors import AuthenticationError, TokenRequestError
from gateway.auth.purposes import EMERGENCY, KNOWN, PATIENT_PURPOSE, parse_purposes
from gateway.auth.registry import ClientRecord, ClientRegistry
from gateway.auth.scopes import Scope, ScopeError, format_scopes, grant, parse_scopes
from gateway.backends.protocols import StateStore

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_LIFETIME = 300  # seconds: SMART's limit for assertions and for access tokens
_LEEWAY = 30  # clock skew accepted on assertion exp and on token expiry
_CACHE_LIMIT = 20_000


def _b64json(part: str) -> dict[str, Any]:
    padded = part + "=" * (-len(part) % 4)
    value = json.loads(base64.urlsafe_b64decode(padded))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


class TokenService:
    """Issues and verifies this gateway's access tokens."""

    def __init__(
        self,
        *,
        key: bytes,
        issuer: str,
        institution: str,
        registry: ClientRegistry,
        state: StateStore,
        lifetime: int = MAX_LIFETIME,
        allow_dev: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < 32:
            raise ValueError("the token key must be at least 32 bytes")
        self._key = OctKey.import_key(key)
        self.issuer = issuer
        self.institution = institution
        self.registry = registry
        self.state = state
        self.lifetime = min(lifetime, MAX_LIFETIME)
        self.allow_dev = allow_dev
        self._clock = clock
        self._cache: dict[str, Caller] = {}

    # -- issuance ---------------------------------------------------------------------------

    async def issue(self, form: Mapping[str, str], *, token_url: str) -> dict[str, Any]:
        """Answer a ``client_credentials`` token request (form fields). Returns the token
        response. Raises TokenRequestError (invalid_request, unsupported_grant_type,
        invalid_client, invalid_scope, invalid_grant)."""
        if form.get("grant_type") != "client_credentials":
            raise TokenRequestError(
                "unsupported_grant_type", "grant_type must be client_credentials"
            )
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise TokenRequestError(
                "invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}"
            )
        assertion = form.get("client_assertion") or ""
        client, claims = self._check_assertion(assertion, token_url)
        ttl = max(1.0, float(claims["exp"]) - self._clock() + 60)
        try:
            (previous,) = await self.state.claim_many(
                [(f"auth:jti:{client.client_id}:{claims['jti']}", b"1", ttl)]
            )
        except Exception as exc:  # BackendError: nothing truthful can be said; refuse
            raise TokenRequestError(
                "temporarily_unavailable", "the replay check is unavailable", status=503
            ) from exc
        if previous is not None:
            raise TokenRequestError(
                "invalid_client",
                f"assertion jti of client {client.client_id} was already used",
                status=401,
            )
        scopes = self._grant_scopes(client, form.get("scope", ""))
        purposes, reason = self._grant_purposes(client, form)
        user, role = self._subject(client, form)
        token, exp = self.mint(
            client_id=client.client_id,
            institution=client.institution,
            kind="system",
            scopes=scopes,
            purposes=purposes,
            user=user,
            role=role,
            break_glass=reason,
            gateway=client.gateway,
        )
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": int(exp - self._clock()),
            "scope": format_scopes(scopes),
            "purpose_of_use": " ".join(purposes),
        }

    def _check_assertion(
        self, assertion: str, token_url: str
    ) -> tuple[ClientRecord, dict[str, Any]]:
        parts = assertion.split(".")
        if len(parts) != 3:
            raise TokenRequestError("invalid_request", "client_assertion is not a compact JWS")
        try:
            header, unverified = _b64json(parts[0]), _b64json(parts[1])
        except (ValueError, UnicodeDecodeError) as exc:
            raise TokenRequestError(
                "invalid_request", "client_assertion cannot be decoded"
            ) from exc
        iss = unverified.get("iss")
        client = self.registry.get(iss) if isinstance(iss, str) else None
        if client is None or client.disabled:
            raise TokenRequestError("invalid_client", "unknown or disabled client", status=401)
        kid = header.get("kid")
        algs = client.key_algorithms()
        if not isinstance(kid, str) or kid not in algs:
            raise TokenRequestError(
                "invalid_client", f"client {client.client_id} has no key {kid!r}", status=401
            )
        alg = algs[kid]
        if header.get("alg") != alg:
            raise TokenRequestError(
                "invalid_client", f"key {kid} is registered for {alg} only", status=401
            )
        try:
            keys = KeySet.import_key_set(client.jwks)  # type: ignore[arg-type]
            token = jwt.decode(assertion, keys, algorithms=[alg])
        except (JoseError, ValueError) as exc:
            raise TokenRequestError(
                "invalid_client",
                f"assertion signature of client {client.client_id} is invalid",
                status=401,
            ) from exc
        claims = dict(token.claims)
        now = self._clock()
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        problems = []
        if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
            problems.append("iss and sub must both be the client id")
        if token_url not in auds:
            problems.append("aud must be the token URL")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            problems.append("exp is missing")
        elif exp < now - _LEEWAY:
            problems.append("the assertion has expired")
        elif exp > now + MAX_LIFETIME + _LEEWAY:
            problems.append("exp is more than five minutes ahead")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= 255:
            problems.append("jti is missing")
        if problems:
            raise TokenRequestError(
                "invalid_client", f"client {client.client_id}: " + "; ".join(problems), status=401
            )
        return client, claims

    def _grant_scopes(self, client: ClientRecord, requested: str) -> tuple[Scope, ...]:
        try:
            wanted = parse_scopes(requested)
        except ScopeError as exc:
            raise TokenRequestError("invalid_scope", str(exc)) from exc
        if not wanted:
            raise TokenRequestError("invalid_scope", "no scope requested")
        granted = grant(wanted, client.parsed_scopes())
        if not granted:
            raise TokenRequestError(
                "invalid_scope",
                f"none of the requested scopes is registered for {client.client_id}",
            )
        return granted

    def _grant_purposes(
        self, client: ClientRecord, form: Mapping[str, str]
    ) -> tuple[tuple[str, ...], str | None]:
        requested = parse_purposes(form.get("purpose_of_use"))
        registered = parse_purposes(client.purposes)
        unknown = [p for p in requested if p not in KNOWN]
        if unknown:
            raise TokenRequestError("invalid_request", f"unknown purposes of use {unknown}")
        if not requested:
            requested = tuple(p for p in registered if p not in EMERGENCY)
        granted = tuple(p for p in requested if p in registered)
        reason = (form.get("break_glass_reason") or "").strip() or None
        if any(p in EMERGENCY for p in granted):
            if not client.break_glass:
                raise TokenRequestError(
                    "invalid_scope", f"client {client.client_id} may not break the glass"
                )
            if reason is None:
                raise TokenRequestError("invalid_request", "break-glass needs break_glass_reason")
        if requested and not granted:
            raise TokenRequestError(
                "invalid_scope",
                f"none of the requested purposes is registered for {client.client_id}",
            )
        if not any(p in EMERGENCY for p in granted):
            reason = None
        return granted, reason

    def _subject(
        self, client: ClientRecord, form: Mapping[str, str]
    ) -> tuple[str | None, str | None]:
        user = (form.get("subject_id") or "").strip() or None
        role = (form.get("subject_role") or "").strip() or None
        if role is not None:
            if role not in client.roles:
                raise TokenRequestError(
                    "invalid_request", f"role {role} is not registered for {client.client_id}"
                )
            if user is None:
                raise TokenRequestError("invalid_request", "subject_role needs subject_id")
        return user, role

    def mint(
        self,
        *,
        client_id: str,
        institution: str,
        kind: str,
        scopes: tuple[Scope, ...],
        purposes: tuple[str, ...],
        patient: str | None = None,
        user: str | None = None,
        role: str | None = None,
        break_glass: str | None = None,
        gateway: bool = False,
        dev: bool = False,
    ) -> tuple[str, float]:
        """Sign an access token; return it and its expiry (epoch seconds)."""
        now = self._clock()
        exp = int(now) + self.lifetime
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": client_id,
            "client_id": client_id,
            "inst": institution,
            "kind": kind,
            "scope": format_scopes(scopes),
            "pou": list(purposes),
            "iat": int(now),
            "exp": exp,
            "jti": uuid.uuid4().hex,
        }
        for name, value in (
            ("patient", patient),
            ("user", user),
            ("role", role),
            ("btg", break_glass),
        ):
            if value is not None:
                claims[name] = value
        if gateway:
            claims["gw"] = True
        if dev:
            claims["dev"] = True
        return jwt.encode({"alg": "HS256", "typ": "at+jwt"}, claims, self._key), exp

    # -- verification -------------------------------------------------------------------------

    def verify(self, authorization: str | None) -> Caller:
        """The caller behind an ``Authorization: Bearer`` header value.

        Raises AuthenticationError (reasons ``no-token``, ``bad-token``, ``expired``,
        ``wrong-audience``, ``dev-token``, ``client-disabled``).
        """
        if not authorization:
            raise AuthenticationError("an access token is required", reason="no-token")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("the Authorization header must be Bearer", reason="bad-token")
        token = token.strip()
        now = self._clock()
        caller = self._cache.get(token)
        if caller is None:
            caller = self._decode(token)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache = {t: c for t, c in self._cache.items() if c.expires_at > now}
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
            self._cache[token] = caller
        if caller.expires_at <= now:
            self._cache.pop(token, None)
            raise AuthenticationError("the access token has expired", reason="expired")
        if caller.kind == "system" and not caller.dev:
            client = self.registry.get(caller.client_id)
            if client is None or client.disabled:
                raise AuthenticationError(
                    f"client {caller.client_id} is disabled", reason="client-disabled"
                )
        return caller

    def _decode(self, token: str) -> Caller:
        try:
            claims = dict(jwt.decode(token, self._key, algorithms=["HS256"]).claims)
        except (JoseError, ValueError) as exc:
            raise AuthenticationError("the access token is not valid", reason="bad-token") from exc
        if claims.get("iss") != self.issuer:
            raise AuthenticationError(
                "the access token was issued for another gateway", reason="wrong-audience"
            )
        if claims.get("dev") and not self.allow_dev:
            raise AuthenticationError("dev tokens are refused on this profile", reason="dev-token")
        try:
            kind = claims["kind"]
            if kind not in ("system", "patient", "local"):
                raise ValueError(kind)
            return Caller(
                client_id=str(claims["client_id"]),
                institution=str(claims["inst"]),
                kind=kind,
                scopes=parse_scopes(str(claims.get("scope", ""))),
                purposes=tuple(str(p) for p in claims.get("pou", [])),
                patient=claims.get("patient"),
                user=claims.get("user"),
                role=claims.get("role"),
                break_glass=claims.get("btg"),
                jti=str(claims["jti"]),
                gateway=bool(claims.get("gw", False)),
                expires_at=float(claims["exp"]),
                dev=bool(claims.get("dev", False)),
            )
        except (KeyError, ValueError, TypeError, ScopeError) as exc:
            raise AuthenticationError("the access token is not valid", reason="bad-token") from exc

    def patient_token(self, portal: Caller, pseudonym: str, requested: str) -> dict[str, Any]:
        """A patient token for ``pseudonym``, asked by an authenticated portal client: its
        patient/ scopes, those requested and registered for the portal. Raises
        TokenRequestError."""
        client = self.registry.get(portal.client_id)
        if client is None or not client.portal:
            raise TokenRequestError("unauthorized_client", "only portal clients get patient tokens")
        try:
            wanted = parse_scopes(requested or "patient/*.rs")
        except ScopeError as exc:
            raise TokenRequestError("invalid_scope", str(exc)) from exc
        granted = grant(
            [s for s in wanted if s.context == "patient"],
            [s for s in client.parsed_scopes() if s.context == "patient"],
        )
        if not granted:
            raise TokenRequestError("invalid_scope", "no patient/ scope requested and registered")
        token, exp = self.mint(
            client_id=client.client_id,
            institution=client.institution,
            kind="patient",
            scopes=granted,
            purposes=(PATIENT_PURPOSE,),
            patient=pseudonym,
        )
        return {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": int(exp - self._clock()),
            "scope": format_scopes(granted),
            "purpose_of_use": PATIENT_PURPOSE,
        }

    def with_purpose(self, caller: Caller, purpose: str | None) -> Caller:
        """The caller with this request's purpose selected."""
        return caller if caller.purpose == purpose else replace(caller, purpose=purpose)
