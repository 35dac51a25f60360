"""Embedded blob store: a local content-addressed directory with Kubo's CIDs.

Each block is a file named by its CID under a two-character shard directory, written with
:func:`ledger.durable.write_files_durably` (temporary file, fsync, rename, then each shard
directory fsynced once per batch), so a stored block survives a crash.

Raises BackendError (backend "local-blocks"), BlobNotFoundError.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from gateway.backends.car import car_header, car_section
from gateway.backends.cid import cid_v1_raw, parse_cid
from gateway.errors import BackendError, BlobNotFoundError, InvalidInputError
from ledger.durable import make_directory, write_durably, write_files_durably

NAME = "local-blocks"


class LocalBlobStore:
    """Content-addressed blocks in a directory."""

    name = NAME

    def __init__(self, *, directory: Path) -> None:
        self.directory = directory

    def path_of(self, cid: str) -> Path:
        """Where the block with this CID is (or would be) stored."""
        return self.directory / cid[-2:] / cid

    def _put_sync(self, blocks: Sequence[bytes]) -> list[str]:
        cids = []
        new: dict[Path, bytes] = {}
        for data in blocks:
            cid = cid_v1_raw(data)
            path = self.path_of(cid)
            cids.append(cid)
            if not path.exists():
                new[path] = data
        write_files_durably(new.items())
        return cids

    async def put_many(self, blocks: Sequence[bytes]) -> list[str]:
        """Store blocks durably; return their CIDs. Raises BackendError."""
        try:
            return await asyncio.to_thread(self._put_sync, list(blocks))
        except OSError as exc:
            raise BackendError(f"cannot write block: {exc}", backend=NAME) from exc

    async def get(self, cid: str) -> bytes:
        """The block's bytes. Raises BlobNotFoundError, BackendError."""
        try:
            parse_cid(cid)
        except InvalidInputError as exc:
            raise BlobNotFoundError(cid, backend=NAME) from exc
        try:
            return await asyncio.to_thread(self.path_of(cid).read_bytes)
        except FileNotFoundError as exc:
            raise BlobNotFoundError(cid, backend=NAME) from exc
        except OSError as exc:
            raise BackendError(f"cannot read block {cid}: {exc}", backend=NAME) from exc

    def _export_sync(self, path: Path, cids: Sequence[str]) -> int:
        blocks = []
        for cid in cids:
            try:
                blocks.append(self.path_of(cid).read_bytes())
            except FileNotFoundError as exc:
                raise BlobNotFoundError(cid, backend=NAME) from exc
        data = b"".join([car_header(cids), *(car_section(b) for b in blocks)])
        write_durably(path, data)
        return len(data)

    async def export_car(self, path: Path, cids: Sequence[str]) -> int:
        """Write the blocks ``cids`` as a CARv1 file (every block a root); return its size.

        ``ipfs dag import`` of the file stores and pins the same blocks under the same CIDs in
        Kubo. Raises BlobNotFoundError, BackendError.
        """
        try:
            for cid in cids:
                parse_cid(cid)
        except InvalidInputError as exc:
            raise BackendError(str(exc), backend=NAME) from exc
        try:
            return await asyncio.to_thread(self._export_sync, path, list(cids))
        except OSError as exc:
            raise BackendError(f"cannot write {path}: {exc}", backend=NAME) from exc

    async def ping(self) -> None:
        """Raise BackendError unless the directory is writable."""
        try:
            make_directory(self.directory)
        except OSError as exc:
            raise BackendError(f"cannot create {self.directory}: {exc}", backend=NAME) from exc
        if not os.access(self.directory, os.W_OK):
            raise BackendError(f"{self.directory} is not writable", backend=NAME)

    async def close(self) -> None:
        """Nothing to release."""
