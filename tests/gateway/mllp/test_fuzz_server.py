"""10,000 mutated and garbage messages at the parser and the MLLP server of a real gateway.

Every one gets an ACK or a clean close, never a crash or a hang, and the gateway still serves
afterwards. Mutations are seeded (reproducible): byte flips, truncations, duplicated and
deleted spans, injected separators and framing bytes, random garbage.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Literal

from gateway.app import create_app
from gateway.hl7.ack import acks_to_send, read_header
from gateway.mllp.client import MLLPClient
from tests.gateway.conftest import settings_for

OUTCOMES: tuple[Literal["accept", "error", "reject"], ...] = ("accept", "error", "reject")

HL7 = Path(__file__).resolve().parents[3] / "fixtures" / "hl7v2"
TOTAL = 10_000
CONNECTIONS = 8


def mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(max(len(data), 1))
        if op == 0 and data:
            data[pos] = rng.randrange(256)
        elif op == 1:
            del data[pos:]
        elif op == 2:
            data[pos:pos] = data[pos : pos + rng.randint(1, 40)]
        elif op == 3:
            del data[pos : pos + rng.randint(1, 40)]
        elif op == 4:
            data[pos:pos] = rng.choice([b"|", b"^", b"~", b"\\", b"&", b"\r", b"\x0b", b"\x1c"])
        elif op == 5:
            data[pos:pos] = rng.randbytes(rng.randint(1, 20))
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 200)))
    return bytes(data).replace(b"\x1c\r", b"\x1c")  # keep one message per frame


async def test_ten_thousand_mutations_each_get_an_ack_or_a_clean_close(tmp_path: Path) -> None:
    seeds = [p.read_bytes() for p in sorted(HL7.glob("*.hl7"))]
    rng = random.Random(20261128)
    messages = [mutate(rng, rng.choice(seeds)) for _ in range(TOTAL)]
    settings = settings_for("embedded", tmp_path / "gw", mllp_enabled=True, mllp_port=0)
    app = create_app(settings)
    answered = closed = silent = 0
    async with app.router.lifespan_context(app):
        port = app.state.mllp.port

        async def worker(chunk: list[bytes]) -> None:
            nonlocal answered, closed, silent
            client = MLLPClient("127.0.0.1", port, timeout=20)
            for raw in chunk:
                try:
                    ack = await client.send(raw)
                except TimeoutError:
                    # Only a message that asked for no acknowledgement at all may go unanswered.
                    header = read_header(raw)
                    assert all(not acks_to_send(header, o) for o in OUTCOMES)
                    silent += 1
                    await client.close()
                    client = MLLPClient("127.0.0.1", port, timeout=20)
                    continue
                except ConnectionError:
                    closed += 1
                    await client.close()
                    client = MLLPClient("127.0.0.1", port, timeout=20)
                    continue
                assert ack.startswith(b"MSH") and b"\rMSA" + ack[3:4] in ack, ack[:200]
                answered += 1
            await client.close()

        await asyncio.wait_for(
            asyncio.gather(*(worker(messages[i::CONNECTIONS]) for i in range(CONNECTIONS))),
            timeout=240,
        )
        assert answered + closed + silent == TOTAL
        assert answered > TOTAL * 0.9
        # Still serving real messages.
        async with MLLPClient("127.0.0.1", port) as c:
            fresh = (HL7 / "adt_a03.hl7").read_bytes().replace(b"|ADT0002|", b"|AFTER-FUZZ|")
            ack = await c.send(fresh)
        assert b"MSA|AA|" in ack or b"MSA|CA|" in ack
