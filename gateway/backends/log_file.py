"""Embedded log: an append-only local file of length- and CRC-framed records.

Record layout (big-endian)::

    u32 body length | u32 CRC-32 of body | body = u16 msg-id length | msg id (ASCII) | payload

Appends are conditional on the last sequence (1-based record number) under an exclusive
``flock``, so two processes sharing the file cannot both take a position; each append is
fsynced before it returns. A message id seen before returns that record's sequence and appends
nothing. On open, an incomplete last record (a crash mid-write; never acknowledged) is cut
away; any other damage raises BackendError naming the byte offset.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.backends.protocols import LogEntry
from gateway.errors import BackendError, LogConflictError

NAME = "file-log"
_HEADER = struct.Struct(">II")
_IDLEN = struct.Struct(">H")


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """Where a record is in the file."""

    seq: int
    offset: int
    length: int  # header + body
    msg_id: str


class LogCorruptionError(BackendError):
    """A record of the log file is damaged. Carries the path and byte offset."""

    def __init__(self, message: str, *, path: Path, offset: int) -> None:
        super().__init__(f"{path} at byte {offset}: {message}", backend=NAME)
        self.path = path
        self.offset = offset


def encode_record(payload: bytes, msg_id: str) -> bytes:
    """The bytes of one record."""
    mid = msg_id.encode("ascii")
    body = _IDLEN.pack(len(mid)) + mid + payload
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


class FileLog:
    """An append-only log in one file, shared safely by processes on one machine."""

    name = NAME

    def __init__(self, *, path: Path) -> None:
        self.path = path
        self._records: list[RecordInfo] = []
        self._ids: dict[str, int] = {}
        self._end = 0
        self._opened = False
        self._lock = asyncio.Lock()

    # -- scanning ------------------------------------------------------------------------

    def _scan_from(self, f: object, *, repair: bool) -> None:
        """Index records after ``self._end`` (f is an open binary file)."""
        assert hasattr(f, "seek") and hasattr(f, "read")
        size = os.fstat(f.fileno()).st_size  # type: ignore[attr-defined]
        pos = self._end
        while pos < size:
            f.seek(pos)
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                self._torn(pos, size, repair)
                return
            length, crc = _HEADER.unpack(header)
            if pos + _HEADER.size + length > size:
                self._torn(pos, size, repair)
                return
            body = f.read(length)
            if zlib.crc32(body) != crc:
                raise LogCorruptionError("record checksum mismatch", path=self.path, offset=pos)
            (idlen,) = _IDLEN.unpack(body[:2])
            msg_id = body[2 : 2 + idlen].decode("ascii", "replace")
            info = RecordInfo(len(self._records) + 1, pos, _HEADER.size + length, msg_id)
            self._records.append(info)
            self._ids.setdefault(msg_id, info.seq)
            pos += info.length
        self._end = pos

    def _torn(self, pos: int, size: int, repair: bool) -> None:
        if not repair:
            # Another process is writing right now; look again later.
            self._end = pos
            return
        with open(self.path, "r+b") as f:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
        self._end = pos

    def _open_sync(self) -> None:
        if self._opened:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                self._scan_from(f, repair=True)
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        self._opened = True

    def _refresh(self) -> None:
        self._open_sync()
        with open(self.path, "rb") as f:
            self._scan_from(f, repair=False)

    # -- the protocol ----------------------------------------------------------------------

    def _append_sync(self, data: bytes, expected_last_seq: int, msg_id: str) -> int:
        self._open_sync()
        with open(self.path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                self._scan_from(f, repair=True)
                if msg_id in self._ids:
                    return self._ids[msg_id]
                last = len(self._records)
                if expected_last_seq != last:
                    raise LogConflictError(expected_last_seq, last, backend=NAME)
                record = encode_record(data, msg_id)
                f.seek(0, os.SEEK_END)
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
                info = RecordInfo(last + 1, self._end, len(record), msg_id)
                self._records.append(info)
                self._ids[msg_id] = info.seq
                self._end += len(record)
                return info.seq
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    async def append(self, data: bytes, *, expected_last_seq: int, msg_id: str) -> int:
        """Append if the last sequence is ``expected_last_seq``; durable on return.

        Raises LogConflictError, BackendError.
        """
        async with self._lock:
            try:
                return await asyncio.to_thread(self._append_sync, data, expected_last_seq, msg_id)
            except OSError as exc:
                raise BackendError(f"cannot append to {self.path}: {exc}", backend=NAME) from exc

    async def last_seq(self) -> int:
        """Sequence of the last record. Raises BackendError."""
        try:
            await asyncio.to_thread(self._refresh)
        except OSError as exc:
            raise BackendError(f"cannot read {self.path}: {exc}", backend=NAME) from exc
        return len(self._records)

    def records(self) -> list[RecordInfo]:
        """Where every record is (for audit reports)."""
        self._refresh()
        return list(self._records)

    def _read_sync(self, start_seq: int, count: int) -> list[LogEntry]:
        self._refresh()
        out = []
        with open(self.path, "rb") as f:
            for info in self._records[start_seq - 1 : start_seq - 1 + count]:
                f.seek(info.offset)
                raw = f.read(info.length)
                body = raw[_HEADER.size :]
                _length, crc = _HEADER.unpack(raw[: _HEADER.size])
                if zlib.crc32(body) != crc:
                    raise LogCorruptionError(
                        "record checksum mismatch", path=self.path, offset=info.offset
                    )
                (idlen,) = _IDLEN.unpack(body[:2])
                out.append(LogEntry(info.seq, body[2 + idlen :]))
        return out

    async def read(self, start_seq: int = 1) -> AsyncIterator[LogEntry]:
        """Yield records from ``start_seq`` to the end. Raises BackendError."""
        seq = max(start_seq, 1)
        while True:
            try:
                chunk = await asyncio.to_thread(self._read_sync, seq, 256)
            except OSError as exc:
                raise BackendError(f"cannot read {self.path}: {exc}", backend=NAME) from exc
            if not chunk:
                return
            for entry in chunk:
                yield entry
            seq = chunk[-1].seq + 1

    async def ping(self) -> None:
        """Raise BackendError unless the log file can be opened."""
        try:
            await asyncio.to_thread(self._refresh)
        except OSError as exc:
            raise BackendError(f"cannot open {self.path}: {exc}", backend=NAME) from exc

    async def close(self) -> None:
        """Nothing held open between calls."""


def iter_records(path: Path) -> Iterator[tuple[int, bytes, str]]:
    """(offset, payload, msg id) of each record; for tools and tests. Raises BackendError."""
    log = FileLog(path=path)
    for info in log.records():
        with open(path, "rb") as f:
            f.seek(info.offset)
            body = f.read(info.length)[_HEADER.size :]
        (idlen,) = _IDLEN.unpack(body[:2])
        yield info.offset, body[2 + idlen :], info.msg_id
