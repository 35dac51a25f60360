"""Authentication routes: ``POST /auth/token`` (SMART Backend Services), ``POST
/auth/patient-token`` (a portal asks for a patient's token), ``GET
/.well-known/smart-configuration``.

The token endpoint answers as OAuth 2.0 does (RFC 6749 section 5): JSON with ``error`` and
``error_description``, status 400 (401 for ``invalid_client``), ``Cache-Control: no-store``;
every refusal is counted by reason. The patient-token route takes the portal's own access token
(the guard checked it) and a JSON body naming the patient's master identifier.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.api.common import parse_json, read_body
from gateway.auth.errors import TokenRequestError
from gateway.auth.guard import Authenticator
from gateway.auth.purposes import KNOWN
from gateway.auth.registry import CLIENT_ALGORITHMS
from gateway.identity import patient_identity
from gateway.runtime import Gateway

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
MAX_FORM_BYTES = 64 * 1024


def _oauth_error(exc: TokenRequestError) -> Response:
    return JSONResponse(
        {"error": exc.error, "error_description": str(exc)},
        status_code=exc.status,
        headers=_NO_STORE,
    )


def smart_configuration(auth: Authenticator, request: Request) -> dict[str, Any]:
    """The SMART configuration document (SMART App Launch 2, Backend Services)."""
    return {
        "issuer": auth.tokens.issuer,
        "token_endpoint": auth.token_url(request),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(CLIENT_ALGORITHMS),
        "scopes_supported": ["system/*.cruds", "user/*.rs", "patient/*.rs"],
        "capabilities": ["client-confidential-asymmetric", "permission-v2"],
        "purpose_of_use_supported": sorted(KNOWN),
        "token_request_parameters": {
            "purpose_of_use": "space-separated v3 ActReason codes (IHE IUA)",
            "subject_id": "the user the client acts for",
            "subject_role": "the user's role, among those registered for the client",
            "break_glass_reason": "required with BTG or ETREAT",
        },
        "access_token_lifetime_seconds": auth.tokens.lifetime,
        "patient_token_endpoint": auth.token_url(request).rsplit("/", 1)[0] + "/patient-token",
    }


def build_router(gw: Gateway, auth: Authenticator) -> APIRouter:
    """The auth routes."""
    router = APIRouter()

    @router.get("/.well-known/smart-configuration")
    async def well_known(request: Request) -> Response:
        return JSONResponse(smart_configuration(auth, request))

    @router.post("/auth/token")
    async def token(request: Request) -> Response:
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/x-www-form-urlencoded":
                raise TokenRequestError("invalid_request", "send application/x-www-form-urlencoded")
            raw = await read_body(request, MAX_FORM_BYTES)
            try:
                form = dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
            except UnicodeDecodeError as exc:
                raise TokenRequestError("invalid_request", "the form is not UTF-8") from exc
            answer = await auth.tokens.issue(form, token_url=auth.token_url(request))
        except TokenRequestError as exc:
            auth.refused(exc)
            return _oauth_error(exc)
        return JSONResponse(answer, headers=_NO_STORE)

    @router.post("/auth/patient-token")
    async def patient_token(request: Request) -> Response:
        try:
            body = parse_json(await read_body(request, MAX_FORM_BYTES))
            ident = body.get("identifier") if isinstance(body, dict) else None
            system = ident.get("system") if isinstance(ident, dict) else None
            value = ident.get("value") if isinstance(ident, dict) else None
            master = gw.settings.master_id_system
            if system != master or not isinstance(value, str) or not value:
                raise TokenRequestError(
                    "invalid_request", f"identifier must name the master system {master}"
                )
            scope = body.get("scope") if isinstance(body.get("scope"), str) else ""
            pseudonym = patient_identity(
                gw.pseudonym_key,
                [(system, value)],
                master_system=master,
                facility=gw.settings.institution,
            ).pseudonym
            answer = auth.tokens.patient_token(request.state.caller, pseudonym, str(scope))
        except TokenRequestError as exc:
            auth.refused(exc)
            return _oauth_error(exc)
        return JSONResponse(answer, headers=_NO_STORE)

    return router
