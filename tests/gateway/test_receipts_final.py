"""Three institutions' gateways share one log; receipts can carry the quorum-cosigned checkpoint.

Each gateway is a full app (embedded adapters, one shared FileLog as the replicated log stands
in on one machine); their witnesses reach each other over HTTP through an in-process router.
"""

from __future__ import annotations

import base64
import json
import os
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
from pydantic import SecretStr

from gateway.app import create_app
from gateway.auth.peer import GATEWAY_PURPOSE, GATEWAY_SCOPE, gateway_key, public_jwks
from gateway.auth.registry import ClientRecord
from gateway.backends.blobs_local import LocalBlobStore
from gateway.backends.keys_file import FileKeyStore
from gateway.backends.log_file import FileLog
from gateway.backends.protocols import Backends
from gateway.backends.state_memory import MemoryStateStore
from gateway.config import Settings
from gateway.datadir import DataDir
from gateway.demo import check_receipt, receipt_of
from ledger.checkpoint import SignedCheckpoint
from ledger.keys import Signer, TrustedKeys
from ledger.merkle import leaf_hash
from ledger.witness import is_final
from tests.fakes import Router
from tests.gateway.conftest import FHIR, auth_headers, demo_bundle

NAMES = ("hosp-a", "clinic-b", "centre-c")


async def test_receipts_carry_the_cosigned_checkpoint_when_asked(tmp_path: Path) -> None:
    signers = {n: Signer.generate(n) for n in NAMES}
    trust = TrustedKeys.of(signers.values())
    trust.save(tmp_path / "trust.json")
    router = Router()
    apps = {}
    for name in NAMES:
        d = tmp_path / name
        signers[name].save(DataDir(d, "embedded").signer)
        settings = Settings(
            profile="embedded",
            data_dir=d,
            institution=name,
            mllp_enabled=False,
            trust_file=tmp_path / "trust.json",
            pseudonym_key=SecretStr("11" * 32),
            witness_quorum=2,
            receipt_wait_final_ms=10_000,
            witness_peers=",".join(f"http://{m}" for m in NAMES if m != name),
        )
        backends = Backends(
            blobs=LocalBlobStore(directory=DataDir(d, "embedded").blocks),
            log=FileLog(path=tmp_path / "shared-log.bin"),
            state=MemoryStateStore(),
            keys=FileKeyStore(path=DataDir(d, "embedded").keystore, master_key=os.urandom(32)),
        )
        apps[name] = create_app(settings, backends=backends, witness_transport=router)
        router.apps[name] = httpx.ASGITransport(app=apps[name])
    # Each gateway is a registered gateway client of the two others (their witnesses).
    for name, app in apps.items():
        jwks = public_jwks(gateway_key(app.state.gateway.settings))
        for other in NAMES:
            if other != name:
                apps[other].state.auth.registry.put(
                    ClientRecord(
                        client_id=name,
                        institution=name,
                        jwks=jwks,
                        scopes=(GATEWAY_SCOPE,),
                        purposes=(GATEWAY_PURPOSE,),
                        gateway=True,
                    )
                )
    async with AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        client = httpx.AsyncClient(
            transport=router,
            base_url="http://hosp-a",
            timeout=30,
            headers=auth_headers(apps["hosp-a"]),
        )
        r = await client.post("/fhir", content=json.dumps(demo_bundle()), headers=FHIR)
        assert r.status_code == 200, r.text
        gw = apps["hosp-a"].state.gateway
        for entry in r.json()["entry"]:
            receipt = receipt_of(entry["response"])
            signed = SignedCheckpoint.from_bytes(base64.b64decode(receipt["checkpoint"]))
            assert is_final(signed, trust, 2), "receipt checkpoint is not cosigned by the quorum"
            assert set(signed.signers()) == set(NAMES)
            leaf = (await gw.ledger.leaves(receipt["leafIndex"], receipt["leafIndex"] + 1))[0]
            check_receipt(receipt, leaf_hash(leaf), trust)
        # The other gateways derived the same tree and read nothing they should not have.
        final = (await client.get("/ledger/checkpoint")).json()
        assert final["final"] is True
        seen_by_b = await httpx.AsyncClient(
            transport=router, base_url="http://clinic-b", headers=auth_headers(apps["clinic-b"])
        ).get("/ledger/checkpoint", params={"final": "false"})
        assert seen_by_b.json()["tree_size"] >= final["tree_size"]
        await client.aclose()
