"""Entry point of the HL7 v2 -> FHIR R4 conversion: checks the message header and
dispatches to one module per message family.

Supported: ADT^A01/A03/A04/A08/A28/A31/A40, ORU^R01, ORM^O01, OML^O21, OMI^O23, MDM^T02
(and T04/T08/T10 carrying a document), SIU^S12, for versions 2.3 to 2.8 and processing ids
P, T and D. Resources are FHIR R4 JSON dicts with stable ids and relative references.

Raises :class:`mappings.errors.UnsupportedMessageError` (200 message type, 201 event, 202
processing id, 203 version), :class:`mappings.errors.ParseError` (101 for a missing MSH-9
or MSH-10) and :class:`mappings.errors.MessageContentError` for content problems. Any
other exception escaping a converter is a bug; it is reported as MappingError 207.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mappings.errors import MappingError, ParseError, UnsupportedMessageError
from mappings.v2.adt import EVENTS as ADT_EVENTS
from mappings.v2.adt import convert_adt
from mappings.v2.common import Context, ConversionOptions, ConversionResult
from mappings.v2.mdm import EVENTS as MDM_EVENTS
from mappings.v2.mdm import convert_mdm
from mappings.v2.orm import convert_orm
from mappings.v2.oru import convert_oru
from mappings.v2.parse import ParsedMessage
from mappings.v2.siu import convert_siu

__all__ = ["SUPPORTED", "ConversionOptions", "ConversionResult", "check_header", "convert"]

log = logging.getLogger(__name__)

Converter = Callable[[Context], None]

#: message code -> event -> converter
SUPPORTED: dict[str, dict[str, Converter]] = {
    "ADT": dict.fromkeys(ADT_EVENTS, convert_adt),
    "ORU": {"R01": convert_oru},
    "ORM": {"O01": convert_orm},
    "OML": {"O21": convert_orm},
    "OMI": {"O23": convert_orm},
    "MDM": dict.fromkeys(MDM_EVENTS, convert_mdm),
    "SIU": {"S12": convert_siu},
}
SUPPORTED_VERSIONS = ("2.3", "2.4", "2.5", "2.6", "2.7", "2.8")
SUPPORTED_PROCESSING = frozenset({"P", "T", "D"})


def check_header(msg: ParsedMessage) -> Converter:
    """Validate MSH-9/10/11/12 and return the converter for the message.

    Raises ParseError (101) for a missing MSH-9 or MSH-10, UnsupportedMessageError
    200/201/202/203.
    """
    cid = msg.control_id or None
    if not msg.message_code:
        raise ParseError(
            "required field message type (MSH-9) is missing",
            hl7_code="101",
            segment="MSH",
            segment_index=1,
            field=9,
            control_id=cid,
        )
    if not msg.control_id:
        raise ParseError(
            "required field message control id (MSH-10) is missing",
            hl7_code="101",
            segment="MSH",
            segment_index=1,
            field=10,
        )
    version = msg.version
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VERSIONS):
        raise UnsupportedMessageError(
            "unsupported HL7 version",
            hl7_code="203",
            segment="MSH",
            segment_index=1,
            field=12,
            control_id=cid,
        )
    if msg.processing_id.upper() not in SUPPORTED_PROCESSING:
        raise UnsupportedMessageError(
            "unsupported processing id",
            hl7_code="202",
            segment="MSH",
            segment_index=1,
            field=11,
            control_id=cid,
        )
    family = SUPPORTED.get(msg.message_code)
    if family is None:
        raise UnsupportedMessageError(
            "unsupported message type",
            hl7_code="200",
            segment="MSH",
            segment_index=1,
            field=9,
            component=1,
            control_id=cid,
        )
    converter = family.get(msg.event)
    if converter is None:
        raise UnsupportedMessageError(
            "unsupported trigger event",
            hl7_code="201",
            segment="MSH",
            segment_index=1,
            field=9,
            component=2,
            control_id=cid,
        )
    return converter


def convert(
    msg: ParsedMessage,
    *,
    options: ConversionOptions,
    strict_types: bool | None = None,
    strict_codes: bool | None = None,
) -> ConversionResult:
    """Convert a parsed message to FHIR R4 resources (pure; no I/O, no clock).

    ``strict_types`` (default: ``options.strict_types``) rejects a value that does not fit
    its type instead of keeping it as text with a warning (``ConversionResult.warnings``).
    ``strict_codes`` (default: ``options.strict_codes``) rejects (103) a local clinical code
    the dictionary cannot map instead of keeping it as sent (``ConversionResult.unmapped``).
    Raises MappingError subclasses (see the module docstring); every error carries the
    message control id.
    """
    converter = check_header(msg)
    try:
        ctx = Context(msg, options, strict_types, strict_codes)
        converter(ctx)
        return ctx.result()
    except MappingError as exc:
        if exc.control_id is None:
            exc.control_id = msg.control_id
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        log.exception("conversion bug on message type %s", msg.message_type)
        raise MappingError(
            "internal error while converting the message",
            hl7_code="207",
            control_id=msg.control_id,
        ) from exc
