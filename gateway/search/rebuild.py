"""``gateway reindex``: rebuild the search index of this institution from the ledger and the
blobs, with a progress bar.

Raises :class:`gateway.errors.GatewayError` subclasses (BackendError, IntegrityError,
KeyDestroyedError) and :class:`ledger.errors.LedgerError`.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from gateway.config import Settings
from gateway.runtime import Gateway
from gateway.search.index import open_index
from gateway.search.service import SearchService


async def run_reindex(settings: Settings, *, progress: bool = False) -> int:
    """Start the gateway (replaying the ledger), clear this institution's index rows and index
    every version of its records again, in ledger order. Returns how many versions were
    indexed. Raises as the module says."""
    gw = Gateway(settings)
    service = SearchService(
        records=gw.records,
        index=open_index(
            settings.profile, data_dir=settings.data_dir, postgres_url=settings.postgres_url
        ),
        policy=gw.records.policy,
        pseudonym_key=gw.pseudonym_key,
        institution=settings.institution,
        default_tz=settings.default_tz,
    )
    await gw.start()
    try:
        await service.start()
        try:
            total = sum(1 for a in gw.index.all_versions() if a.source == settings.institution)
            if not progress:
                return await service.reindex()
            with typer.progressbar(length=total, label="reindex", file=None) as bar:
                last = [0]

                def step(done: int, _total: int) -> None:
                    bar.update(done - last[0])
                    last[0] = done

                report: Callable[[int, int], None] = step
                return await service.reindex(report)
        finally:
            await service.stop()
    finally:
        await gw.stop()
