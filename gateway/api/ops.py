"""Operations: liveness, readiness (every backend reachable) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.errors import BackendError
from gateway.runtime import Gateway


def build_router(gw: Gateway) -> APIRouter:
    """/healthz, /readyz, /metrics."""
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @router.get("/readyz")
    async def readyz() -> Response:
        checks: dict[str, str] = {}
        ok = gw.started
        b = gw.backends
        for role, backend in (
            ("blobs", b.blobs),
            ("log", b.log),
            ("state", b.state),
            ("keys", b.keys),
        ):
            try:
                await backend.ping()
                checks[role] = f"ok ({backend.name})"
            except BackendError as exc:
                ok = False
                checks[role] = f"unavailable: {exc}"
        checks["ledger"] = f"size {gw.ledger.size}" if gw.started else "not started"
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "checks": checks},
            status_code=200 if ok else 503,
        )

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
