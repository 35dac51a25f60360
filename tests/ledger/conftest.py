"""Shared fixtures of the ledger tests: signers are slow-ish to generate, so made once."""

from __future__ import annotations

import pytest

from ledger.keys import Signer, TrustedKeys


@pytest.fixture(scope="session")
def signers() -> dict[str, Signer]:
    return {name: Signer.generate(name) for name in ("hosp-a", "hosp-b", "hosp-c", "hosp-d")}


@pytest.fixture(scope="session")
def trusted(signers: dict[str, Signer]) -> TrustedKeys:
    return TrustedKeys.of(signers.values())
