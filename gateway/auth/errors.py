"""Errors of the authentication package: one root, two outcomes.

:class:`AuthenticationError` means the caller is not known (HTTP 401 with a
``WWW-Authenticate: Bearer`` challenge); :class:`ForbiddenError` means a known caller may not do
this (HTTP 403). Both carry a short machine ``reason`` (the label of the refusal counter in
``/metrics``) and a message that names the client, the scope or the route, never a patient.
:class:`TokenRequestError` is an OAuth 2.0 token endpoint error (RFC 6749 section 5.2).
"""

from __future__ import annotations

from gateway.errors import GatewayError


class AuthError(GatewayError):
    """Root of every authentication and authorisation error. ``reason`` labels the metric."""

    status = 403

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class AuthenticationError(AuthError):
    """No valid credentials: missing, malformed, expired, wrong audience, revoked (HTTP 401)."""

    status = 401


class ForbiddenError(AuthError):
    """A known caller lacks the scope, purpose, institution or patient for this (HTTP 403)."""

    status = 403


class TokenRequestError(AuthError):
    """A refused token request: ``error`` is the OAuth 2.0 error code, ``status`` 400 or 401."""

    def __init__(self, error: str, message: str, *, status: int = 400) -> None:
        super().__init__(message, reason=f"token-{error}")
        self.error = error
        self.status = status


class RegistryError(AuthError):
    """The client registry cannot be read or written, or a registration is invalid (HTTP 503
    when met while serving: nobody can be checked until it is fixed)."""

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="registry")
