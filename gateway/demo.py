"""``gateway demo``: a newcomer's end-to-end run on the embedded profile.

Starts a gateway in this process on a free loopback port, registers a demo HIS client (its own
ES384 key) and gets an access token from ``/auth/token`` with a signed JWT assertion (SMART
Backend Services), shows a request without it refused, then posts the sample transaction Bundle,
checks every receipt's inclusion proof against the signed checkpoint with the pure verifier,
reads every record back decrypted and compares it with what was sent, audits the ledger, and
prints a short summary. Returns 0 when all of it checked out.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import httpx
import rfc8785
import uvicorn

from gateway.app import create_app
from gateway.audit import audit
from gateway.config import Settings
from gateway.fhir import RECEIPT_URL
from gateway.hl7.ack import acks_to_send, read_header
from gateway.mllp.client import MLLPClient
from gateway.runtime import build_backends, load_secrets, load_signer, load_trust
from ledger.checkpoint import SignedCheckpoint
from ledger.errors import LedgerError
from ledger.leaves import decode_leaf
from ledger.verify import verify_checkpoint, verify_inclusion
from mappings.v2.convert import convert
from mappings.v2.parse import parse

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "fhir" / "demo-bundle.json"
HL7_FIXTURE = FIXTURE.parent.parent / "hl7v2" / "oru_r01_lab.hl7"


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def receipt_of(entry_response: dict[str, Any]) -> dict[str, Any]:
    """The receipt extension of a Bundle entry response, as a plain dict."""
    for ext in entry_response.get("extension", []):
        if ext.get("url") == RECEIPT_URL:
            out: dict[str, Any] = {}
            sub: dict[str, Any]
            for sub in ext["extension"]:
                value = next(v for k, v in sub.items() if k.startswith("value"))
                out[sub["url"]] = value
            return out
    raise KeyError("no ledger receipt in the entry response")


def check_receipt(receipt: dict[str, Any], leaf_hash: bytes, trusted: Any) -> None:
    """Verify a receipt: checkpoint signatures, then the inclusion proof. Raises LedgerError."""
    signed = SignedCheckpoint.from_bytes(base64.b64decode(receipt["checkpoint"]))
    cp = verify_checkpoint(signed, trusted)
    proof_bytes = base64.b64decode(receipt["inclusionProof"])
    proof = [proof_bytes[i : i + 32] for i in range(0, len(proof_bytes), 32)]
    if cp.size != receipt["treeSize"] or cp.root != base64.b64decode(receipt["rootHash"]):
        raise LedgerError("receipt's tree does not match its checkpoint")
    verify_inclusion(leaf_hash, receipt["leafIndex"], cp.size, proof, cp.root)


def _strip_server_fields(resource: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(resource))
    return {k: v for k, v in out.items() if k not in ("id", "meta")}


async def run_demo(*, data_dir: Path | None, keep: bool) -> int:
    """Run the demo; return the exit code."""
    temp = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="gateway-demo-")) if data_dir is None else data_dir
    port, mllp_port = free_port(), free_port()
    settings = Settings(
        profile="embedded",
        data_dir=root,
        http_port=port,
        mllp_port=mllp_port,
        institution="demo-hospital",
    )
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    task = asyncio.create_task(server.serve())
    ok = True
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for _ in range(200):
                try:
                    if (await client.get("/fhir/metadata")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            print(f"gateway (embedded profile) listening on {base}, data in {root}")
            client.headers["Authorization"] = "Bearer " + await _token_step(client, app)
            bundle = json.loads(FIXTURE.read_text(encoding="utf-8"))
            resp = await client.post(
                "/fhir",
                content=json.dumps(bundle).encode(),
                headers={"content-type": "application/fhir+json"},
            )
            resp.raise_for_status()
            result = resp.json()
            gw = app.state.gateway
            print(
                f"posted a transaction Bundle of {len(bundle['entry'])} resources: "
                f"HTTP {resp.status_code}"
            )
            for sent, entry in zip(bundle["entry"], result["entry"], strict=True):
                response = entry["response"]
                receipt = receipt_of(response)
                location = response["location"]
                rtype, rid = location.split("/")[:2]
                leaf_index = receipt["leafIndex"]
                leaf = (await gw.ledger.leaves(leaf_index, leaf_index + 1))[0]
                from ledger.merkle import leaf_hash

                check_receipt(receipt, leaf_hash(leaf), gw.trusted)
                back = await client.get(f"/fhir/{rtype}/{rid}")
                back.raise_for_status()
                same = _strip_server_fields(back.json()) == _strip_server_fields(
                    _resolve_refs(sent["resource"], result, bundle)
                )
                ok = ok and same
                print(
                    f"  {response['status']:<12} {location:<60} leaf {leaf_index:>3}  "
                    f"proof ok  read back {'identical' if same else 'DIFFERENT'}"
                )
            ok = await _search_step(client, result) and ok
            ok = await _consent_step(client, result, bundle, app.state.gateway) and ok
            ok = await _hl7_step(client, mllp_port, app.state.hl7.options) and ok
            cp = (await client.get("/ledger/checkpoint")).json()
            print(
                f"ledger checkpoint: size {cp['tree_size']} root {cp['root_hash'][:16]}... "
                f"signed by {gw.signer.name}"
            )
    finally:
        server.should_exit = True
        await task
    pkey, master = load_secrets(settings)
    del pkey
    backends = build_backends(settings, master_key=master)
    signer = load_signer(settings)
    report = await audit(
        backends,
        trusted=load_trust(settings, signer),
        origin=settings.ledger_origin,
        signer=signer,
        blobs=True,
    )
    await backends.close()
    ok = ok and report.ok
    print(
        f"gateway verify --blobs: {report.leaves} leaves, {report.records_checked} "
        f"ciphertexts re-hashed: {'OK' if report.ok else 'FAILED'}"
    )
    for p in report.problems:
        print(f"  - {p}")
    print("demo: " + ("all checks passed" if ok else "SOMETHING FAILED"))
    if temp and not keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


async def _token_step(client: httpx.AsyncClient, app: Any) -> str:
    """Register a demo HIS, get its access token with a signed assertion, show a refusal."""
    from joserfc.jwk import ECKey

    from gateway.auth.peer import client_assertion, public_jwks
    from gateway.auth.registry import ClientRecord
    from gateway.auth.tokens import ASSERTION_TYPE

    key = ECKey.generate_key("P-384", private=True, auto_kid=True)
    app.state.auth.registry.put(
        ClientRecord(
            client_id="demo-his",
            institution=app.state.gateway.settings.institution,
            jwks=public_jwks(key),
            scopes=("system/*.crus",),
            purposes=("TREAT",),
        )
    )
    refused = await client.get("/ledger/checkpoint")
    print(f"without a token: HTTP {refused.status_code} ({refused.json()['issue'][0]['code']})")
    token_url = str(client.base_url).rstrip("/") + "/auth/token"
    resp = await client.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(key, "demo-his", token_url),
            "scope": "system/*.crus",
            "purpose_of_use": "TREAT",
        },
    )
    resp.raise_for_status()
    answer = resp.json()
    print(
        f"registered client demo-his (ES384 key); /auth/token granted '{answer['scope']}' "
        f"for {answer['purpose_of_use']}, {answer['expires_in']} s"
    )
    return str(answer["access_token"])


async def _search_step(client: httpx.AsyncClient, result: dict[str, Any]) -> bool:
    """Search what was stored, as an HIS would: the patient's Observations, newest first, two
    to a page, following the ``next`` link; every one is found exactly once."""
    locations = [e["response"]["location"] for e in result["entry"]]
    patient = next(loc.split("/")[1] for loc in locations if loc.startswith("Patient/"))
    stored = {loc.split("/")[1] for loc in locations if loc.startswith("Observation/")}
    found: list[str] = []
    url: str | None = f"/fhir/Observation?patient={patient}&_sort=-date&_count=2"
    pages = 0
    total = None
    while url is not None and pages < 10:
        page = await client.get(url)
        page.raise_for_status()
        bundle = page.json()
        total = bundle.get("total", total)
        found += [e["resource"]["id"] for e in bundle.get("entry", [])]
        url = next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == "next"), None)
        pages += 1
    ok = sorted(found) == sorted(stored) and total == len(stored)
    print(
        f"searched Observation?patient=Patient/{patient[:8]}...&_sort=-date&_count=2: total "
        f"{total}, {len(found)} found over {pages} pages: "
        f"{'each stored result exactly once' if ok else 'NOT what was stored'}"
    )
    return ok


async def _consent_step(
    client: httpx.AsyncClient, result: dict[str, Any], bundle: dict[str, Any], gw: Any
) -> bool:
    """Consent at work: a community clinic's client (another institution) is denied the
    patient's result, exactly as if it did not exist; the patient grants the clinic access for
    treatment; the clinic reads it; the patient's access history shows both decisions, each
    AuditEvent's salted hash matching its ``access`` leaf on the ledger."""
    from gateway.auth.dev import dev_token
    from gateway.consent import ACT_REASON, CONSENT_SCOPE, PARTICIPATION_TYPE, RESOURCE_TYPES

    settings: Settings = gw.settings
    patient = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    master = next(i for i in patient["identifier"] if i["system"] == settings.master_id_system)
    obs = next(
        e["response"]["location"].split("/_history")[0]
        for e in result["entry"]
        if e["response"]["location"].startswith("Observation/")
    )
    clinic = {
        "Authorization": "Bearer "
        + dev_token(
            settings,
            client_id="clinic-his",
            institution="demo-clinic",
            scope="system/*.rs",
            purpose="TREAT",
        )
    }
    own = {
        "Authorization": "Bearer "
        + dev_token(
            settings,
            client_id="demo-portal",
            scope="patient/*.rs patient/Consent.cru",
            patient=master["value"],
        )
    }
    denied = await client.get(f"/fhir/{obs}", headers=clinic)
    missing = await client.get(f"/fhir/{obs}-not-stored", headers=clinic)
    same = denied.status_code == missing.status_code == 404
    print(
        f"clinic demo-clinic reads {obs}: HTTP {denied.status_code} "
        f"({'answered exactly as a missing record' if same else 'NOT hidden'})"
    )
    grant = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": master["system"], "value": master["value"]}},
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {"coding": [{"system": PARTICIPATION_TYPE, "code": "IRCP"}]},
                    "reference": {"reference": "Organization/demo-clinic"},
                }
            ],
            "purpose": [{"system": ACT_REASON, "code": "TREAT"}],
            "class": [{"system": RESOURCE_TYPES, "code": "Observation"}],
        },
    }
    granted = await client.post(
        "/fhir/Consent",
        content=json.dumps(grant).encode(),
        headers={**own, "content-type": "application/fhir+json"},
    )
    print(
        f"the patient grants demo-clinic its Observations for treatment: HTTP "
        f"{granted.status_code}, anchored at leaf {granted.headers.get('x-ledger-leaf-index')}"
    )
    permitted = await client.get(f"/fhir/{obs}", headers=clinic)
    print(f"clinic demo-clinic reads {obs} again: HTTP {permitted.status_code}")
    history = await client.get(
        "/fhir/AuditEvent",
        params={"patient": f"{master['system']}|{master['value']}"},
        headers=own,
    )
    decisions: list[str] = []
    proven = 0
    for entry in history.json().get("entry", []) if history.status_code == 200 else []:
        event = entry["resource"]
        if event["agent"][0]["who"].get("identifier", {}).get("value") != "clinic-his":
            continue
        salt = next(
            base64.b64decode(x["valueBase64Binary"])
            for x in entry["extension"]
            if "valueBase64Binary" in x
        )
        index = int(receipt_of(entry)["leafIndex"])
        leaf = decode_leaf((await gw.ledger.leaves(index, index + 1))[0])
        digest = hashlib.sha256(salt + rfc8785.dumps(event)).hexdigest()
        proven += leaf["sha256"] == digest
        decisions.append(str(leaf["decision"]))
    ok = (
        same
        and granted.status_code == 201
        and permitted.status_code == 200
        and sorted(decisions) == ["deny", "permit"]
        and proven == 2
    )
    print(
        f"the patient's access history: demo-clinic {' then '.join(reversed(decisions))}, "
        f"{proven} of {len(decisions)} AuditEvents match their ledger leaf"
    )
    return ok


async def _hl7_step(client: httpx.AsyncClient, mllp_port: int, options: Any) -> bool:
    """Send a lab result over MLLP as a LIS would; read what it produced back over FHIR."""
    raw = HL7_FIXTURE.read_bytes()
    expected = acks_to_send(read_header(raw), "accept")  # its MSH-15/16 say which
    async with MLLPClient("127.0.0.1", mllp_port, timeout=30) as mllp:
        acks = [await mllp.send(raw)]
        while len(acks) < len(expected):
            acks.append(await mllp.receive())
    codes = [a.split(b"\r")[1].split(b"|")[1].decode() for a in acks]
    print(f"sent {HL7_FIXTURE.name} over MLLP: {' then '.join(codes)} (stored and anchored)")
    ok = codes == list(expected)
    for resource in convert(parse(raw), options=options).resources:
        path = f"{resource['resourceType']}/{resource['id']}"
        back = await client.get(f"/fhir/{path}")
        same = back.status_code == 200 and _strip_server_fields(
            back.json()
        ) == _strip_server_fields(resource)
        ok = ok and same
        print(f"  read back {path:<52} {'identical' if same else 'DIFFERENT'}")
    return ok


def _resolve_refs(resource: dict[str, Any], result: dict[str, Any], bundle: dict[str, Any]) -> Any:
    """The sent resource with urn:uuid references replaced as the server assigned them."""
    mapping = {
        e.get("fullUrl"): r["response"]["location"].rsplit("/_history", 1)[0]
        for e, r in zip(bundle["entry"], result["entry"], strict=True)
    }
    text = json.dumps(resource, ensure_ascii=False)
    for full, loc in mapping.items():
        if full:
            text = text.replace(json.dumps(full), json.dumps(loc))
    return json.loads(text)
