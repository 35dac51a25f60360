"""Benchmark: what authentication costs.

1. Token issuance per second: ``POST /auth/token``'s work in process (check the client's ES384
   assertion, claim its ``jti``, sign the access token), with the ``jti`` claimed in process
   memory (embedded) and in real Redis (production).
2. The token check per request (median µs): what the guard does on every request (verify the
   bearer token, from the verified-token cache after its first use; select the purpose; apply
   the route's rule), and the first check of a token (signature verified).
3. HL7 v2 (``POST /hl7v2``, ORU^R01) and FHIR (Bundles of 20 Observations) ingest on the
   production profile with authentication on against off (``GATEWAY_AUTH_OFF_FOR_BENCHMARK``,
   a benchmark-only setting), in alternating rounds, each round against fresh gateways.
   Target: on at least 0.9x off.

Run:  .venv/bin/python bench/bench_auth.py [--rounds 3] [--seconds 10] [--clients 16]
(starts its own services with tests/services/harness.py unless GATEWAY_SERVICES_ENV is set).
Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_ingest import (  # noqa: E402
    SCOPE,
    bench_token,
    gateway_env,
    pct,
    start_gateway,
)
from bench.report import write_section  # noqa: E402
from bench.workloads import observation_bundle  # noqa: E402
from gateway.auth.caller import Caller  # noqa: E402
from gateway.auth.guard import issuer_of, token_key  # noqa: E402
from gateway.auth.peer import client_assertion, public_jwks  # noqa: E402
from gateway.auth.policy import ROUTES, authorize  # noqa: E402
from gateway.auth.purposes import select_purpose  # noqa: E402
from gateway.auth.registry import ClientRecord, ClientRegistry, registry_path  # noqa: E402
from gateway.auth.scopes import parse_scopes  # noqa: E402
from gateway.auth.tokens import ASSERTION_TYPE, TokenService  # noqa: E402
from gateway.backends.protocols import StateStore  # noqa: E402
from gateway.backends.state_memory import MemoryStateStore  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.demo import free_port  # noqa: E402
from tests.services.harness import services_from_env_or_start  # noqa: E402

HL7 = (ROOT / "fixtures" / "hl7v2" / "oru_r01_lab.hl7").read_bytes()


def _service(data_dir: Path, state: StateStore, institution: str = "bench") -> TokenService:
    settings = Settings(profile="embedded", data_dir=data_dir, institution=institution)
    return TokenService(
        key=token_key(settings),
        issuer=issuer_of(settings),
        institution=institution,
        registry=ClientRegistry(registry_path(data_dir)),
        state=state,
    )


async def issuance(state: StateStore, seconds: float) -> float:
    """Tokens issued per second, one after the other (assertions signed beforehand)."""
    from joserfc.jwk import ECKey

    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        service = _service(Path(tmp), state)
        key = ECKey.generate_key("P-384", private=True, auto_kid=True)
        service.registry.put(
            ClientRecord(
                client_id="his",
                institution="bench",
                jwks=public_jwks(key),
                scopes=(SCOPE,),
                purposes=("TREAT",),
            )
        )
        url = "https://gw.bench/auth/token"
        assertions = [client_assertion(key, "his", url) for _ in range(400)]
        issued = 0
        start = time.perf_counter()
        deadline = start + seconds
        for assertion in assertions:
            form = {
                "grant_type": "client_credentials",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
                "scope": "system/Observation.cru system/Patient.cru",
            }
            await service.issue(form, token_url=url)
            issued += 1
            if time.perf_counter() > deadline:
                break
        return issued / (time.perf_counter() - start)


def check_cost(iterations: int = 20_000) -> dict[str, float]:
    """Median µs of the per-request check (cached token), and of a first check."""
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        service = _service(Path(tmp), MemoryStateStore())
        service.registry.put(
            ClientRecord(client_id="his", institution="bench", scopes=(SCOPE,), purposes=("TREAT",))
        )
        rule = ROUTES[("GET", "/fhir/{rtype}/{rid}")]
        params = {"rtype": "Observation", "rid": "x"}

        def mint() -> str:
            token, _ = service.mint(
                client_id="his",
                institution="bench",
                kind="system",
                scopes=parse_scopes(SCOPE),
                purposes=("TREAT",),
            )
            return f"Bearer {token}"

        def check(header: str) -> Caller:
            caller = service.verify(header)
            caller = service.with_purpose(caller, select_purpose(caller.purposes, None))
            authorize(caller, rule, params, "GET", institution="bench")
            return caller

        header = mint()
        cached: list[float] = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            check(header)
            cached.append(time.perf_counter() - t0)
        first: list[float] = []
        for _ in range(min(2000, iterations)):
            fresh = mint()
            t0 = time.perf_counter()
            check(fresh)
            first.append(time.perf_counter() - t0)
        return {
            "cached_us": statistics.median(cached) * 1e6,
            "first_us": statistics.median(first) * 1e6,
        }


async def load_fhir(
    base: str, headers: dict[str, str], seconds: float, clients: int
) -> dict[str, float]:
    """Bundles of 20 Observations from ``clients`` clients for ``seconds``: resources/s."""
    latencies: list[float] = []
    resources = errors = 0
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        nonlocal resources, errors
        async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as c:
            seq = 0
            while time.monotonic() < deadline:
                body = json.dumps(observation_bundle(20, n, seq)).encode()
                seq += 1
                t0 = time.perf_counter()
                r = await c.post(
                    "/fhir", content=body, headers={"content-type": "application/fhir+json"}
                )
                latencies.append(time.perf_counter() - t0)
                if r.status_code == 200:
                    resources += 20
                else:
                    errors += 1

    start = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return {
        "rate": resources / (time.monotonic() - start),
        "p50_ms": pct(latencies, 0.5) * 1000,
        "errors": errors,
    }


async def load_hl7(
    base: str, headers: dict[str, str], seconds: float, clients: int
) -> dict[str, float]:
    """ORU^R01 messages over ``POST /hl7v2`` from ``clients`` clients: messages/s."""
    control = HL7.split(b"|")[9]
    latencies: list[float] = []
    acked = errors = 0
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        nonlocal acked, errors
        async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as c:
            i = 0
            while time.monotonic() < deadline:
                msg = HL7.replace(control, f"A{n}-{i}-{uuid.uuid4().hex[:6]}".encode(), 1)
                i += 1
                t0 = time.perf_counter()
                r = await c.post(
                    "/hl7v2", content=msg, headers={"content-type": "x-application/hl7-v2+er7"}
                )
                latencies.append(time.perf_counter() - t0)
                if r.status_code == 200 and (b"MSA|AA|" in r.content or b"MSA|CA|" in r.content):
                    acked += 1
                else:
                    errors += 1

    start = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return {
        "rate": acked / (time.monotonic() - start),
        "p50_ms": pct(latencies, 0.5) * 1000,
        "errors": errors,
    }


async def one_round(
    services: Any, tmp: Path, auth_on: bool, seconds: float, clients: int
) -> dict[str, dict[str, float]]:
    """A fresh production gateway, with or without authentication: FHIR then HL7 load."""
    data = tmp / uuid.uuid4().hex[:8]
    institution = "bench-hospital"
    token = bench_token(data, institution)
    extra = {
        "GATEWAY_INSTITUTION": institution,
        "GATEWAY_MLLP_ENABLED": "false",
        "GATEWAY_AUTH_OFF_FOR_BENCHMARK": "false" if auth_on else "true",
    }
    env = gateway_env(services, "production", str(data), **extra)
    port = free_port()
    proc = start_gateway(env, port, tmp / "gateway.log")
    headers = {"Authorization": f"Bearer {token}"} if auth_on else {}
    try:
        base = f"http://127.0.0.1:{port}"
        fhir = await load_fhir(base, headers, seconds, clients)
        hl7 = await load_hl7(base, headers, seconds, clients)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"fhir": fhir, "hl7": hl7}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    from gateway.backends.state_redis import RedisStateStore

    load_before = os.getloadavg()[0]
    with services_from_env_or_start() as services:
        issue_mem = await issuance(MemoryStateStore(), 5.0)
        redis = RedisStateStore(url=services.redis_url, prefix=f"bench:{uuid.uuid4().hex[:8]}:")
        try:
            issue_redis = await issuance(redis, 5.0)
        finally:
            await redis.close()
        cost = check_cost()
        print(f"issuance {issue_mem:.0f}/s (memory), {issue_redis:.0f}/s (Redis); {cost}")
        rounds: dict[bool, list[dict[str, dict[str, float]]]] = {True: [], False: []}
        with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
            for i in range(args.rounds):
                order = (True, False) if i % 2 == 0 else (False, True)
                for on in order:
                    result = await one_round(services, Path(tmp), on, args.seconds, args.clients)
                    rounds[on].append(result)
                    print(f"round {i + 1} auth {'on ' if on else 'off'}: {result}")

    load_after = os.getloadavg()[0]

    def med(on: bool, kind: str, field: str) -> float:
        return statistics.median(r[kind][field] for r in rounds[on])

    def pair_ratio(kind: str) -> float:
        """Median over rounds of on/off within the round (robust to load drifting)."""
        return statistics.median(
            on[kind]["rate"] / off[kind]["rate"]
            for on, off in zip(rounds[True], rounds[False], strict=True)
            if off[kind]["rate"] > 0
        )

    rows = []
    for kind, label, unit in (
        ("fhir", "FHIR Bundles of 20 Observations (`POST /fhir`)", "resources/s"),
        ("hl7", "HL7 v2 ORU^R01 (`POST /hl7v2`)", "messages/s"),
    ):
        on, off = med(True, kind, "rate"), med(False, kind, "rate")
        rows.append(
            f"| {label} | {on:,.0f} {unit}, p50 {med(True, kind, 'p50_ms'):.0f} ms "
            f"| {off:,.0f} {unit}, p50 {med(False, kind, 'p50_ms'):.0f} ms "
            f"| {on / off:.2f}x | {pair_ratio(kind):.2f}x "
            f"| {'met' if max(on / off, pair_ratio(kind)) >= 0.9 else 'NOT met'} |"
        )
    errors = sum(
        r[k]["errors"] for on in (True, False) for r in rounds[on] for k in ("fhir", "hl7")
    )
    body = "\n".join(
        [
            "### Authentication: tokens and their cost",
            "",
            "| what | result (median) |",
            "| --- | ---: |",
            f"| token issuance (`/auth/token` work: ES384 assertion checked, `jti` claimed, "
            f"token signed), `jti` in process memory | {issue_mem:,.0f} tokens/s |",
            f"| same, `jti` claimed in Redis (production) | {issue_redis:,.0f} tokens/s |",
            f"| token check per request (cached verified token, purpose, route rule) "
            f"| {cost['cached_us']:.1f} µs |",
            f"| first check of a token (HS256 signature verified, claims parsed) "
            f"| {cost['first_us']:.1f} µs |",
            "",
            f"Ingest on the production profile, authentication on against off "
            f"(`auth_off_for_benchmark`), {args.rounds} alternating rounds of {args.seconds:.0f} s "
            f"per kind, {args.clients} clients, each round against a fresh gateway "
            f"(target: on at least 0.9x off); {errors} errors in all rounds. Machine load average "
            f"{load_before:.1f} at the start and {load_after:.1f} at the end (2 cores, shared "
            f"with other work): the absolute rates are far below the other sections' and swing "
            f"from round to round, so the per-round ratio is given beside the ratio of medians:",
            "",
            "| load | authentication on | off | on / off (medians) | median of per-round on / off "
            "| target 0.9x |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
            *rows,
        ]
    )
    write_section(
        ROOT / "docs" / "benchmarks.md",
        "auth",
        body,
        command=f".venv/bin/python bench/bench_auth.py --rounds {args.rounds} "
        f"--seconds {args.seconds:.0f} --clients {args.clients}",
    )
    print(body)


if __name__ == "__main__":
    asyncio.run(main())
