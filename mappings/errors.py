"""Exceptions of the ``mappings`` package.

Every error raised while decoding, parsing or converting an HL7 v2 message is a
:class:`MappingError`. It carries what an acknowledgement needs: the HL7 error code
(table 0357), the acknowledgement code it calls for (``AR`` for messages that cannot be
parsed or are not supported, ``AE`` for well-formed messages whose content cannot be
processed) and the location of the problem (segment, occurrence, field, component,
repetition). Messages name locations and field names only, never patient data.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConversionWarning",
    "MappingError",
    "MessageContentError",
    "ParseError",
    "UnsupportedMessageError",
]


class MappingError(Exception):
    """Root of every error raised by :mod:`mappings`.

    Attributes mirror the HL7 ``ERR`` segment: ``hl7_code`` (table 0357), ``severity``
    (``"E"``), ``ack_code`` (``"AE"`` or ``"AR"``) and the location ``segment``,
    ``segment_index`` (1-based occurrence of that segment), ``field``, ``component`` and
    ``repetition`` (1-based where known, ``None`` otherwise), and the message's
    ``control_id`` (MSH-10) when it was known.
    """

    default_code = "207"
    ack_code = "AE"
    severity = "E"

    def __init__(
        self,
        message: str,
        *,
        hl7_code: str | None = None,
        segment: str | None = None,
        segment_index: int | None = None,
        field: int | None = None,
        component: int | None = None,
        repetition: int | None = None,
        control_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.control_id = control_id
        self.message = message
        self.hl7_code = hl7_code or self.default_code
        self.segment = segment
        self.segment_index = segment_index
        self.field = field
        self.component = component
        self.repetition = repetition

    def locate(
        self,
        segment: str | None,
        segment_index: int | None = None,
        field: int | None = None,
        component: int | None = None,
        repetition: int | None = None,
    ) -> MappingError:
        """Fill in the parts of the location that are not known yet; return ``self``."""
        if self.segment is None:
            self.segment = segment
            self.segment_index = segment_index
        if self.field is None:
            self.field = field
        if self.component is None:
            self.component = component
        if self.repetition is None:
            self.repetition = repetition
        return self

    @property
    def location(self) -> str:
        """Human-readable location such as ``PID[1]-3.4`` (empty when unknown)."""
        if self.segment is None:
            return ""
        out = self.segment
        if self.segment_index is not None:
            out += f"[{self.segment_index}]"
        if self.field is not None:
            out += f"-{self.field}"
            if self.repetition is not None and self.repetition > 1:
                out += f"({self.repetition})"
            if self.component is not None:
                out += f".{self.component}"
        return out

    def __str__(self) -> str:
        loc = self.location
        return (
            f"{self.message} (at {loc}, HL7 {self.hl7_code})"
            if loc
            else (f"{self.message} (HL7 {self.hl7_code})")
        )


class ParseError(MappingError):
    """The message cannot be decoded or parsed (acknowledged ``AR``)."""

    default_code = "102"
    ack_code = "AR"


class UnsupportedMessageError(MappingError):
    """Unsupported message type (200), event (201), processing id (202) or version (203).

    Acknowledged ``AR``.
    """

    default_code = "200"
    ack_code = "AR"


class MessageContentError(MappingError):
    """Well-formed message whose content cannot be converted (acknowledged ``AE``).

    For example no patient identifier, a required field missing (101), a value of the wrong
    data type (102), or a code the mapping policy rejects (103).
    """

    default_code = "101"
    ack_code = "AE"


@dataclass(frozen=True, slots=True)
class ConversionWarning:
    """A value the conversion kept rather than rejected, for an ERR of severity ``W`` in the
    acknowledgement: the HL7 code (table 0357), a fixed ``text`` and the location (as in
    :class:`MappingError`). Never carries the value itself."""

    hl7_code: str
    text: str
    segment: str | None = None
    segment_index: int | None = None
    field: int | None = None
    component: int | None = None
    repetition: int | None = None
