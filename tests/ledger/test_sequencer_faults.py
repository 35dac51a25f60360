"""The ledger's writer under log failures: lost acknowledgements, outages, give-up.

Uses the in-memory log of tests/fakes.py (LogBackend semantics) with injected failures; the
same scenarios against a real 3-node JetStream cluster are in tests/services/test_ledger_faults.py.
"""

from __future__ import annotations

import pytest

from gateway.errors import BackendError
from ledger.sequencer import LedgerUnavailableError
from tests.fakes import FlakyLog, MemoryLog
from tests.ledger.test_sequencer import make


async def test_outage_shorter_than_the_window_is_absorbed() -> None:
    log = FlakyLog()
    ledger = make(log, unavailable_window=5.0)
    await ledger.start(follow_interval=None)
    log.fail = 3
    (res,) = await ledger.append([b"a"])
    assert res.index == 0 and len(log.messages) == 1 and log.calls == 4
    await ledger.stop()


async def test_an_error_that_is_not_unavailability_is_not_retried() -> None:
    log = FlakyLog()
    ledger = make(log, unavailable_window=5.0)
    await ledger.start(follow_interval=None)
    log.fail, log.final = 3, True
    with pytest.raises(BackendError, match="refused"):
        await ledger.append([b"a"])
    assert log.calls == 1 and not log.messages and ledger.size == 0
    log.fail = 0
    (res,) = await ledger.append([b"b"])
    assert res.index == 0
    await ledger.stop()


async def test_lost_acknowledgement_does_not_duplicate_the_batch() -> None:
    log = FlakyLog()
    ledger = make(log, unavailable_window=5.0)
    await ledger.start(follow_interval=None)
    log.fail, log.land = 1, True
    (res,) = await ledger.append([b"once"])
    assert res.index == 0
    assert len(log.messages) == 1, "the retried batch was appended twice"
    (nxt,) = await ledger.append([b"next"])
    assert nxt.index == 1 and ledger.size == 2
    replay = make(log)
    await replay.catch_up()
    assert replay.size == 2 and replay.tree.root() == ledger.tree.root()
    await ledger.stop()


async def test_long_outage_fails_clearly_and_nothing_is_half_applied() -> None:
    log = FlakyLog()
    ledger = make(log, unavailable_window=0.3)
    await ledger.start(follow_interval=None)
    await ledger.append([b"before"])
    log.fail = 10**6
    with pytest.raises(LedgerUnavailableError, match="did not accept batch") as info:
        await ledger.append([b"lost"])
    assert "nothing in it was acknowledged" in str(info.value)
    assert ledger.size == 1 and ledger.tree.size == 1
    log.fail = 0
    (res,) = await ledger.append([b"after"])
    assert res.index == 1 and ledger.size == 2
    await ledger.stop()


async def test_identical_leaves_in_a_later_batch_are_not_mistaken_for_a_retry() -> None:
    """Two byte-identical events (e.g. the same access twice in one second) are two leaves."""
    log = MemoryLog()
    ledger = make(log)
    await ledger.start(follow_interval=None)
    (first,) = await ledger.append([b"same event"])
    (second,) = await ledger.append([b"same event"])
    assert (first.index, second.index) == (0, 1)
    assert len(log.messages) == 2 and len(log.ids) == 2
    replay = make(log)
    await replay.catch_up()
    assert replay.size == 2
    await ledger.stop()
