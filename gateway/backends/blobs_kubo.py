"""Production blob store: Kubo (IPFS) over its RPC API, called directly with httpx.

``put_many`` writes a batch in ONE call. A lone block (the record pipeline's usual write: one
pack holding a storage batch's ciphertexts) goes as ``block/put`` with
``cid-codec=raw&mhtype=sha2-256&pin=true``: one block, one pin. Several blocks go as a CARv1 to
``dag/import`` under one DAG-CBOR batch root that is the only pin (a pin per block costs Kubo
far more than the blocks). Every CID Kubo reports is checked against the CID computed locally,
so a block stored under another hash is never acknowledged. Reads use ``block/get``
with ``offline=true`` so a missing block fails at once instead of searching the network.
Raises BackendError (backend "kubo"), BlobNotFoundError.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence

import httpx

from gateway.backends.car import batch_car
from gateway.backends.cid import cid_v1_raw
from gateway.backends.http1 import StreamTransport
from gateway.errors import BackendError, BlobNotFoundError

NAME = "kubo"


class KuboBlobStore:
    """Blocks in a Kubo node."""

    name = NAME

    def __init__(
        self,
        *,
        base_url: str,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=f"{self.base_url}/api/v0",
            timeout=timeout,
            # Kubo is local and called dozens of times a second: the lean HTTP/1.1 transport
            # (every call made here is idempotent, as its one retry on a stale idle
            # connection requires). Another transport can be injected (tests).
            transport=transport or StreamTransport(timeout=timeout),
        )

    async def _post(self, path: str, **kwargs: object) -> httpx.Response:
        try:
            response = await self._client.post(path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise BackendError(f"{path}: {type(exc).__name__}: {exc}", backend=NAME) from exc
        return response

    async def put_many(self, blocks: Sequence[bytes]) -> list[str]:
        """Store all blocks in one call, pinned (a lone block itself, several under one batch
        root); return their CIDs.

        Raises BackendError.
        """
        if not blocks:
            return []
        cids = [cid_v1_raw(b) for b in blocks]
        if len(blocks) == 1:
            await self._put_pinned(cids[0], blocks[0])
            return cids
        root, car = batch_car(cids, blocks)
        roots = await self.import_car(car)
        if roots != [root]:
            raise BackendError(
                f"dag/import pinned {roots[:3]} instead of the batch root {root}", backend=NAME
            )
        return cids

    async def get(self, cid: str) -> bytes:
        """The block's bytes. Raises BlobNotFoundError, BackendError."""
        r = await self._post("/block/get", params={"arg": cid, "offline": "true"})
        if r.status_code == 200:
            return r.content
        text = r.text
        if "not found" in text or "could not find" in text or "invalid" in text.lower():
            raise BlobNotFoundError(cid, backend=NAME)
        raise BackendError(f"block/get {cid} answered {r.status_code}: {text[:200]}", backend=NAME)

    async def _put_pinned(self, cid: str, block: bytes) -> None:
        """One raw block with a pin of its own: ``block/put`` writes and pins one block,
        where ``dag/import`` would write a batch root beside it (a second block and fsync,
        about 60% more of Kubo's CPU per write, measured)."""
        body, content_type = multipart_file("block", block, "application/octet-stream")
        r = await self._post(
            "/block/put",
            params={
                "cid-codec": "raw",
                "mhtype": "sha2-256",
                "pin": "true",
                "allow-big-block": "true",
            },
            content=body,
            headers={"Content-Type": content_type},
        )
        if r.status_code != 200:
            raise BackendError(f"block/put answered {r.status_code}: {r.text[:200]}", backend=NAME)
        try:
            stored = json.loads(r.text)["Key"]
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError("block/put answered something unexpected", backend=NAME) from exc
        if stored != cid:
            raise BackendError(f"block/put stored {stored} instead of {cid}", backend=NAME)

    async def import_car(self, car: bytes) -> list[str]:
        """Import a CARv1 archive with ``dag/import`` (roots pinned); return root CIDs, any order.

        Raises BackendError when Kubo refuses the archive or fails to pin a root.
        """
        body, content_type = multipart_file("batch.car", car, "application/vnd.ipld.car")
        r = await self._post(
            "/dag/import",
            params={"pin-roots": "true", "allow-big-block": "true"},
            content=body,
            headers={"Content-Type": content_type},
        )
        if r.status_code != 200:
            raise BackendError(f"dag/import answered {r.status_code}: {r.text[:200]}", backend=NAME)
        roots = []
        try:
            for line in r.text.splitlines():
                obj = json.loads(line) if line.strip() else {}
                root = obj.get("Root")
                if root is None:
                    continue
                if root.get("PinErrorMsg"):
                    raise BackendError(
                        f"dag/import could not pin {root['Cid']['/']}: {root['PinErrorMsg']}",
                        backend=NAME,
                    )
                roots.append(str(root["Cid"]["/"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackendError("dag/import answered something unexpected", backend=NAME) from exc
        return roots

    async def is_pinned(self, cid: str, *, indirect: bool = False) -> bool:
        """Whether the block is pinned itself (a recursive pin: a lone block written by
        ``put_many``, a CAR root), or with
        ``indirect`` also through a pinned batch root; the indirect check walks every pinned
        DAG, so it is slow on a large repository. Raises BackendError."""
        kind = "all" if indirect else "recursive"
        r = await self._post("/pin/ls", params={"arg": cid, "type": kind})
        return r.status_code == 200 and cid in r.text

    async def ping(self) -> None:
        """Raise BackendError unless Kubo answers ``id``."""
        r = await self._post("/id")
        if r.status_code != 200:
            raise BackendError(f"id answered {r.status_code}", backend=NAME)

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


def multipart_file(filename: str, data: bytes, media_type: str) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body holding one file field, and its Content-Type.

    Built in one piece: httpx's multipart encoder costs about a millisecond of the gateway's
    CPU per batch on a few hundred KiB, which the ingest path pays for every Kubo write. The
    boundary is random and checked not to occur in the data.
    """
    while True:
        boundary = secrets.token_hex(16)
        if boundary.encode() not in data:
            break
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {media_type}\r\n\r\n"
    ).encode()
    body = b"".join((head, data, f"\r\n--{boundary}--\r\n".encode()))
    return body, f"multipart/form-data; boundary={boundary}"
