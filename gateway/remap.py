"""``gateway dictionary remap``: re-apply the dictionary in use to records stored with codes an
earlier version could not map (tagged :data:`mappings.dictionary_apply.UNMAPPED_TAG`).

Each such record of this institution is read back (decrypted, checked against its anchor),
the dictionary applied again, and, when it now maps more, stored as a new version through the
record pipeline (sealed, anchored: its leaf names the new dictionary version, whose
``dictionary`` leaf the gateway anchored at start). The tag is removed once nothing is left
unmapped. Maps restricted to one source institution are not applied here (the stored record
does not say which institution sent it; facility-scoped code systems carry it).

Raises BackendError, LedgerError, IntegrityError from the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.pipeline import RecordInput
from gateway.runtime import Gateway
from gateway.terminology_service import is_tagged_unmapped, tag_unmapped, untag_unmapped


@dataclass
class RemapSummary:
    """What a remap did."""

    examined: int = 0
    tagged: int = 0
    remapped: int = 0
    still_unmapped: int = 0


async def remap(gw: Gateway, *, progress: Callable[[int, int], None] | None = None) -> RemapSummary:
    """Re-map this institution's records tagged unmapped with ``gw.terminology`` (see the
    module docstring); ``progress(done, total)`` after each record. Raises as the pipeline."""
    summary = RemapSummary()
    records = {a.record for a in gw.index.all_versions() if a.source == gw.settings.institution}
    anchors = [a for r in sorted(records) if (a := gw.index.latest(r)) is not None]
    anchors.sort(key=lambda a: a.leaf_index)
    total = len(anchors)
    for done, anchor in enumerate(anchors, 1):
        summary.examined += 1
        resource = await gw.pipeline.read_anchor(anchor)
        if is_tagged_unmapped(resource):
            summary.tagged += 1
            applied = gw.terminology.map(untag_unmapped(resource), source="")
            if applied.changed:
                new = applied.resource if not applied.unmapped else tag_unmapped(applied.resource)
                await gw.records.store([RecordInput(new, anchor.patient)])
                summary.remapped += 1
            if applied.unmapped:
                summary.still_unmapped += 1
        if progress is not None:
            progress(done, total)
    return summary
