"""The HTTP side of authentication: the guard every route depends on, and the refusal counter.

:class:`Authenticator` is built once per app (:func:`build_authenticator`); :func:`guard_for`
returns the FastAPI dependency that create_app attaches to every API route. The guard finds the
route's rule (deny by default), verifies the bearer token, selects the purpose of use, applies
the rule, and stores the :class:`Caller` on ``request.state.caller``. Every refusal is counted
in ``gateway_auth_refusals_total{reason}``. Raises AuthenticationError (401), ForbiddenError
(403), which the app's handler turns into OperationOutcomes.
"""

from __future__ import annotations

import os
import secrets as pysecrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter

from gateway.access import PERMIT, AccessDecision, AccessRequest, SearchFilter
from gateway.auth.caller import Caller
from gateway.auth.errors import AuthError, ForbiddenError
from gateway.auth.policy import authorize, check_patient, rule_for
from gateway.auth.purposes import HEADER, select_purpose
from gateway.auth.registry import ClientRegistry, registry_path
from gateway.auth.scopes import parse_scopes
from gateway.auth.tokens import TokenService
from gateway.backends.protocols import StateStore
from gateway.config import Settings
from gateway.errors import ConfigurationError
from gateway.views import PatientLinks


def issuer_of(settings: Settings) -> str:
    """The ``iss`` of this gateway's access tokens (the same for all its processes)."""
    return f"urn:alliance:gateway:{settings.institution}"


def token_key(settings: Settings) -> bytes:
    """The key access tokens are signed with: configured, else ``data_dir/secrets/token.key``
    (created, mode 0600, on first use). Raises ConfigurationError for a bad value."""
    if settings.token_key is not None:
        try:
            value = bytes.fromhex(settings.token_key.get_secret_value())
        except ValueError as exc:
            raise ConfigurationError("token_key must be hex") from exc
        if len(value) < 32:
            raise ConfigurationError("token_key must be at least 32 bytes")
        return value
    path: Path = settings.data_dir / "secrets" / "token.key"
    if path.exists():
        value = bytes.fromhex(path.read_text().strip())
        if len(value) < 32:
            raise ConfigurationError(f"{path} must hold at least 32 bytes in hex")
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    value = pysecrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this gateway created it first
        return token_key(settings)
    with os.fdopen(fd, "w") as f:
        f.write(value.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return value


#: Who calls a public route: nobody in particular, allowed nothing.
ANONYMOUS = Caller(client_id="anonymous", institution="", kind="system")


def local_caller(settings: Settings) -> Caller:
    """The loopback MLLP sender (embedded profile, tests): a configured local client of this
    institution that may create every type."""
    return Caller(
        client_id=settings.mllp_local_sender,
        institution=settings.institution,
        kind="local",
        scopes=parse_scopes("system/*.cu"),
    )


class Authenticator:
    """Token service, registry and refusal counter of one app."""

    def __init__(self, settings: Settings, state: StateStore, metrics: CollectorRegistry) -> None:
        self.settings = settings
        self.registry = ClientRegistry(registry_path(settings.data_dir))
        self.tokens = TokenService(
            key=token_key(settings),
            issuer=issuer_of(settings),
            institution=settings.institution,
            registry=self.registry,
            state=state,
            lifetime=settings.token_lifetime,
            allow_dev=settings.profile != "production",
        )
        self.refusals = Counter(
            "gateway_auth_refusals_total",
            "Requests and connections refused by authentication or authorisation",
            ["reason"],
            registry=metrics,
        )
        self.enabled = not settings.auth_off_for_benchmark

    def refused(self, exc: AuthError) -> None:
        """Count a refusal."""
        self.refusals.labels(exc.reason).inc()

    def token_url(self, request: Request) -> str:
        """The token endpoint's URL: the ``aud`` client assertions must name."""
        base = self.settings.public_base_url or str(request.base_url)
        return base.rstrip("/") + "/auth/token"

    def caller_for(self, request: Request) -> Caller:
        """Authenticate and authorise one request for its matched route. Raises AuthError."""
        route = request.scope.get("route")
        template = getattr(route, "path", None)
        method = request.method
        rule = rule_for(method, template) if isinstance(template, str) else None
        if rule is None:
            raise ForbiddenError(f"{method} {template} has no access rule", reason="no-rule")
        if rule.kind == "public":
            return ANONYMOUS
        caller = self.tokens.verify(request.headers.get("authorization"))
        purpose = select_purpose(caller.purposes, request.headers.get(HEADER))
        caller = self.tokens.with_purpose(caller, purpose)
        authorize(caller, rule, request.path_params, method, institution=self.settings.institution)
        return caller


def guard_for(auth: Authenticator) -> Callable[[Request], Awaitable[None]]:
    """The dependency every API route gets."""
    everything = local_caller(auth.settings)

    async def guard(request: Request) -> None:
        if not auth.enabled:
            request.state.caller = everything
            return
        try:
            request.state.caller = auth.caller_for(request)
        except AuthError as exc:
            auth.refused(exc)
            raise

    return guard


class CallerPolicy:
    """The record service's access seam (:class:`gateway.access.AccessPolicy`) once callers are
    authenticated: a patient token reaches only its patient's records (under every pseudonym
    linked to it); writes were authorised by the guard (and per entry). Calls made inside the
    gateway without a caller (the HL7 path, remap) are not refused here. Raises
    ForbiddenError."""

    def __init__(self, auth: Authenticator, links: PatientLinks) -> None:
        self._auth = auth
        self._links = links

    async def search_filter(
        self, caller: object | None, patients: frozenset[str] | None = None
    ) -> SearchFilter:
        """A patient token finds only its patient's records (every linked pseudonym);
        others are not restricted here (each returned record is still checked as a read)."""
        if isinstance(caller, Caller) and caller.kind == "patient" and caller.patient:
            return SearchFilter(patients=self._links.all_of(caller.patient))
        return SearchFilter()

    async def check(self, caller: object | None, request: AccessRequest) -> AccessDecision:
        """Refuse a patient token reaching another patient's record."""
        if not isinstance(caller, Caller) or request.interaction in ("create", "update"):
            return PERMIT
        try:
            check_patient(caller, request.patient, tuple(self._links.all_of(request.patient)))
        except AuthError as exc:
            self._auth.refused(exc)
            raise
        return PERMIT
