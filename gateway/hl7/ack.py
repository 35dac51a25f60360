"""HL7 v2 acknowledgements (pure): ACK messages with MSA and ERR, original and enhanced mode.

:func:`read_header` reads what an ACK needs from the raw bytes of a message, tolerant of
garbage, so even a message the real parser rejects can be answered ``AR``. :func:`build_ack`
writes the ACK: MSH with sending and receiving application/facility swapped, MSA-2 echoing the
message's MSH-10, ERR segments locating the problem and any warnings (ERR-2 as ERL:
segment^sequence^field^repetition^component, ERR-3 the table 0357 code, ERR-4 the severity,
``E`` or ``W``), and for an accepted message a ``ZRC`` segment with its ledger receipt (see
:func:`zrc_segment`). ACKs never contain patient data: only codes, locations, fixed texts and
hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from mappings.errors import MappingError
from mappings.v2.parse import detect_charset

AckCode = Literal["AA", "AE", "AR", "CA", "CE", "CR"]
DEFAULT_VERSION = "2.5.1"
ACK_CONDITIONS = ("AL", "NE", "ER", "SU")  # HL7 table 0155
# Printable ASCII punctuation an HL7 v2 sender may use as separators.
_SEPARATOR_CHARS = frozenset("|^~\\&#!$%*+,-./:;=?@[]_`{}'\"")


class ErrorLike(Protocol):
    """What an ERR segment is built from (mappings.errors.MappingError and
    ConversionWarning have it); read only."""

    @property
    def hl7_code(self) -> str: ...
    @property
    def segment(self) -> str | None: ...
    @property
    def segment_index(self) -> int | None: ...
    @property
    def field(self) -> int | None: ...
    @property
    def component(self) -> int | None: ...
    @property
    def repetition(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where an accepted message's container is anchored: its leaf, the tree size and root of
    the checkpoint that covers it, and its ciphertext's block CID (and byte range in a pack)."""

    leaf_index: int
    tree_size: int
    root: bytes
    cid: str
    byte_range: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Header:
    """The MSH fields an ACK needs, as sent (escaped), plus the codec of MSH-18."""

    field_sep: str = "|"
    encoding: str = "^~\\&"
    sending_app: str = ""
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""
    event: str = ""
    control_id: str = ""
    processing_id: str = "P"
    version: str = DEFAULT_VERSION
    accept_ack_type: str = ""
    app_ack_type: str = ""
    charset: str = ""
    codec: str = "utf-8"

    @property
    def enhanced(self) -> bool:
        """Whether MSH-15/16 ask for enhanced acknowledgement mode."""
        return bool(self.accept_ack_type or self.app_ack_type)


def read_header(raw: bytes | None) -> Header:
    """Read MSH from raw bytes; whatever cannot be read is left at its default. Never raises."""
    if not raw:
        return Header()
    try:
        charset, codec = detect_charset(raw)
    except (MappingError, LookupError, ValueError):
        charset, codec = "", "utf-8"
    start = 0 if raw.startswith(b"MSH") else raw.find(b"MSH")
    if start < 0:
        return Header(codec=codec)
    line = raw[start:].split(b"\r", 1)[0].split(b"\n", 1)[0]
    try:
        text = line.decode(codec, errors="replace")
    except LookupError:
        text = line.decode("utf-8", errors="replace")
    if len(text) < 8:
        return Header(codec=codec)
    fs = text[3]
    if fs not in _SEPARATOR_CHARS:
        return Header(codec=codec)  # nothing can be echoed safely
    parts = text.split(fs)
    enc = parts[1] if len(parts) > 1 and 2 <= len(parts[1]) <= 5 else "^~\\&"
    if len(set(enc + fs)) != len(enc) + 1 or any(c not in _SEPARATOR_CHARS for c in enc):
        return Header(codec=codec)
    comp = enc[0] if enc else "^"

    def f(n: int) -> str:
        # MSH-n is parts[n - 1] because MSH-1 is the separator itself.
        return parts[n - 1] if len(parts) > n - 1 else ""

    msg_type = f(9).split(comp)
    return Header(
        field_sep=fs,
        encoding=enc,
        sending_app=f(3)[:227],
        sending_facility=f(4)[:227],
        receiving_app=f(5)[:227],
        receiving_facility=f(6)[:227],
        event=msg_type[1][:3] if len(msg_type) > 1 else "",
        control_id=f(10)[:199],
        processing_id=f(11)[:3] or "P",
        version=(f(12).split(comp)[0] or DEFAULT_VERSION)[:8],
        accept_ack_type=f(15)[:2],
        app_ack_type=f(16)[:2],
        charset=charset,
        codec=codec,
    )


def _clean(value: str, header: Header) -> str:
    """A text safe to put in one field: no separators, no segment breaks."""
    bad = set(header.field_sep + header.encoding + "\r\n")
    return "".join(" " if ch in bad else ch for ch in value)


def new_control_id(header: Header, now: datetime) -> str:
    """A control id for the ACK: unique per message and time, at most 20 characters."""
    digest = hashlib.sha256(f"{header.control_id}|{now.isoformat()}".encode()).hexdigest()
    return "ACK" + digest[:17]


def err_segment(error: ErrorLike, header: Header, text: str, severity: str = "E") -> str:
    """An ERR segment locating ``error`` (ERR-2 ERL, ERR-3 code, ERR-4 severity from HL7 table
    0516: ``E`` error, ``W`` warning, ``I`` information; ERR-8 text)."""
    fs, comp = header.field_sep, header.encoding[0]
    location = ""
    if error.segment:
        parts = [
            error.segment,
            str(error.segment_index or 1),
            str(error.field or ""),
            str(error.repetition or (1 if error.field else "")),
            str(error.component or ""),
        ]
        location = comp.join(parts).rstrip(comp)
    code = f"{error.hl7_code}{comp}{_clean(text, header)[:80]}{comp}HL70357"
    fields = ["ERR", "", location, code, severity, "", "", "", _clean(text, header)[:250]]
    return fs.join(fields)


def zrc_segment(receipt: Receipt, header: Header) -> str:
    """The ledger receipt segment: ``ZRC|leaf index|tree size|root hash (hex)|CID|offset^length``
    (ZRC-5 empty when the ciphertext is its whole block). ``GET /ledger/receipt?index=<ZRC-1>
    &tree_size=<ZRC-2>`` gives the inclusion proof against that root."""
    fs, comp = header.field_sep, header.encoding[0]
    span = "" if receipt.byte_range is None else comp.join(str(n) for n in receipt.byte_range)
    fields = [
        "ZRC",
        str(receipt.leaf_index),
        str(receipt.tree_size),
        receipt.root.hex(),
        receipt.cid,
        span,
    ]
    return fs.join(fields)


def build_ack(
    header: Header,
    *,
    code: AckCode,
    now: datetime,
    error: ErrorLike | None = None,
    text: str = "",
    gateway_app: str = "ALLIANCE-GW",
    gateway_facility: str = "",
    warnings: Sequence[tuple[ErrorLike, str]] = (),
    receipt: Receipt | None = None,
) -> bytes:
    """The ACK for a message whose header is ``header``, encoded in the message's charset:
    MSH, MSA, an ERR of severity E for ``error``, one of severity W per (warning, text) and
    the ``ZRC`` receipt segment when ``receipt`` is given. Raises nothing."""
    fs, comp = header.field_sep, header.encoding[0]
    stamp = now.strftime("%Y%m%d%H%M%S") + now.strftime("%z")
    msh = [
        "MSH",
        header.encoding,
        header.receiving_app or gateway_app,
        header.receiving_facility or gateway_facility,
        header.sending_app,
        header.sending_facility,
        stamp,
        "",
        comp.join(["ACK", header.event, "ACK"]) if header.event else comp.join(["ACK", "", "ACK"]),
        new_control_id(header, now),
        header.processing_id,
        header.version,
    ]
    if header.charset:
        msh += ["", "", "", "", "", header.charset]
    segments = [fs.join(msh), fs.join(["MSA", code, header.control_id])]
    if error is not None:
        segments.append(err_segment(error, header, text or code))
    segments += [err_segment(w, header, wtext, "W") for w, wtext in warnings]
    if receipt is not None:
        segments.append(zrc_segment(receipt, header))
    body = "\r".join(segments) + "\r"
    try:
        return body.encode(header.codec, errors="replace")
    except LookupError:
        return body.encode("utf-8")


def acks_to_send(header: Header, outcome: Literal["accept", "error", "reject"]) -> list[AckCode]:
    """Which acknowledgements answer a message on its connection.

    Original mode (MSH-15 and MSH-16 empty): one application ACK, AA / AE / AR.
    Enhanced mode: a commit ACK (CA / CE / CR) when MSH-15 asks for one (AL always, ER on
    error, SU on success), then the application ACK when MSH-16 asks for one likewise. A value
    outside table 0155, or an empty one beside a valued one, counts as AL: only an explicit
    ``NE`` in both fields means no answer at all. The
    gateway commits (CA) only once the message is durably stored, so both come together.
    """
    app_code: AckCode = {"accept": "AA", "error": "AE", "reject": "AR"}[outcome]  # type: ignore[assignment]
    if not header.enhanced:
        return [app_code]
    commit_code: AckCode = {"accept": "CA", "error": "CE", "reject": "CR"}[outcome]  # type: ignore[assignment]

    def wanted(kind: str) -> bool:
        if kind not in ACK_CONDITIONS:
            kind = "AL"  # a value outside HL7 table 0155: answer rather than stay silent
        return (
            kind == "AL"
            or (kind == "ER" and outcome != "accept")
            or (kind == "SU" and outcome == "accept")
        )

    out: list[AckCode] = []
    if wanted(header.accept_ack_type or "AL"):
        out.append(commit_code)
    if wanted(header.app_ack_type or "AL"):
        out.append(app_code)
    return out
