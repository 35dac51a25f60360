"""Views derived from the ledger: which records exist, where their ciphertext is, whose they are.

Every gateway rebuilds these by replaying the log (see :class:`ledger.sequencer.Ledger`), so they
need no storage of their own and agree across nodes. They hold only what the ledger holds:
opaque record ids, pseudonyms, CIDs and hashes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

from ledger.leaves import decode_leaf


class RecordAnchor(NamedTuple):
    """One anchored version of a record.

    A record stored in a container (the collection Bundle of everything one HL7 message
    produced, anchored by one leaf with ``contains``) has the container's ciphertext (``cid``,
    ``sha256``, ``leaf_index``), is sealed under the container's record id and version
    (``container``, ``container_version``: they name the data key and the associated data) and
    is entry ``entry`` of the Bundle. A record stored alone has ``container`` None.
    ``byte_range`` (offset, length) is where the ciphertext lies in block ``cid`` when it was
    stored in a pack with others (:mod:`gateway.packing`); None when it is the whole block.
    """

    record: str
    version: int
    cid: str
    sha256: str
    patient: str
    resource_type: str
    source: str
    time: str
    leaf_index: int
    container: str | None = None
    container_version: int = 0
    entry: int = -1
    byte_range: tuple[int, int] | None = None

    @property
    def where(self) -> str:
        """The ciphertext's place, for messages: its block's CID and byte range if any."""
        if self.byte_range is None:
            return self.cid
        offset, length = self.byte_range
        return f"{self.cid} bytes {offset}+{length}"

    @property
    def sealed_as(self) -> tuple[str, int, str]:
        """(record id, version, resource type) the ciphertext's key and associated data name."""
        if self.container is None:
            return self.record, self.version, self.resource_type
        return self.container, self.container_version, CONTAINER_TYPE


CONTAINER_TYPE = "Bundle"


def anchor_of_leaf(leaf: dict[str, object], leaf_index: int) -> RecordAnchor:
    """The anchor of the ciphertext a decoded ``record`` leaf names (for a container, the
    container itself)."""
    span = leaf.get("range")
    return RecordAnchor(
        record=str(leaf["record"]),
        version=int(str(leaf["version"])),
        cid=str(leaf["cid"]),
        sha256=str(leaf["sha256"]),
        patient=str(leaf["patient"]),
        resource_type=str(leaf["type"]),
        source=str(leaf["source"]),
        time=str(leaf["time"]),
        leaf_index=leaf_index,
        byte_range=(int(span[0]), int(span[1])) if isinstance(span, list) else None,
    )


def anchors_of_leaf(leaf: dict[str, object], leaf_index: int) -> list[RecordAnchor]:
    """The record anchors a decoded ``record`` leaf establishes: itself, or the records it
    contains (a container is not itself a record a reader asks for)."""
    base = anchor_of_leaf(leaf, leaf_index)
    contains = leaf.get("contains")
    if not isinstance(contains, list):
        return [base]
    return [
        RecordAnchor(
            record=str(item["record"]),
            version=int(item["version"]),
            cid=base.cid,
            sha256=base.sha256,
            patient=base.patient,
            resource_type=str(item["type"]),
            source=base.source,
            time=base.time,
            leaf_index=leaf_index,
            container=base.record,
            container_version=base.version,
            entry=position,
            byte_range=base.byte_range,
        )
        for position, item in enumerate(contains)
    ]


class RecordIndex:
    """Latest anchored version of every record, and each patient's records."""

    def __init__(self) -> None:
        self._latest: dict[str, RecordAnchor] = {}
        self._all: list[RecordAnchor] = []
        self._by_patient: dict[str, set[str]] = defaultdict(set)
        self.leaf_kinds: dict[str, int] = defaultdict(int)

    def on_batch(self, first_index: int, leaves: Sequence[bytes], seq: int) -> None:
        """Ledger listener: index the record leaves of an applied batch."""
        for offset, raw in enumerate(leaves):
            leaf = decode_leaf(raw)
            kind = str(leaf["kind"])
            self.leaf_kinds[kind] += 1
            if kind != "record":
                continue
            for anchor in anchors_of_leaf(leaf, first_index + offset):
                self._all.append(anchor)
                current = self._latest.get(anchor.record)
                # Log order decides: a later leaf is the newer version.
                if current is None or anchor.leaf_index > current.leaf_index:
                    self._latest[anchor.record] = anchor
                if anchor.patient:
                    self._by_patient[anchor.patient].add(anchor.record)

    def latest(self, record: str) -> RecordAnchor | None:
        """The latest anchored version of a record, or None."""
        return self._latest.get(record)

    def records_of(self, patient: str) -> list[RecordAnchor]:
        """Every record of a patient (latest versions), in ledger order."""
        anchors = [self._latest[r] for r in self._by_patient.get(patient, ())]
        return sorted(anchors, key=lambda a: a.leaf_index)

    def all_versions(self) -> list[RecordAnchor]:
        """Every anchored version of every record, in ledger order."""
        return list(self._all)

    def __len__(self) -> int:
        return len(self._latest)
