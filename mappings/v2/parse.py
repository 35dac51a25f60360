"""Decoding and parsing of HL7 v2 (ER7) messages: bytes in, :class:`ParsedMessage` out.

A small splitter of our own (faster than python-hl7 and hl7apy, and it keeps the
distinction HL7 makes between a field not sent (empty) and an explicit null (``""``)).
Values are split first and unescaped afterwards, lazily, when a converter asks for them:
``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (and ``\\P\\`` of v2.7), ``\\Xhh..\\`` in the message's
character set, ``\\.br\\`` as a line break; highlighting and other formatting escapes are
dropped, unknown escapes kept as sent.

Raises :class:`mappings.errors.ParseError` (acknowledged ``AR``) for bytes that are not a
message in a supported character set, a malformed MSH, or invalid segment names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mappings.errors import MappingError, ParseError

__all__ = [
    "CHARSETS",
    "Encoding",
    "ParsedMessage",
    "Rep",
    "Segment",
    "comp",
    "comps",
    "decode",
    "detect_charset",
    "parse",
    "split_batch",
]

#: MSH-18 values (HL7 table 0211, upper-cased, spaces kept) -> Python codec.
CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "ISO IR192": "utf-8",
    "8859/1": "latin-1",
    "ISO IR100": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "GB 18030-2000": "gb18030",
    "GB18030": "gb18030",
    "GB 18030": "gb18030",
    "GB18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc_kr",
}

_DEFAULT_CODEC = "utf-8"
_SEGMENT_NAME = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
_BATCH_SEGMENTS = frozenset({"FHS", "BHS", "BTS", "FTS"})

#: One decoded repetition of a field: components, each a list of subcomponents.
Rep = list[list[str]]


def comp(rep: Rep | None, index: int, sub: int = 1) -> str:
    """Component ``index`` (1-based), subcomponent ``sub`` of a repetition, or ``""``."""
    if rep is None or index > len(rep):
        return ""
    subs = rep[index - 1]
    return subs[sub - 1] if sub <= len(subs) else ""


def comps(rep: Rep | None, count: int) -> list[str]:
    """Subcomponent 1 of components 1..``count`` of a repetition, padded with ``""``.

    ``comps(rep, 3)`` is ``[comp(rep, 1), comp(rep, 2), comp(rep, 3)]`` in one call, for
    unpacking a data type's components.
    """
    if rep is None:
        return [""] * count
    out = [subs[0] if subs else "" for subs in rep[:count]]
    if len(out) < count:
        out += [""] * (count - len(out))
    return out


@dataclass(frozen=True, slots=True)
class Encoding:
    """Delimiters from MSH-1/MSH-2 and the codec the message was decoded with."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""
    codec: str = _DEFAULT_CODEC

    @property
    def characters(self) -> str:
        """MSH-2 as sent (component, repetition, escape, subcomponent, truncation)."""
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation

    def unescape(self, value: str) -> str:
        """Resolve escape sequences in one split value.

        Raises ParseError (102) for a malformed ``\\X..\\`` hexadecimal escape.
        """
        esc = self.escape
        if not esc or esc not in value:
            return value
        out: list[str] = []
        pos = 0
        while True:
            start = value.find(esc, pos)
            if start < 0:
                out.append(value[pos:])
                break
            end = value.find(esc, start + 1)
            if end < 0:
                out.append(value[pos:])
                break
            out.append(value[pos:start])
            out.append(self._escape_sequence(value[start + 1 : end], value[start : end + 1]))
            pos = end + 1
        return "".join(out)

    def _escape_sequence(self, code: str, literal: str) -> str:
        simple = {
            "F": self.field,
            "S": self.component,
            "T": self.subcomponent,
            "R": self.repetition,
            "E": self.escape,
            "P": self.truncation,
        }
        if code in simple:
            return simple[code]
        if code[:1] == "X":
            hexdigits = code[1:]
            try:
                return bytes.fromhex(hexdigits).decode(self.codec)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ParseError("malformed hexadecimal escape sequence") from exc
        if code in (".br", ".sp") or code.startswith(".sp "):
            return "\n"
        if code in ("H", "N") or code[:1] in ("C", "M") or code[:1] == ".":
            return ""
        return literal


class Segment:
    """One segment: ``fields[n]`` is field ``n`` as sent (escaped); ``fields[0]`` the name.

    For MSH, ``fields[1]`` is the field separator and ``fields[2]`` the encoding characters,
    so MSH-n is ``fields[n]`` as for every other segment.
    """

    __slots__ = ("enc", "fields", "index", "name", "position")

    def __init__(
        self, name: str, fields: list[str], enc: Encoding, index: int, position: int
    ) -> None:
        self.name = name
        self.fields = fields
        self.enc = enc
        self.index = index  # 1-based occurrence of this segment name in the message
        self.position = position  # 1-based position among all segments

    def __repr__(self) -> str:
        return f"Segment({self.name}[{self.index}], {len(self.fields) - 1} fields)"

    def raw(self, n: int) -> str:
        """Field ``n`` exactly as sent (still escaped); ``""`` when absent."""
        return self.fields[n] if n < len(self.fields) else ""

    def is_null(self, n: int) -> bool:
        """True when field ``n`` is the explicit null ``""``."""
        return n < len(self.fields) and self.fields[n] == '""'

    def present(self, n: int) -> bool:
        """True when field ``n`` carries a value (neither empty nor ``""``)."""
        return n < len(self.fields) and self.fields[n] not in ("", '""')

    def value(self, n: int, component: int = 1, sub: int = 1, repetition: int = 1) -> str | None:
        """Decoded value of one (sub)component: ``None`` if not sent, ``""`` if explicit null."""
        if n >= len(self.fields):
            return None
        raw = self.fields[n]
        if raw == "":
            return None
        if raw == '""':
            return ""
        if self.name == "MSH" and n <= 2:
            return raw
        enc = self.enc
        reps = raw.split(enc.repetition) if enc.repetition in raw else [raw]
        if repetition > len(reps):
            return None
        part = reps[repetition - 1]
        comps = part.split(enc.component) if enc.component in part else [part]
        if component > len(comps):
            return None
        part = comps[component - 1]
        if enc.subcomponent and enc.subcomponent in part:
            subs = part.split(enc.subcomponent)
            if sub > len(subs):
                return None
            part = subs[sub - 1]
        elif sub > 1:
            return None
        if part == "":
            return None
        if part == '""':
            return ""
        return enc.unescape(part)

    def text(self, n: int, component: int = 1, sub: int = 1) -> str:
        """Like :meth:`value` for the first repetition, with not-sent and null both ``""``."""
        # The hottest accessor of the converters: value() inlined for repetition 1.
        fields = self.fields
        if n >= len(fields):
            return ""
        part = fields[n]
        if part == "" or part == '""':
            return ""
        if n <= 2 and self.name == "MSH":
            return part
        enc = self.enc
        part = part.partition(enc.repetition)[0]
        if component == 1:
            part = part.partition(enc.component)[0]
        else:
            comps = part.split(enc.component)
            if component > len(comps):
                return ""
            part = comps[component - 1]
        if enc.subcomponent and enc.subcomponent in part:
            subs = part.split(enc.subcomponent)
            if sub > len(subs):
                return ""
            part = subs[sub - 1]
        elif sub > 1:
            return ""
        if part == "" or part == '""':
            return ""
        escape = enc.escape
        return enc.unescape(part) if escape and escape in part else part

    def reps(self, n: int) -> list[Rep]:
        """All repetitions of field ``n``, decoded; ``[]`` when absent or explicit null.

        Components or subcomponents sent as ``""`` come back as ``""`` (absent).
        Raises ParseError (102) for a malformed escape sequence.
        """
        if n >= len(self.fields):
            return []
        raw = self.fields[n]
        if raw == "" or raw == '""':
            return []
        enc = self.enc
        component, subcomponent = enc.component, enc.subcomponent
        out: list[Rep] = []
        if (not enc.escape or enc.escape not in raw) and '""' not in raw:
            # Fast path, the usual case: nothing to unescape, no explicit nulls.
            for part in raw.split(enc.repetition):
                if part == "":
                    continue
                if subcomponent and subcomponent in part:
                    out.append([c.split(subcomponent) for c in part.split(component)])
                else:
                    out.append([[c] for c in part.split(component)])
            return out
        unescape = enc.unescape
        for part in raw.split(enc.repetition):
            if part == "":
                continue
            rep: Rep = []
            for c in part.split(component):
                if subcomponent and subcomponent in c:
                    rep.append([unescape(s) if s != '""' else "" for s in c.split(subcomponent)])
                else:
                    rep.append([unescape(c) if c != '""' else ""])
            out.append(rep)
        return out

    def rep(self, n: int) -> Rep | None:
        """First repetition of field ``n`` (see :meth:`reps`), or ``None``.

        Raises ParseError (102) for a malformed escape sequence in any repetition.
        """
        fields = self.fields
        if n >= len(fields):
            return None
        raw = fields[n]
        enc = self.enc
        first = raw.partition(enc.repetition)[0]
        if first == "" or (enc.escape and enc.escape in raw) or '""' in raw:
            reps = self.reps(n)  # empty, escaped or null parts: the general case
            return reps[0] if reps else None
        subcomponent = enc.subcomponent
        if subcomponent and subcomponent in first:
            return [c.split(subcomponent) for c in first.split(enc.component)]
        return [[c] for c in first.split(enc.component)]


class ParsedMessage:
    """A parsed message: its segments plus fast access to the MSH fields.

    ``sending_app``, ``sending_facility``, ``receiving_app`` and ``receiving_facility`` are the
    fields as sent (escaped, in this message's encoding characters) so an ACK can echo them;
    ``sending_facility_id`` is the decoded identifier of MSH-4 (HD.1, else HD.2).
    """

    __slots__ = (
        "_by_name",
        "accept_ack_type",
        "app_ack_type",
        "charset",
        "control_id",
        "encoding",
        "event",
        "message_code",
        "msh",
        "processing_id",
        "receiving_app",
        "receiving_facility",
        "segments",
        "sending_app",
        "sending_facility",
        "sending_facility_id",
        "structure",
        "text",
        "version",
    )

    def __init__(self, text: str, segments: list[Segment], encoding: Encoding) -> None:
        self.text = text
        self.segments = segments
        self.encoding = encoding
        msh = segments[0]
        self.msh = msh
        self._by_name: dict[str, list[Segment]] = {}
        for seg in segments:
            self._by_name.setdefault(seg.name, []).append(seg)
        self.sending_app = msh.raw(3)
        self.sending_facility = msh.raw(4)
        self.receiving_app = msh.raw(5)
        self.receiving_facility = msh.raw(6)
        self.sending_facility_id = msh.text(4, 1) or msh.text(4, 2)
        self.message_code = msh.text(9, 1).upper()
        self.event = msh.text(9, 2).upper()
        self.structure = msh.text(9, 3).upper()
        self.control_id = msh.text(10)
        self.processing_id = msh.text(11, 1)
        self.version = msh.text(12, 1)
        self.accept_ack_type = msh.text(15)
        self.app_ack_type = msh.text(16)
        self.charset = msh.text(18)

    @property
    def message_type(self) -> str:
        """``MSH-9.1^MSH-9.2``, for example ``ORU^R01``."""
        return f"{self.message_code}^{self.event}" if self.event else self.message_code

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as sent."""
        return self.encoding.characters

    def all(self, name: str) -> list[Segment]:
        """Every segment with this name, in message order."""
        return self._by_name.get(name, [])

    def first(self, name: str) -> Segment | None:
        """The first segment with this name, or ``None``."""
        found = self._by_name.get(name)
        return found[0] if found else None

    def __repr__(self) -> str:
        return f"ParsedMessage({self.message_type}, {len(self.segments)} segments)"


def _normalise_charset(name: str) -> str:
    return " ".join(name.upper().split())


def detect_charset(raw: bytes) -> tuple[str, str]:
    """Return (MSH-18 as sent, Python codec) read from the raw bytes of the first MSH.

    An empty MSH-18 means UTF-8. Raises ParseError: no MSH segment (100), an unsupported
    character set (103, at MSH-18).
    """
    if raw.startswith(b"MSH"):
        start = 0
    else:
        start = -1
        for sep in (b"\rMSH", b"\nMSH"):
            found = raw.find(sep)
            if found >= 0 and (start < 0 or found + 1 < start):
                start = found + 1
        if start < 0:
            raise ParseError("no MSH segment found", hl7_code="100", segment="MSH")
    end = len(raw)
    for sep in (b"\r", b"\n"):
        found = raw.find(sep, start)
        if 0 <= found < end:
            end = found
    header = raw[start:end]
    if len(header) < 8:
        raise ParseError("MSH segment is truncated", hl7_code="100", segment="MSH", segment_index=1)
    fs = header[3:4]
    parts = header.split(fs)
    if len(parts) < 18:
        return "", _DEFAULT_CODEC
    enc = parts[1]
    rep = enc[1:2] or b"~"
    declared_bytes = parts[17].split(rep)[0]
    try:
        declared = declared_bytes.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ParseError(
            "MSH-18 character set is not ASCII", segment="MSH", segment_index=1, field=18
        ) from exc
    if not declared:
        return "", _DEFAULT_CODEC
    codec = CHARSETS.get(_normalise_charset(declared))
    if codec is None:
        raise ParseError(
            "unsupported character set in MSH-18",
            hl7_code="103",
            segment="MSH",
            segment_index=1,
            field=18,
        )
    return declared, codec


def decode(raw: bytes) -> str:
    """Decode a message (or batch) honouring MSH-18 of its first MSH; default UTF-8.

    Raises ParseError: no MSH (100), unsupported MSH-18 (103), bytes that are not valid in
    the declared character set (102, locating the segment where decoding failed).
    """
    return _decode(raw)[0]


def _decode(raw: bytes) -> tuple[str, str]:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    _declared, codec = detect_charset(raw)
    try:
        return raw.decode(codec), codec
    except UnicodeDecodeError as exc:
        line_start = max(raw.rfind(b"\r", 0, exc.start), raw.rfind(b"\n", 0, exc.start)) + 1
        name = raw[line_start : line_start + 3].decode("ascii", "replace")
        raise ParseError(
            f"bytes at offset {exc.start} are not valid {codec}",
            hl7_code="102",
            segment=name if _SEGMENT_NAME.match(name) else None,
        ) from exc


def _split_lines(text: str) -> list[str]:
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return [line for line in text.split("\r") if line.strip()]


def _encoding(header: str, codec: str) -> Encoding:
    if len(header) < 8 or header[:3] != "MSH":
        raise ParseError("message does not start with MSH", hl7_code="100", segment="MSH")
    fs = header[3]
    end = header.find(fs, 4)
    chars = header[4:end] if end >= 0 else header[4:]
    if (
        not 2 <= len(chars) <= 5
        or fs.isalnum()
        or fs.isspace()
        or len(set(chars + fs)) != len(chars) + 1
        or any(c.isalnum() or c.isspace() for c in chars)
    ):
        raise ParseError(
            "invalid MSH-1/MSH-2 encoding characters",
            hl7_code="102",
            segment="MSH",
            segment_index=1,
            field=2,
        )
    return Encoding(
        field=fs,
        component=chars[0],
        repetition=chars[1],
        escape=chars[2] if len(chars) > 2 else "",
        subcomponent=chars[3] if len(chars) > 3 else "",
        truncation=chars[4] if len(chars) > 4 else "",
        codec=codec,
    )


def parse_header(raw: bytes) -> ParsedMessage:
    """Parse only the first segment (MSH) of a message: its control id, sending facility and
    the rest of the header, as :func:`parse` reads them, at a fraction of the cost for a long
    message. Segment terminators are single bytes in every supported character set, so the
    first one ends MSH. Raises ParseError as :func:`parse` does for the header.
    """
    cr, lf = raw.find(b"\r"), raw.find(b"\n")
    ends = [i for i in (cr, lf) if i >= 0]
    return parse(raw[: min(ends)] if ends else raw)


def parse(raw: bytes | str) -> ParsedMessage:
    """Parse one message (bytes are decoded with :func:`decode`; ``str`` is taken as decoded).

    Accepts ``\\r``, ``\\n`` or ``\\r\\n`` as segment terminators. Raises ParseError: a
    message not starting with MSH or with invalid encoding characters, a segment with an
    invalid name (100), undecodable bytes (102), unsupported MSH-18 (103).
    """
    if isinstance(raw, bytes):
        text, codec = _decode(raw)
    else:
        text = raw.removeprefix("\ufeff")
        codec = _DEFAULT_CODEC
    lines = _split_lines(text)
    if not lines:
        raise ParseError("empty message", hl7_code="100", segment="MSH")
    enc = _encoding(lines[0], codec)
    fs = enc.field
    segments: list[Segment] = []
    counts: dict[str, int] = {}
    control_id: str | None = None
    for position, line in enumerate(lines, 1):
        name = line[:3]
        if not _SEGMENT_NAME.match(name) or (len(line) > 3 and line[3] != fs):
            raise ParseError(
                f"segment {position} has an invalid segment name",
                hl7_code="100",
                control_id=control_id,
            )
        if name == "MSH":
            if position != 1:
                raise ParseError(
                    "a second MSH segment: use split_batch for batches",
                    hl7_code="100",
                    segment="MSH",
                    segment_index=2,
                    control_id=control_id,
                )
            parts = line.split(fs)
            fields = ["MSH", fs, *parts[1:]]
        else:
            fields = line.split(fs)
        index = counts.get(name, 0) + 1
        counts[name] = index
        segments.append(Segment(name, fields, enc, index, position))
        if position == 1:
            control_id = segments[0].raw(10)
    try:
        return ParsedMessage(text, segments, enc)
    except MappingError as exc:
        raise exc.locate("MSH", 1) from None


def split_batch(text: str) -> list[str]:
    """Split a decoded batch (FHS/BHS ... BTS/FTS) into messages, each ``\\r``-terminated.

    A text without batch segments is returned as one message. Raises ParseError (100) for
    content before the first MSH that is not a batch header, or when a BTS-1 message count
    disagrees with the messages in its batch.
    """
    lines = _split_lines(text.removeprefix("\ufeff"))
    messages: list[list[str]] = []
    in_batch = 0
    bts_index = 0
    for line in lines:
        name = line[:3]
        if name in _BATCH_SEGMENTS:
            if name == "BHS":
                in_batch = len(messages)
            elif name == "BTS":
                bts_index += 1
                fs = line[3:4] or "|"
                declared = line.split(fs)[1].strip() if fs in line else ""
                if declared.isdigit() and int(declared) != len(messages) - in_batch:
                    raise ParseError(
                        "BTS-1 message count does not match the batch",
                        hl7_code="100",
                        segment="BTS",
                        segment_index=bts_index,
                        field=1,
                    )
            continue
        if name == "MSH":
            messages.append([line])
        elif messages:
            messages[-1].append(line)
        else:
            raise ParseError("segment before the first MSH", hl7_code="100", segment=name)
    return ["\r".join(m) + "\r" for m in messages]
