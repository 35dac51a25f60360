"""Purpose of use (HL7 v3 ActReason), bound to the token as IHE IUA does. Pure.

A token request names purposes; the token carries those also registered for the client. Each
request selects one of the token's purposes with the ``X-Purpose-Of-Use`` header (a token with
one purpose needs none). ``BTG`` (break the glass) and ``ETREAT`` (emergency treatment) are
granted only to clients registered for break-glass and only with a stated reason.

Raises :class:`gateway.auth.errors.ForbiddenError` for a purpose the token lacks.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.auth.errors import ForbiddenError

#: The ActReason codes this gateway knows (v3-ActReason / v3-PurposeOfUse).
KNOWN = frozenset(
    {
        "TREAT",
        "ETREAT",
        "BTG",
        "HPAYMT",
        "HOPERAT",
        "HRESCH",
        "PUBHLTH",
        "HLEGAL",
        "HSYSADMIN",
        "PATRQT",
        "CAREMGT",
        "HQUALIMP",
    }
)
#: Purposes that break the glass: need a registered client and a stated reason.
EMERGENCY = frozenset({"BTG", "ETREAT"})
#: What a patient token carries: the patient asking for their own data.
PATIENT_PURPOSE = "PATRQT"
HEADER = "x-purpose-of-use"


def parse_purposes(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """Purpose codes from a space- or comma-separated string (order kept, duplicates dropped);
    unknown codes are kept so that the caller can refuse them by name."""
    if text is None:
        return ()
    items = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    return tuple(dict.fromkeys(p.strip().upper() for p in items if p.strip()))


def select_purpose(granted: tuple[str, ...], header: str | None) -> str | None:
    """The purpose of this request: the header's, which must be one of ``granted``; without a
    header the token's only purpose, or None when it has several (or none).

    Raises ForbiddenError (reason ``purpose``) when the header names a purpose not granted.
    """
    if header is None or not header.strip():
        return granted[0] if len(granted) == 1 else None
    wanted = header.strip().upper()
    if wanted not in granted:
        raise ForbiddenError(
            f"purpose of use {wanted} is not among the token's ({' '.join(granted) or 'none'})",
            reason="purpose",
        )
    return wanted
