"""Witnesses and finality: cosignatures over HTTP between gateways sharing one log.

Three institutions share an in-memory log (the ledger tests' stand-in with LogBackend
semantics); each runs a Ledger, a WitnessService and the /ledger router in its own ASGI app, and
the collectors reach each other's ``POST /ledger/witness`` through httpx's ASGI transport.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.api.ledger import build_router
from gateway.app import outcome_for
from gateway.datadir import DataDir
from gateway.errors import GatewayError
from gateway.witness_service import WitnessService
from ledger.checkpoint import Checkpoint, SignedCheckpoint
from ledger.errors import SplitViewError
from ledger.keys import Signer, TrustedKeys
from ledger.sequencer import Ledger
from ledger.stored_tree import TreeStore
from ledger.witness import Evidence, WitnessState, count_cosigners, is_final
from tests.fakes import MemoryLog, Router

NAMES = ("hosp-a", "hosp-b", "hosp-c")
SIGNERS = {n: Signer.generate(n) for n in NAMES}
TRUST = TrustedKeys.of(SIGNERS.values())
ORIGIN = "test/ledger"


@dataclass
class Node:
    name: str
    ledger: Ledger
    witness: WitnessService
    app: FastAPI

    # what build_router reads from a Gateway
    @property
    def trusted(self) -> TrustedKeys:
        return TRUST


def make_node(
    name: str, log: MemoryLog, tmp: Path, router: Router, *, quorum: int, peers: list[str]
) -> Node:
    ledger = Ledger(
        log=log,
        tree=TreeStore.memory(),
        signer=SIGNERS[name],
        trusted=TRUST,
        origin=ORIGIN,
        max_delay=0.001,
    )
    witness = WitnessService(
        ledger=ledger,
        signer=SIGNERS[name],
        trusted=TRUST,
        state_path=DataDir(tmp / name, "embedded").witness_state,
        final_path=DataDir(tmp / name, "embedded").final_checkpoint,
        quorum=quorum,
        peers=[f"http://{p}" for p in peers],
        timeout=2.0,
        interval=0.01,
        retry_delay=0.05,
        transport=router,
    )
    node = Node(name, ledger, witness, FastAPI())

    async def handle(request: Request, exc: Exception) -> Response:
        status, outcome = outcome_for(exc)
        return JSONResponse(outcome, status_code=status)

    node.app.add_exception_handler(GatewayError, handle)
    node.app.include_router(build_router(node))  # type: ignore[arg-type]
    router.apps[name] = httpx.ASGITransport(app=node.app)
    return node


@pytest.fixture
async def alliance(tmp_path: Path) -> AsyncIterator[tuple[MemoryLog, Router, dict[str, Node]]]:
    log, router = MemoryLog(), Router()
    nodes = {
        n: make_node(n, log, tmp_path, router, quorum=2, peers=[p for p in NAMES if p != n])
        for n in NAMES
    }
    for node in nodes.values():
        await node.ledger.start(follow_interval=0.05)
        await node.witness.start()
    yield log, router, nodes
    for node in nodes.values():
        await node.witness.stop()
        await node.ledger.stop()


async def client(node: Node) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=node.app), base_url="http://t")


async def test_checkpoints_become_final_with_a_quorum_of_cosignatures(
    alliance: tuple[MemoryLog, Router, dict[str, Node]],
) -> None:
    _log, _router, nodes = alliance
    a = nodes["hosp-a"]
    for i in range(5):
        await a.ledger.append([f"leaf-{i}".encode()])
    final = await a.witness.wait_final(5, timeout=10)
    assert final.checkpoint.size == 5
    assert is_final(final, TRUST, 2)
    assert count_cosigners(final, TRUST) == 2
    async with await client(a) as c:
        body = (await c.get("/ledger/checkpoint")).json()
        receipt = (await c.get("/ledger/receipt", params={"index": 3})).json()
    assert body["final"] is True and body["tree_size"] == 5 and body["cosigners"] == 2
    served = SignedCheckpoint.from_bytes(base64.b64decode(body["checkpoint"]))
    assert is_final(served, TRUST, 2)
    assert receipt["tree_size"] == 5 and len(receipt["proof"]) > 0
    # The final checkpoint was persisted; a restarted service reloads it (checked against the tree).
    await asyncio.sleep(0.1)
    reloaded = WitnessService(
        ledger=a.ledger,
        signer=SIGNERS["hosp-a"],
        trusted=TRUST,
        state_path=a.witness._state_path,
        final_path=a.witness._final_path,
        quorum=2,
    )
    assert reloaded.final_checkpoint() is None
    reloaded._load_final()
    loaded = reloaded.final_checkpoint()
    assert loaded is not None and loaded.checkpoint.size == 5
    # The peers' witness states were persisted before they answered.
    for peer in ("hosp-b", "hosp-c"):
        state = WitnessState.from_bytes(nodes[peer].witness._state_path.read_bytes())
        assert state.latest[ORIGIN].checkpoint.size >= 1


async def test_receipts_do_not_wait_for_slow_or_dead_witnesses(
    alliance: tuple[MemoryLog, Router, dict[str, Node]],
) -> None:
    _log, router, nodes = alliance
    router.down.add("hosp-c")
    router.delay["hosp-b"] = 1.5
    a = nodes["hosp-a"]
    started = time.perf_counter()
    await a.ledger.append([b"fast"])
    assert time.perf_counter() - started < 0.5, "the append waited for the witnesses"
    async with await client(a) as c:
        r = await c.get("/ledger/checkpoint")
        assert r.status_code == 404, "no checkpoint can be final with one witness down"
        latest = (await c.get("/ledger/checkpoint", params={"final": "false"})).json()
    assert latest["final"] is False and latest["tree_size"] == 1
    router.down.clear()
    router.delay.clear()
    final = await a.witness.wait_final(1, timeout=10)
    assert count_cosigners(final, TRUST) == 2


async def test_split_view_is_refused_and_evidence_is_retrievable(
    alliance: tuple[MemoryLog, Router, dict[str, Node]],
) -> None:
    _log, router, nodes = alliance
    a, b, c = nodes["hosp-a"], nodes["hosp-b"], nodes["hosp-c"]
    await a.ledger.append([b"x", b"y"])
    await b.ledger.catch_up()
    await c.ledger.catch_up()
    honest = a.ledger.latest
    assert honest is not None
    # hosp-a signs a second checkpoint of the same size with another root and shows it to c.
    forged_cp = Checkpoint(
        origin=ORIGIN,
        size=honest.checkpoint.size,
        root=bytes(32),
        prev=honest.checkpoint.prev,
        time=honest.checkpoint.time + 1,
    )
    forged = SIGNERS["hosp-a"].sign(forged_cp)
    async with httpx.AsyncClient(transport=router, base_url="http://hosp-b") as hb:
        ok = await hb.post("/ledger/witness", json={"checkpoint": honest.to_json()})
        assert ok.status_code == 200
        refused_b = await hb.post("/ledger/witness", json={"checkpoint": forged.to_json()})
    async with httpx.AsyncClient(transport=router, base_url="http://hosp-c") as hc:
        refused_c = await hc.post("/ledger/witness", json={"checkpoint": forged.to_json()})
        listed = (await hc.get("/ledger/witness/evidence")).json()["evidence"]
    assert refused_b.status_code == 409 and refused_c.status_code == 409
    ev = Evidence.from_json(refused_c.json()["evidence"])
    assert ev.second == forged and ev.first.checkpoint.root == honest.checkpoint.root
    assert ev.first.checkpoint.size == ev.second.checkpoint.size
    assert ev.first.checkpoint.root != ev.second.checkpoint.root
    assert [Evidence.from_json(e) for e in listed] == [ev]
    # The evidence survives a restart of the witness (it was fsynced before answering).
    state = WitnessState.from_bytes(c.witness._state_path.read_bytes())
    assert state.evidence and state.evidence[0].second == forged
    # And the forged checkpoint was never cosigned by c.
    with pytest.raises(SplitViewError):
        await c.witness.cosign(forged)


async def test_witness_without_the_log_asks_for_a_consistency_proof(tmp_path: Path) -> None:
    """A witness whose own log copy does not reach the size answers 412; the collector retries
    with a proof from the size it names, and the witness cosigns."""
    log, router = MemoryLog(), Router()
    a = make_node("hosp-a", log, tmp_path, router, quorum=1, peers=["hosp-b"])
    b = make_node("hosp-b", MemoryLog(), tmp_path, router, quorum=1, peers=[])
    await a.ledger.start(follow_interval=None)
    await b.ledger.start(follow_interval=None)
    await b.witness.start()
    first = await a.ledger.append([b"one"])
    assert (await b.witness.cosign(first[0].checkpoint)).checkpoint.size == 1
    await a.ledger.append([b"two", b"three"])
    second = a.ledger.latest
    assert second is not None
    async with httpx.AsyncClient(transport=router, base_url="http://hosp-b") as hb:
        r = await hb.post("/ledger/witness", json={"checkpoint": second.to_json()})
        assert r.status_code == 412 and r.json()["cosigned_size"] == 1
        bad = await hb.post(
            "/ledger/witness",
            json={"checkpoint": second.to_json(), "proof_from": 1, "proof": ["00" * 32]},
        )
        assert bad.status_code == 409, "a wrong consistency proof must be refused as a split view"
    await a.witness.start()  # the collector handles the 412 itself
    final = await a.witness.wait_final(3, timeout=10)
    assert "hosp-b" in final.signers()
    await a.witness.stop()
    await b.witness.stop()
    await a.ledger.stop()
    await b.ledger.stop()


async def test_witness_rejects_badly_signed_checkpoints(
    alliance: tuple[MemoryLog, Router, dict[str, Node]],
) -> None:
    _log, router, nodes = alliance
    await nodes["hosp-a"].ledger.append([b"z"])
    signed = nodes["hosp-a"].ledger.latest
    assert signed is not None
    raw: dict[str, Any] = signed.to_json()
    sig = bytearray(base64.b64decode(raw["signatures"][1]["sig"]))
    sig[10] ^= 1
    raw["signatures"][1]["sig"] = base64.b64encode(bytes(sig)).decode()
    rogue = Signer.generate("rogue").sign(signed.checkpoint)
    async with httpx.AsyncClient(transport=router, base_url="http://hosp-b") as hb:
        assert (await hb.post("/ledger/witness", json={"checkpoint": raw})).status_code == 422
        r = await hb.post("/ledger/witness", json={"checkpoint": rogue.to_json()})
        assert r.status_code == 422
        assert (await hb.post("/ledger/witness", content=b"[1]")).status_code == 400
        status = (await hb.get("/ledger/witness")).json()
    assert status["evidence"] == 0 and status["quorum"] == 2


async def test_quorum_zero_makes_every_checkpoint_final(tmp_path: Path) -> None:
    router = Router()
    node = make_node("hosp-a", MemoryLog(), tmp_path, router, quorum=0, peers=[])
    await node.ledger.start(follow_interval=None)
    await node.witness.start()
    await node.ledger.append([b"alone"])
    assert node.witness.final_checkpoint() == node.ledger.latest
    final = await node.witness.wait_final(1, timeout=5)
    assert final.checkpoint.size == 1
    await node.witness.stop()
    await node.ledger.stop()


async def test_trust_file_is_anchored_once() -> None:
    log = MemoryLog()
    ledger = Ledger(
        log=log,
        tree=TreeStore.memory(),
        signer=SIGNERS["hosp-a"],
        trusted=TRUST,
        origin=ORIGIN,
    )
    await ledger.start(follow_interval=None)
    index = await ledger.ensure_trust_anchored(TRUST, source="hosp-a")
    assert index == 0
    assert await ledger.ensure_trust_anchored(TRUST, source="hosp-a") is None
    await ledger.stop()
    replay = Ledger(
        log=log,
        tree=TreeStore.memory(),
        signer=SIGNERS["hosp-b"],
        trusted=TRUST,
        origin=ORIGIN,
    )
    await replay.catch_up()
    assert replay.trust_anchors == {TRUST.digest().hex()}
    other = TrustedKeys.of([SIGNERS["hosp-a"]])
    assert other.digest().hex() not in replay.trust_anchors
