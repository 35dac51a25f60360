"""The HTTP application: ``create_app(settings, backends=None) -> FastAPI``.

All errors become a FHIR ``OperationOutcome`` in one place (:func:`outcome_for`), with the status
the error calls for; messages name elements, records and CIDs but never patient data.

Every API route depends on the authentication guard (gateway/auth/guard.py: one policy table,
deny by default); the MLLP listener identifies its peers by TLS client certificate, or as the
local sender on a plain loopback connection. Raises ConfigurationError for unusable TLS files.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.access import AccessDeniedError, AllowAll
from gateway.api import access_log as access_log_api
from gateway.api import auth as auth_api
from gateway.api import consent as consent_api
from gateway.api import erasure as erasure_api
from gateway.api import fhir as fhir_api
from gateway.api import hl7v2 as hl7v2_api
from gateway.api import imaging as imaging_api
from gateway.api import ledger as ledger_api
from gateway.api import ops as ops_api
from gateway.api import search as search_api
from gateway.api import terminology as terminology_api
from gateway.api.common import PayloadTooLargeError, fhir_response
from gateway.auth.errors import AuthError
from gateway.auth.guard import Authenticator, CallerPolicy, guard_for
from gateway.auth.peer import PeerTokenTransport, gateway_key
from gateway.auth.tls import client_context, mllp_identifier, mllp_server_context
from gateway.backends.protocols import Backends
from gateway.config import Settings
from gateway.consent_policy import ConsentPolicy
from gateway.erasure import RestrictPolicy
from gateway.errors import (
    BackendError,
    ConflictError,
    GatewayError,
    GoneError,
    IntegrityError,
    InvalidInputError,
    KeyDestroyedError,
    NotFoundError,
    PreconditionFailedError,
)
from gateway.fhir import input_outcome, operation_outcome
from gateway.hl7.ingest import HL7Ingest
from gateway.mllp.server import MLLPServer
from gateway.runtime import Gateway
from ledger.errors import LedgerError

log = logging.getLogger("gateway.http")

_INPUT_STATUS = {
    "processing": 422,
    "conflict": 409,
    "too-costly": 413,
    "not-supported-media-type": 415,
}


def outcome_for(exc: Exception) -> tuple[int, dict[str, object]]:
    """Map an exception to (HTTP status, OperationOutcome). The one place that decides."""
    if isinstance(exc, AuthError):
        if exc.status >= 500:
            return exc.status, operation_outcome("error", "transient", str(exc))
        code = "login" if exc.status == 401 else "forbidden"
        return exc.status, operation_outcome("error", code, str(exc))
    if isinstance(exc, AccessDeniedError):
        # Reads refused by the access seam are answered as missing records where they are
        # refused (gateway/records.py); what reaches here is a refusal to say so (a search
        # from another institution naming no patient).
        return 403, operation_outcome("error", "forbidden", str(exc))
    if isinstance(exc, PayloadTooLargeError):
        return 413, operation_outcome("error", "too-costly", str(exc))
    if isinstance(exc, InvalidInputError):
        return _INPUT_STATUS.get(exc.code, 400), input_outcome(exc)
    if isinstance(exc, GoneError):
        return 410, operation_outcome("error", "deleted", str(exc))
    if isinstance(exc, PreconditionFailedError):
        return 412, operation_outcome("error", "conflict", str(exc))
    if isinstance(exc, ConflictError):
        return 409, operation_outcome("error", "conflict", str(exc))
    if isinstance(exc, NotFoundError):
        return 404, operation_outcome("error", "not-found", str(exc))
    if isinstance(exc, KeyDestroyedError):
        return 410, operation_outcome("error", "deleted", "the record's key has been destroyed")
    if isinstance(exc, IntegrityError):
        return 500, operation_outcome("fatal", "exception", f"integrity check failed: {exc}")
    if isinstance(exc, BackendError | LedgerError):
        return 503, operation_outcome(
            "error", "transient", f"storage temporarily unavailable ({type(exc).__name__})"
        )
    if isinstance(exc, GatewayError):
        return 500, operation_outcome("error", "exception", str(exc))
    return 500, operation_outcome("fatal", "exception", "internal error")


def create_app(
    settings: Settings,
    *,
    backends: Backends | None = None,
    witness_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the gateway app; the lifespan starts and stops the :class:`Gateway`.

    ``backends`` and ``witness_transport`` (how this gateway reaches its peers' witnesses) are
    seams for tests; by default they follow the settings. Witness requests to peers carry an
    access token from each peer (gateway/auth/peer.py), over mutual TLS when configured.
    """
    inner = witness_transport
    if inner is None:
        tls = (
            client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
            if settings.tls_cert_file is not None
            else None
        )
        inner = httpx.AsyncHTTPTransport(verify=tls) if tls else httpx.AsyncHTTPTransport()
    peer_transport = PeerTokenTransport(
        inner, client_id=settings.institution, key=gateway_key(settings)
    )
    gw = Gateway(settings, backends=backends, witness_transport=peer_transport)
    auth = Authenticator(settings, gw.backends.state, gw.metrics.registry)
    if settings.auth_off_for_benchmark:
        log.warning("authentication is OFF (auth_off_for_benchmark): a benchmark setting only")
    callers = CallerPolicy(auth, gw.index.links)
    consents = ConsentPolicy(
        callers,
        gw.consents,
        links=gw.index.links,
        institution=settings.institution,
        default_patient=gw.records.no_patient,
    )
    gw.records.policy = RestrictPolicy(consents, gw.erasure_view, institution=settings.institution)
    if settings.access_off_for_benchmark:
        log.warning("access checks and the access log are OFF: a benchmark setting only")
        gw.records.policy = AllowAll()
    elif auth.enabled:
        gw.records.access_log = gw.access_log

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        for hook in app.state.start_hooks:
            await hook()
        try:
            yield
        finally:
            for hook in app.state.stop_hooks:
                await hook()
            await gw.stop()

    app = FastAPI(
        title="Alliance gateway",
        version="0.1.0",
        lifespan=lifespan,
        # The interactive docs only on the embedded profile; the OpenAPI description says
        # what the API is, not what it holds, and stays public (gateway/auth/policy.py).
        docs_url="/docs" if settings.profile == "embedded" else None,
        openapi_url="/openapi.json",
        redoc_url=None,
        dependencies=[Depends(guard_for(auth))],
    )
    app.state.gateway = gw
    app.state.auth = auth
    app.state.start_hooks = []
    app.state.stop_hooks = []

    async def handle(request: Request, exc: Exception) -> Response:
        status, outcome = outcome_for(exc)
        level = logging.ERROR if status >= 500 else logging.INFO
        log.log(
            level,
            "request failed",
            extra={
                "request_id": getattr(request.state, "request_id", None),
                "status": status,
                "error": type(exc).__name__,
                "path": request.url.path,
            },
            exc_info=exc if status == 500 else None,
        )
        headers = {"Retry-After": "5"} if status == 503 else None
        if status == 401:
            headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        return fhir_response(outcome, status=status, headers=headers)

    async def handle_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return fhir_response(
            operation_outcome("error", "invalid", str(first.get("msg")), location=where),
            status=400,
        )

    async def handle_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = "not-found" if exc.status_code == 404 else "not-supported"
        return fhir_response(
            operation_outcome("error", code, str(exc.detail)), status=exc.status_code
        )

    app.add_exception_handler(Exception, handle)
    app.add_exception_handler(GatewayError, handle)
    app.add_exception_handler(LedgerError, handle)
    app.add_exception_handler(RequestValidationError, handle_validation)
    app.add_exception_handler(StarletteHTTPException, handle_http)

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        elapsed = time.perf_counter() - start
        gw.metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        gw.metrics.latency.labels(route).observe(elapsed)
        response.headers["X-Request-Id"] = request_id
        log.info(
            "request",
            extra={
                "request_id": request_id,
                "method": request.method,
                "route": route,
                "status": response.status_code,
                "ms": round(elapsed * 1000, 1),
            },
        )
        return response

    ingest = HL7Ingest(gw)
    app.state.hl7 = ingest
    app.state.start_hooks.append(ingest.start)
    app.include_router(ops_api.build_router(gw))
    app.include_router(terminology_api.build_router(gw))  # before fhir's /fhir/{type}/{id}
    app.include_router(auth_api.build_router(gw, auth))
    app.include_router(consent_api.build_router(gw))  # /fhir/Consent: before search and FHIR
    app.include_router(erasure_api.build_router(gw))  # before the FHIR router
    app.include_router(access_log_api.build_router(gw))  # before search's /fhir/{type}
    app.include_router(search_api.build_router(gw, app))  # before the FHIR router
    app.include_router(fhir_api.build_router(gw, search=getattr(app.state, "search", None)))
    app.include_router(ledger_api.build_router(gw))
    app.include_router(hl7v2_api.build_router(ingest))
    app.include_router(imaging_api.build_router(ingest))
    if settings.mllp_enabled:
        mllp = MLLPServer(
            lambda data, conn: ingest.handle(data, peer=conn.peer),
            host=settings.host,
            port=settings.mllp_port,
            max_message_size=settings.max_mllp_message_bytes,
            idle_timeout=settings.mllp_idle_timeout,
            on_oversize=lambda head, limit: ingest.oversize_ack(head, limit),
            ssl_context=mllp_server_context(settings),
            identify=mllp_identifier(auth),
        )
        app.state.mllp = mllp
        app.state.start_hooks.append(mllp.start)
        app.state.stop_hooks.append(mllp.close)
    app.state.stop_hooks.append(ingest.stop)  # after the listener: nothing left to answer
    return app
