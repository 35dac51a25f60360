"""Ledger reads and the witness endpoint.

Reads: latest final checkpoint, inclusion and consistency proofs, raw leaves, and a receipt (a
leaf proved against the latest *final* checkpoint when one covers it, else the latest signed
one, or the one of a given tree size). Witness: ``POST /ledger/witness``
(cosign a checkpoint, or 409 with split-view evidence, or 412 asking for a consistency proof),
``GET /ledger/witness`` (status) and ``GET /ledger/witness/evidence``.

Hashes and proofs are hex (each proof a list of hex node hashes, RFC 9162 order); leaves are
base64 of the exact stored bytes so that anyone can hash them (see docs/ledger-format.md).
"""

from __future__ import annotations

import base64
import json

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from gateway.errors import InvalidInputError, NotFoundError
from gateway.runtime import Gateway
from gateway.witness_service import WitnessProofNeededError, proof_arg
from ledger.checkpoint import SignedCheckpoint
from ledger.errors import LedgerError, SplitViewError
from ledger.witness import Evidence, count_cosigners

MAX_WITNESS_BODY = 256 * 1024


def _checkpoint_json(signed: SignedCheckpoint, *, final: bool, gw: Gateway) -> dict[str, object]:
    cp = signed.checkpoint
    return {
        "origin": cp.origin,
        "tree_size": cp.size,
        "root_hash": cp.root.hex(),
        "final": final,
        "quorum": gw.witness.quorum,
        "cosigners": len(signed.signers()) - 1,
        "checkpoint": base64.b64encode(signed.to_bytes()).decode(),
    }


MAX_LEAVES_PER_PAGE = 1000


def build_router(gw: Gateway) -> APIRouter:
    """The /ledger routes."""
    router = APIRouter(prefix="/ledger")
    ledger = gw.ledger

    @router.get("/checkpoint")
    async def checkpoint(final: bool = Query(default=True)) -> Response:
        """The latest final checkpoint (``final=false``: the latest, final or not)."""
        if ledger.latest is None:
            raise NotFoundError("the ledger is empty")
        done = gw.witness.final_checkpoint()
        if final:
            if done is None:
                raise NotFoundError(
                    f"no checkpoint has reached the witness quorum ({gw.witness.quorum}) yet"
                )
            return JSONResponse(_checkpoint_json(done, final=True, gw=gw))
        latest = ledger.latest
        if gw.witness.cosigned is not None and gw.witness.cosigned.checkpoint == latest.checkpoint:
            latest = gw.witness.cosigned
        is_done = done is not None and done.checkpoint == latest.checkpoint
        return JSONResponse(_checkpoint_json(latest, final=is_done, gw=gw))

    @router.get("/receipt")
    async def receipt(
        request: Request,
        index: int = Query(ge=0),
        tree_size: int | None = Query(default=None, ge=1),
    ) -> Response:
        """Leaf ``index`` proved against a signed checkpoint: the latest final (cosigned) one
        when it covers the leaf, else the latest one (``"final": false``); with ``tree_size``
        (e.g. ZRC-2 of an HL7 ACK), the checkpoint of exactly that size. A record leaf's
        receipt only for a caller who may read one of its records (else the 404 of a leaf
        not yet covered). Raises NotFoundError (404) when no such checkpoint covers the leaf,
        InvalidInputError (400)."""
        records = getattr(gw, "records", None)  # a bare ledger node (witness tests) has none
        if records is not None:
            await records.check_receipt(getattr(request.state, "caller", None), index)
        done = gw.witness.final_checkpoint()
        signed: SignedCheckpoint | None
        if tree_size is not None:
            if not index < tree_size <= ledger.size:
                raise InvalidInputError(
                    f"need index < tree_size <= {ledger.size}", location="tree_size"
                )
            if done is not None and done.checkpoint.size == tree_size:
                signed = done
            else:
                signed = await ledger.checkpoint_at(tree_size)
            if signed is None:
                raise NotFoundError(f"no checkpoint was signed at tree size {tree_size}")
        elif done is not None and index < done.checkpoint.size:
            signed = done
        else:
            signed = ledger.latest
            if signed is None or index >= signed.checkpoint.size:
                raise NotFoundError(f"leaf {index} is not yet covered by a checkpoint")
        cosigned = gw.witness.cosigned
        if cosigned is not None and cosigned.checkpoint == signed.checkpoint:
            signed = cosigned  # the same checkpoint with the cosignatures gathered so far
        final = done is not None and done.checkpoint == signed.checkpoint
        if final:
            assert done is not None
            signed = done
        size = signed.checkpoint.size
        return JSONResponse(
            {
                "index": index,
                "tree_size": size,
                "leaf_hash": ledger.leaf_hash(index).hex(),
                "root_hash": signed.checkpoint.root.hex(),
                "proof": [h.hex() for h in ledger.inclusion_proof(index, size)],
                "checkpoint": base64.b64encode(signed.to_bytes()).decode(),
                "final": final,
                "cosigners": count_cosigners(signed, gw.trusted),
            }
        )

    @router.post("/witness")
    async def witness(request: Request) -> Response:
        """Cosign an offered checkpoint (see docs/ledger-format.md, "Witness protocol")."""
        raw = await request.body()
        if len(raw) > MAX_WITNESS_BODY:
            raise InvalidInputError("witness request too large", location="body")
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            signed = SignedCheckpoint.from_json(body.get("checkpoint"))
            proof_from = body.get("proof_from")
            if proof_from is not None and (
                not isinstance(proof_from, int) or isinstance(proof_from, bool) or proof_from < 0
            ):
                raise ValueError("proof_from must be a non-negative integer")
            proof = proof_arg(body.get("proof"))
        except (ValueError, LedgerError) as exc:
            return JSONResponse({"error": "invalid", "detail": str(exc)}, status_code=400)
        try:
            cosigned = await gw.witness.cosign(signed, proof_from=proof_from, proof=proof)
        except SplitViewError as exc:
            first, second = exc.evidence
            ev = next(
                (e for e in gw.witness.evidence() if (e.first, e.second) == (first, second)),
                Evidence(str(exc), first, second),
            )
            return JSONResponse(
                {"error": "split-view", "detail": str(exc), "evidence": ev.to_json()},
                status_code=409,
            )
        except WitnessProofNeededError as exc:
            return JSONResponse(
                {"error": "proof-needed", "detail": str(exc), "cosigned_size": exc.cosigned_size},
                status_code=412,
            )
        except LedgerError as exc:
            return JSONResponse({"error": "unverifiable", "detail": str(exc)}, status_code=422)
        return JSONResponse({"checkpoint": cosigned.to_json()})

    @router.get("/witness")
    async def witness_status() -> Response:
        """This gateway's witness: quorum, peers, cosigned and final sizes."""
        return JSONResponse(gw.witness.status())

    @router.get("/witness/evidence")
    async def witness_evidence() -> Response:
        """Every split-view evidence pair this gateway holds (its own, then peers' reports)."""
        return JSONResponse({"evidence": [e.to_json() for e in gw.witness.evidence()]})

    @router.get("/proof/inclusion")
    async def inclusion(
        index: int | None = Query(default=None, ge=0),
        leaf_hash: str | None = Query(default=None),
        tree_size: int | None = Query(default=None, ge=1),
    ) -> Response:
        size = tree_size or ledger.size
        if index is None:
            if leaf_hash is None:
                raise InvalidInputError("give index or leaf_hash", location="index")
            try:
                wanted = bytes.fromhex(leaf_hash)
            except ValueError as exc:
                raise InvalidInputError("leaf_hash must be hex", location="leaf_hash") from exc
            found = ledger.index_of(wanted)
            if found is None or found >= ledger.size:
                raise NotFoundError("no leaf with that hash")
            index = found
        if not 0 <= index < size <= ledger.size:
            raise InvalidInputError(
                f"need 0 <= index < tree_size <= {ledger.size}", location="tree_size"
            )
        proof = ledger.inclusion_proof(index, size)
        return JSONResponse(
            {
                "index": index,
                "tree_size": size,
                "leaf_hash": ledger.leaf_hash(index).hex(),
                "root_hash": ledger.root(size).hex(),
                "proof": [h.hex() for h in proof],
            }
        )

    @router.get("/proof/consistency")
    async def consistency(first: int = Query(ge=1), second: int = Query(ge=1)) -> Response:
        if not first <= second <= ledger.size:
            raise InvalidInputError(
                f"need 1 <= first <= second <= {ledger.size}", location="second"
            )
        proof = ledger.consistency_proof(first, second)
        return JSONResponse(
            {
                "first": first,
                "second": second,
                "first_root": ledger.root(first).hex(),
                "second_root": ledger.root(second).hex(),
                "proof": [h.hex() for h in proof],
            }
        )

    @router.get("/leaves")
    async def leaves(start: int = Query(ge=0), end: int = Query(ge=1)) -> Response:
        if not start < end <= ledger.size:
            raise InvalidInputError(f"need start < end <= {ledger.size}", location="end")
        end = min(end, start + MAX_LEAVES_PER_PAGE)
        data = await gw.ledger.leaves(start, end)
        return JSONResponse(
            {
                "start": start,
                "end": end,
                "leaves": [base64.b64encode(x).decode() for x in data],
            }
        )

    return router
