"""Dev tokens: ``gateway dev-token`` for the embedded profile, the demo and the tests.

A dev token is an access token signed with the gateway's token key (so it needs the gateway's
data directory), marked ``dev``: the production profile refuses it. It can stand for a system
client of this or of another member institution (no registration needed), or for a patient
(``patient``: the patient's master identifier value, turned into their pseudonym as every input
path does). Raises ConfigurationError on the production profile, ScopeError for a bad scope.
"""

from __future__ import annotations

from gateway.auth.guard import issuer_of, token_key
from gateway.auth.purposes import PATIENT_PURPOSE, parse_purposes
from gateway.auth.registry import ClientRegistry, registry_path
from gateway.auth.scopes import parse_scopes
from gateway.auth.tokens import TokenService
from gateway.backends.state_memory import MemoryStateStore
from gateway.config import Settings
from gateway.errors import ConfigurationError
from gateway.identity import patient_identity


def dev_token(
    settings: Settings,
    *,
    client_id: str,
    scope: str,
    patient: str | None = None,
    institution: str | None = None,
    purpose: str | None = None,
    gateway: bool = False,
) -> str:
    """A dev access token for the gateway of ``settings``. ``purpose``: space- or
    comma-separated purposes (default TREAT; a patient token always has PATRQT).

    Raises ConfigurationError (production profile), ScopeError.
    """
    if settings.profile == "production":
        raise ConfigurationError("the production profile refuses dev tokens")
    service = TokenService(
        key=token_key(settings),
        issuer=issuer_of(settings),
        institution=settings.institution,
        registry=ClientRegistry(registry_path(settings.data_dir)),
        state=MemoryStateStore(),
        lifetime=settings.token_lifetime,
    )
    scopes = parse_scopes(scope)
    pseudonym = None
    if patient is not None:
        from gateway.runtime import load_secrets

        key, _master = load_secrets(settings)
        pseudonym = patient_identity(
            key,
            [(settings.master_id_system, patient)],
            master_system=settings.master_id_system,
            facility=settings.institution,
        ).pseudonym
    purposes = (PATIENT_PURPOSE,) if pseudonym is not None else parse_purposes(purpose or "TREAT")
    token, _exp = service.mint(
        client_id=client_id,
        institution=institution or settings.institution,
        kind="patient" if pseudonym is not None else "system",
        scopes=scopes,
        purposes=purposes,
        patient=pseudonym,
        gateway=gateway,
        dev=True,
    )
    return token
