"""Who is calling: the one outcome of authentication, free of any web framework type.

The HTTP guard stores it on ``request.state.caller``; the MLLP listener builds one per
connection; the record service's access check takes it. Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.auth.scopes import Scope

CallerKind = Literal["system", "patient", "local"]


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller.

    ``kind``: ``system`` (a registered client: HIS, LIS, PACS, portal, another gateway),
    ``patient`` (a patient token: ``patient`` is their pseudonym), ``local`` (the loopback MLLP
    sender of the embedded profile and tests). ``purposes`` are those the token grants,
    ``purpose`` the one selected for this request (None when none was selected). ``user`` and
    ``role`` name the person a system acts for (IHE IUA ``subject_id``, ``subject_role``).
    ``gateway`` is true for another member's gateway (the witness endpoint); ``dev`` for a
    ``gateway dev-token`` token (embedded profile only).
    """

    client_id: str
    institution: str
    kind: CallerKind
    scopes: tuple[Scope, ...] = ()
    purposes: tuple[str, ...] = ()
    purpose: str | None = None
    patient: str | None = None
    user: str | None = None
    role: str | None = None
    break_glass: str | None = None
    jti: str = ""
    gateway: bool = False
    expires_at: float = 0.0
    dev: bool = False

    def allows(self, resource_type: str, permission: str, *, unconstrained: bool = True) -> bool:
        """True when a scope of the caller's context grants ``permission`` on
        ``resource_type``; with ``unconstrained``, only scopes without parameters count."""
        context = "patient" if self.kind == "patient" else None
        for scope in self.scopes:
            if unconstrained and scope.params:
                continue
            if context is None and scope.context == "patient":
                continue
            if scope.allows(resource_type, permission, context=context):
                return True
        return False
