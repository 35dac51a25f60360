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
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gateway.backends.protocols import LogEntry
from gateway.errors import BackendError, LogConflictError, LogUnavailableError
from ledger.durable import fsync_directory, make_directory

NAME = "file-log"
_HEADER = struct.Struct(">II")
_IDLEN = struct.Struct(">H")
MAX_RECORD_BYTES = 64 * 1024 * 1024


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
    """The bytes of one record. Raises ValueError for a message id or payload too long."""
    mid = msg_id.encode("utf-8")
    if len(mid) > 0xFFFF:
        raise ValueError("message id longer than 65535 bytes")
    body = _IDLEN.pack(len(mid)) + mid + payload
    if len(body) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def _first_valid_record(buf: bytes, start: int) -> int | None:
    """Offset of the first complete, checksum-valid record in ``buf`` at or after ``start``."""
    for i in range(start, len(buf) - _HEADER.size + 1):
        length, crc = _HEADER.unpack_from(buf, i)
        end = i + _HEADER.size + length
        if length >= _IDLEN.size and end <= len(buf) and zlib.crc32(buf[i + 8 : end]) == crc:
            return i
    return None


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
        # The in-memory index (_records, _ids, _end) is updated by appends and by the scans of
        # readers, which run in worker threads: one thread at a time.
        self._index_lock = threading.RLock()

    @property
    def max_message_bytes(self) -> int:
        """The largest payload :meth:`append` accepts."""
        return MAX_RECORD_BYTES - 2 - 0xFFFF

    # -- scanning ------------------------------------------------------------------------

    def _scan_from(self, f: BinaryIO, *, repair: bool) -> None:
        """Index the records after ``self._end``.

        Raises LogCorruptionError for a damaged record that is not an incomplete tail.
        """
        size = os.fstat(f.fileno()).st_size
        pos = self._end
        while pos < size:
            f.seek(pos)
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                self._torn(f, pos, size, repair)
                return
            length, crc = _HEADER.unpack(header)
            if length < _IDLEN.size or length > MAX_RECORD_BYTES:
                raise LogCorruptionError(
                    f"record length {length} is impossible", path=self.path, offset=pos
                )
            if pos + _HEADER.size + length > size:
                self._torn(f, pos, size, repair)
                return
            body = f.read(length)
            if zlib.crc32(body) != crc:
                raise LogCorruptionError("record checksum mismatch", path=self.path, offset=pos)
            (idlen,) = _IDLEN.unpack(body[: _IDLEN.size])
            if _IDLEN.size + idlen > length:
                raise LogCorruptionError("message id overruns record", path=self.path, offset=pos)
            msg_id = body[_IDLEN.size : _IDLEN.size + idlen].decode("utf-8", "replace")
            info = RecordInfo(len(self._records) + 1, pos, _HEADER.size + length, msg_id)
            self._records.append(info)
            self._ids.setdefault(msg_id, info.seq)
            pos += info.length
        self._end = pos

    def _torn(self, f: BinaryIO, pos: int, size: int, repair: bool) -> None:
        """The record at ``pos`` runs past the end of the file.

        Without ``repair`` (no lock held) another process may be writing it: stop there. With
        the lock held it is either a torn tail (a crash mid-append, never acknowledged), which is
        cut away, or a damaged length field in front of further records, which is corruption:
        a torn tail is a prefix of ONE record, so no complete valid record can follow it.
        Raises LogCorruptionError.
        """
        self._end = pos
        if not repair:
            return
        if size - pos > _HEADER.size + MAX_RECORD_BYTES:
            raise LogCorruptionError(
                "record runs past the end of the file", path=self.path, offset=pos
            )
        f.seek(pos)
        tail = f.read(size - pos)
        later = _first_valid_record(tail, 1)
        if later is not None:
            raise LogCorruptionError(
                f"record length is damaged (a valid record follows at byte {pos + later})",
                path=self.path,
                offset=pos,
            )
        with open(self.path, "r+b") as w:
            w.truncate(pos)
            w.flush()
            os.fsync(w.fileno())

    def _open_sync(self) -> None:
        with self._index_lock:
            if self._opened:
                return
            make_directory(self.path.parent)
            created = not self.path.exists()
            with open(self.path, "a+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    self._scan_from(f, repair=True)
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            if created:
                fsync_directory(self.path.parent)  # the new file's name, before any append
            self._opened = True

    def _refresh(self) -> list[RecordInfo]:
        """Index what other processes appended; a snapshot of the index."""
        self._open_sync()
        with self._index_lock, open(self.path, "rb") as f:
            self._scan_from(f, repair=False)
            return list(self._records)

    # -- the protocol ----------------------------------------------------------------------

    def _append_sync(self, data: bytes, expected_last_seq: int, msg_id: str) -> int:
        self._open_sync()
        with self._index_lock, open(self.path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                self._scan_from(f, repair=True)
                if msg_id in self._ids:
                    return self._ids[msg_id]
                last = len(self._records)
                if expected_last_seq != last:
                    raise LogConflictError(expected_last_seq, last, backend=NAME)
                try:
                    record = encode_record(data, msg_id)
                except ValueError as exc:
                    raise BackendError(str(exc), backend=NAME) from exc
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

        Raises LogConflictError, LogUnavailableError (the file cannot be written), BackendError.
        """
        async with self._lock:
            try:
                return await asyncio.to_thread(self._append_sync, data, expected_last_seq, msg_id)
            except OSError as exc:
                raise LogUnavailableError(
                    f"cannot append to {self.path}: {exc}", backend=NAME
                ) from exc

    async def last_seq(self) -> int:
        """Sequence of the last record. Raises BackendError."""
        try:
            records = await asyncio.to_thread(self._refresh)
        except OSError as exc:
            raise BackendError(f"cannot read {self.path}: {exc}", backend=NAME) from exc
        return len(records)

    def records(self) -> list[RecordInfo]:
        """Where every record is (for audit reports). Raises BackendError."""
        try:
            return self._refresh()
        except OSError as exc:
            raise BackendError(f"cannot read {self.path}: {exc}", backend=NAME) from exc

    def _read_sync(self, start_seq: int, count: int) -> list[LogEntry]:
        records = self._refresh()
        out = []
        with open(self.path, "rb") as f:
            for info in records[start_seq - 1 : start_seq - 1 + count]:
                f.seek(info.offset)
                raw = f.read(info.length)
                body = raw[_HEADER.size :]
                _length, crc = _HEADER.unpack(raw[: _HEADER.size])
                if zlib.crc32(body) != crc:
                    raise LogCorruptionError(
                        "record checksum mismatch", path=self.path, offset=info.offset
                    )
                (idlen,) = _IDLEN.unpack(body[: _IDLEN.size])
                out.append(LogEntry(info.seq, body[_IDLEN.size + idlen :]))
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
    """(offset, payload, msg id) of each record; for tools and tests.

    Raises BackendError (LogCorruptionError naming the byte offset of a damaged record).
    """
    log = FileLog(path=path)
    try:
        infos = log.records()
        with open(path, "rb") as f:
            for info in infos:
                f.seek(info.offset)
                body = f.read(info.length)[_HEADER.size :]
                (idlen,) = _IDLEN.unpack(body[: _IDLEN.size])
                yield info.offset, body[_IDLEN.size + idlen :], info.msg_id
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc}", backend=NAME) from exc
