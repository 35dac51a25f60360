"""MLLP framing (pure, bytes only): ``0x0B <message> 0x1C 0x0D``.

:class:`FrameDecoder` is fed whatever the socket gives and returns complete frames and events:
bytes before a start block are discarded and reported (:class:`Discarded`), a frame over the
size limit is reported (:class:`Oversize`, with the first bytes so an ACK can still be built)
and the decoder resynchronises at the next start block.
"""

from __future__ import annotations

from dataclasses import dataclass

START = b"\x0b"
END = b"\x1c\r"
_END_BYTE = 0x1C


def frame(message: bytes) -> bytes:
    """Wrap one message in MLLP start and end blocks."""
    return START + message + END


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete message (without the framing bytes)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Discarded:
    """Bytes that arrived outside a frame and were dropped."""

    count: int


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame over the limit; ``head`` is its first bytes (enough to read MSH)."""

    head: bytes
    limit: int


Event = Frame | Discarded | Oversize


class FrameDecoder:
    """Incremental MLLP decoder."""

    def __init__(self, max_size: int = 4 * 1024 * 1024, head_bytes: int = 4096) -> None:
        self.max_size = max_size
        self._head_bytes = head_bytes
        self._buf = bytearray()
        self._in_frame = False
        self._skipping = False  # inside an oversize frame, waiting for its end
        self._head = b""

    @property
    def in_frame(self) -> bool:
        """Whether a frame has started and not ended (a peer closing now cut it)."""
        return self._in_frame or self._skipping

    def feed(self, data: bytes) -> list[Event]:
        """Consume bytes; return the frames and events they complete, in order."""
        out: list[Event] = []
        self._buf += data
        while self._buf:
            if not self._in_frame and not self._skipping:
                start = self._buf.find(START)
                if start < 0:
                    out.append(Discarded(len(self._buf)))
                    self._buf.clear()
                    break
                if start > 0:
                    out.append(Discarded(start))
                del self._buf[: start + 1]
                self._in_frame = True
            end = self._buf.find(END)
            if self._skipping:
                if end < 0:
                    keep = self._buf[-1:] if self._buf[-1:] == b"\x1c" else b""
                    self._buf[:] = keep
                    break
                del self._buf[: end + 2]
                self._skipping = False
                out.append(Oversize(self._head, self.max_size))
                continue
            if end < 0:
                if len(self._buf) > self.max_size:
                    self._head = bytes(self._buf[: self._head_bytes])
                    self._in_frame, self._skipping = False, True
                    keep = self._buf[-1:] if self._buf[-1:] == b"\x1c" else b""
                    self._buf[:] = keep
                break
            if end > self.max_size:
                out.append(Oversize(bytes(self._buf[: self._head_bytes]), self.max_size))
            else:
                out.append(Frame(bytes(self._buf[:end])))
            del self._buf[: end + 2]
            self._in_frame = False
        return out
