"""HL7 v2 ACKs carry the ledger receipt of the message's container (ZRC), and
``GET /ledger/receipt`` gives the proof for it: checked with the project's verifier
(ledger/verify.py) and with pymerkle, an independent RFC 9162 implementation."""

from __future__ import annotations

import base64
import warnings

import pytest

from gateway.hl7.workers import HL7_MEDIA_TYPE
from ledger.checkpoint import SignedCheckpoint
from ledger.leaves import decode_leaf
from ledger.merkle import leaf_hash
from ledger.verify import verify_checkpoint, verify_inclusion
from tests.gateway.hl7.test_ingest import HL7, App, hl7gw, msa

__all__ = ["hl7gw"]


def zrc(ack: bytes) -> list[str]:
    seg = next(s for s in ack.decode().split("\r") if s.startswith("ZRC"))
    return seg.split("|")


async def test_ack_receipt_verifies_with_our_verifier_and_with_pymerkle(hl7gw: App) -> None:
    pymerkle = pytest.importorskip("pymerkle")
    for name in (
        "adt_a04_escapes.hl7",
        "oru_r01_lab.hl7",
    ):  # the second one: a tree of several leaves
        ack = await hl7gw.send((HL7 / name).read_bytes())
        assert msa(ack)[1] in ("AA", "CA")
    fields = zrc(ack)
    index, size, root, cid = int(fields[1]), int(fields[2]), bytes.fromhex(fields[3]), fields[4]
    assert 0 <= index < size <= hl7gw.gw.ledger.size
    # The leaf at ZRC-1 anchors this message's container in the block named by ZRC-4.
    page = (await hl7gw.http.get("/ledger/leaves", params={"start": 0, "end": size})).json()
    leaves = [base64.b64decode(x) for x in page["leaves"]]
    leaf = decode_leaf(leaves[index])
    assert leaf["kind"] == "record" and leaf["cid"] == cid
    if fields[5]:
        offset, length = (int(x) for x in fields[5].split("^"))
        assert leaf["range"] == [offset, length]
    r = await hl7gw.http.get("/ledger/receipt", params={"index": index, "tree_size": size})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["index"], body["tree_size"], body["root_hash"]) == (index, size, root.hex())
    assert isinstance(body["final"], bool)
    proof = [bytes.fromhex(h) for h in body["proof"]]
    lh = leaf_hash(leaves[index])
    assert body["leaf_hash"] == lh.hex()
    verify_inclusion(lh, index, size, proof, root)
    signed = SignedCheckpoint.from_bytes(base64.b64decode(body["checkpoint"]))
    checkpoint = verify_checkpoint(signed, hl7gw.gw.trusted)
    assert (checkpoint.size, checkpoint.root) == (size, root)
    # pymerkle, from the raw leaves: same root, and its inclusion path is [leaf hash, proof...].
    tree = pymerkle.InmemoryTree(algorithm="sha256")
    for data in leaves:
        tree.append_entry(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert tree.get_root(size) == root
        path = tree.prove_inclusion(index + 1, size).serialize()["path"]
    assert [bytes.fromhex(h) for h in path] == [lh, *proof]
    # Without tree_size: proved against the latest signed checkpoint (final or not).
    latest = (await hl7gw.http.get("/ledger/receipt", params={"index": index})).json()
    assert latest["tree_size"] >= size and isinstance(latest["final"], bool)
    verify_inclusion(
        lh,
        index,
        latest["tree_size"],
        [bytes.fromhex(h) for h in latest["proof"]],
        bytes.fromhex(latest["root_hash"]),
    )


async def test_receipt_errors_are_precise(hl7gw: App) -> None:
    ack = await hl7gw.send((HL7 / "adt_a03.hl7").read_bytes())
    index, size = int(zrc(ack)[1]), int(zrc(ack)[2])
    r = await hl7gw.http.get("/ledger/receipt", params={"index": size, "tree_size": size})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    r = await hl7gw.http.get("/ledger/receipt", params={"index": 10**6})
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    if index + 1 < size:  # a size at which no batch ended: no checkpoint to prove against
        r = await hl7gw.http.get("/ledger/receipt", params={"index": index, "tree_size": index + 1})
        assert r.status_code in (200, 404)


async def test_receipt_is_in_both_enhanced_acks_and_in_http_answers(hl7gw: App) -> None:
    raw = (HL7 / "adt_a08.hl7").read_bytes().replace(b"|2.5.1||||||", b"|2.5.1|||AL|AL||", 1)
    r = await hl7gw.http.post("/hl7v2", content=raw, headers={"content-type": HL7_MEDIA_TYPE})
    assert r.status_code == 200
    segments = r.content.decode().split("\r")
    assert [s.split("|")[1] for s in segments if s.startswith("MSA")] == ["CA", "AA"]
    zrcs = [s for s in segments if s.startswith("ZRC")]
    assert len(zrcs) == 2 and zrcs[0] == zrcs[1]
    # An error ACK carries none.
    bad = b"MSH|^~\\&|A|F|G|H|20260101||ADT^A04|N-9|P|2.5.1\rEVN|A04|20260101\rPID|1||||Doe^J\r"
    r = await hl7gw.http.post("/hl7v2", content=bad, headers={"content-type": HL7_MEDIA_TYPE})
    assert b"MSA|AE|" in r.content and b"ZRC" not in r.content
