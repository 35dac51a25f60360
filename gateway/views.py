"""Views derived from the ledger: which records exist, where their ciphertext is, whose they are.

Every gateway rebuilds these by replaying the log (see :class:`ledger.sequencer.Ledger`), so they
need no storage of their own and agree across nodes. They hold only what the ledger holds:
opaque record ids, pseudonyms, CIDs and hashes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

from ledger.leaves import RecordLeaf, decode_leaf


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
    deleted: bool = False

    @property
    def where(self) -> str:
        """The ciphertext's place, for messages: its block's CID and byte range if any."""
        if self.byte_range is None:
            return self.cid
        offset, length = self.byte_range
        return f"{self.cid} bytes {offset}+{length}"

    @property
    def sealed_as(self) -> tuple[str, str]:
        """(record id, resource type) the ciphertext's associated data names."""
        if self.container is None:
            return self.record, self.resource_type
        return self.container, CONTAINER_TYPE


CONTAINER_TYPE = "Bundle"
#: The ``type`` of the ``record`` leaf that anchors a container of the access log's sealed
#: AuditEvents (gateway/access_log.py): not a clinical record, so not in the record index.
ACCESS_LOG_TYPE = "AuditEvent"


def anchor_of_leaf(leaf: RecordLeaf, leaf_index: int) -> RecordAnchor:
    """The anchor of the ciphertext a ``record`` leaf names (for a container, the container
    itself)."""
    return RecordAnchor(
        record=leaf.record,
        version=leaf.version,
        cid=leaf.cid,
        sha256=leaf.sha256,
        patient=leaf.patient,
        resource_type=leaf.type,
        source=leaf.source,
        time=leaf.time,
        leaf_index=leaf_index,
        byte_range=leaf.byte_range,
        deleted=leaf.deleted,
    )


def anchors_of_leaf(leaf: RecordLeaf, leaf_index: int) -> list[RecordAnchor]:
    """The record anchors a ``record`` leaf establishes: itself, or the records it contains
    (a container is not itself a record a reader asks for)."""
    base = anchor_of_leaf(leaf, leaf_index)
    if leaf.contains is None:
        return [base]
    return [
        RecordAnchor(
            record=member.record,
            version=member.version,
            cid=base.cid,
            sha256=base.sha256,
            patient=base.patient,
            resource_type=member.type,
            source=base.source,
            time=base.time,
            leaf_index=leaf_index,
            container=base.record,
            container_version=base.version,
            entry=position,
            byte_range=base.byte_range,
        )
        for position, member in enumerate(leaf.contains)
    ]


class PatientLinks:
    """Which pseudonyms name the same person, from the ledger's ``link`` leaves (union-find).

    A link is anchored when a patient first known by a provisional pseudonym (no master
    identifier) turns out to be someone known by another (the master identifier arrived, an
    HL7 A40 merge, a FHIR ``Patient.link``). Reads, consent and erasure of one pseudonym cover
    every pseudonym linked to it. Raises nothing.
    """

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}
        self._members: dict[str, set[str]] = {}

    def _root(self, p: str) -> str:
        parent = self._parent.get(p, p)
        while parent != p:
            grand = self._parent.get(parent, parent)
            self._parent[p] = grand
            p, parent = parent, grand
        return p

    def add(self, a: str, b: str) -> None:
        """Record that ``a`` and ``b`` name the same person."""
        ra, rb = self._root(a), self._root(b)
        if ra == rb:
            return
        self._parent[ra] = rb
        merged = self._members.pop(ra, {ra}) | self._members.get(rb, {rb})
        self._members[rb] = merged

    def linked(self, p: str, q: str) -> bool:
        """Whether ``p`` and ``q`` name the same person."""
        return self._root(p) == self._root(q)

    def all_of(self, p: str) -> frozenset[str]:
        """Every pseudonym of the person ``p`` names (``p`` itself included)."""
        return frozenset(self._members.get(self._root(p), {p}))

    def __len__(self) -> int:
        return sum(len(m) for m in self._members.values())


class RecordIndex:
    """Every anchored version of every record, the latest of each, each patient's records,
    and the links between patients' pseudonyms."""

    def __init__(self) -> None:
        self._versions: dict[str, list[RecordAnchor]] = {}
        self._all: list[RecordAnchor] = []
        self._by_patient: dict[str, set[str]] = defaultdict(set)
        self._by_type: dict[tuple[str, str], list[RecordAnchor]] = defaultdict(list)
        self.links = PatientLinks()
        self.leaf_kinds: dict[str, int] = defaultdict(int)

    def on_batch(self, first_index: int, leaves: Sequence[bytes], seq: int) -> None:
        """Ledger listener: index the record and link leaves of an applied batch."""
        for offset, raw in enumerate(leaves):
            leaf = decode_leaf(raw)
            kind = str(leaf["kind"])
            if kind == "record" and leaf["type"] == ACCESS_LOG_TYPE and "contains" in leaf:
                self.leaf_kinds["access-log"] += 1  # the access log's, not a clinical record
                continue
            self.leaf_kinds[kind] += 1
            if kind == "link":
                self.links.add(str(leaf["from"]), str(leaf["to"]))
                continue
            if kind != "record":
                continue
            for anchor in anchors_of_leaf(RecordLeaf.from_leaf(leaf), first_index + offset):
                self._all.append(anchor)
                # Log order decides: a later leaf is the newer version (the versions a
                # writer takes when its batch is formed follow the same order).
                self._versions.setdefault(anchor.record, []).append(anchor)
                self._by_type[(anchor.source, anchor.resource_type)].append(anchor)
                if anchor.patient:
                    self._by_patient[anchor.patient].add(anchor.record)

    def latest(self, record: str) -> RecordAnchor | None:
        """The latest anchored version of a record, or None."""
        versions = self._versions.get(record)
        return versions[-1] if versions else None

    def version(self, record: str, version: int) -> RecordAnchor | None:
        """Version ``version`` of a record, or None."""
        for anchor in reversed(self._versions.get(record, ())):
            if anchor.version == version:
                return anchor
        return None

    def history(self, record: str) -> list[RecordAnchor]:
        """Every anchored version of a record, oldest first."""
        return list(self._versions.get(record, ()))

    def versions_of_type(self, resource_type: str, custodian: str) -> list[RecordAnchor]:
        """Every anchored version of every record of a type stored by ``custodian``, in
        ledger order."""
        return list(self._by_type.get((custodian, resource_type), ()))

    def has_patient(self, patient: str) -> bool:
        """Whether any record is filed under this pseudonym."""
        return patient in self._by_patient

    def records_of(self, patient: str) -> list[RecordAnchor]:
        """Every record of a patient (latest versions), under every pseudonym linked to it,
        in ledger order."""
        anchors = [
            self._versions[r][-1]
            for p in self.links.all_of(patient)
            for r in self._by_patient.get(p, ())
        ]
        return sorted(anchors, key=lambda a: a.leaf_index)

    def all_versions(self) -> list[RecordAnchor]:
        """Every anchored version of every record, in ledger order."""
        return list(self._all)

    def __len__(self) -> int:
        return len(self._versions)
