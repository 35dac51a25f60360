"""Patient identity (gateway/identity.py): one pseudonym per person, whatever the input path."""

from __future__ import annotations

import pytest

from gateway.crypto import pseudonym
from gateway.errors import InvalidInputError
from gateway.identity import fhir_identifiers, identifier_system, patient_identity
from mappings.v2.datatypes import facility_system

KEY = b"k" * 32
MASTER = "urn:alliance:resident-health-card"


def test_the_master_identifier_decides_whoever_sends_it_and_wherever_it_stands() -> None:
    a = patient_identity(
        KEY, [("urn:oid:1.2.3", "MRN1"), (MASTER, "H1")], master_system=MASTER, facility="HOSPA"
    )
    b = patient_identity(KEY, [(MASTER, "H1")], master_system=MASTER, facility="CLINIC9")
    assert a.pseudonym == b.pseudonym == pseudonym(KEY, MASTER, "H1")
    assert not a.provisional and not b.provisional
    assert a.aliases == (pseudonym(KEY, "urn:oid:1.2.3", "MRN1"),)


def test_a_master_recognised_by_the_caller_counts_as_the_master() -> None:
    # HL7: an assigning authority whose name is the master system.
    got = patient_identity(
        KEY,
        [("urn:alliance:authority:HC", "H1")],
        master_system=MASTER,
        facility="F",
        master=("urn:alliance:authority:HC", "H1"),
    )
    assert got.pseudonym == pseudonym(KEY, MASTER, "H1") and not got.provisional


def test_without_the_master_the_pseudonym_is_provisional_and_facility_scoped() -> None:
    got = patient_identity(KEY, [(None, "123")], master_system=MASTER, facility="CLINIC9")
    assert got.provisional
    assert got.pseudonym == pseudonym(KEY, facility_system("CLINIC9"), "123")
    other = patient_identity(KEY, [(None, "123")], master_system=MASTER, facility="HOSPA")
    assert other.pseudonym != got.pseudonym  # "123" means someone else at another facility
    assert identifier_system("urn:oid:9", facility="X") == "urn:oid:9"


def test_no_identifier_at_all_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="no identifier"):
        patient_identity(KEY, [(MASTER, "")], master_system=MASTER, facility="F")


def test_fhir_identifiers_reads_patients_and_references() -> None:
    patient = {"identifier": [{"system": MASTER, "value": "H1"}, {"value": "7"}, {"system": "x"}]}
    assert fhir_identifiers(patient) == [(MASTER, "H1"), (None, "7")]
    assert fhir_identifiers({"identifier": {"system": MASTER, "value": "H1"}}) == [(MASTER, "H1")]
    assert fhir_identifiers({"reference": "Patient/1"}) == []
