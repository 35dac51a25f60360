"""FHIR search: the search index (SQLite embedded, PostgreSQL production) and the search service.

The index is a derived view, rebuilt from the ledger and the blobs by ``gateway reindex``. It
holds what a query and an access policy need and nothing a clinician reads: the custodian,
opaque record ids, resource type and id, version, patient pseudonym, ``system|code`` tokens,
identifiers as HMAC pseudonyms, clinical date ranges, status and references. Names,
addresses, telecoms and identifiers are never stored in clear; a search returns resources by
reading them through :class:`gateway.records.RecordService` (decrypted, checked against their
anchors, and checked by the access seam).

Raises :class:`gateway.errors.InvalidInputError` (malformed searches, bad cursors) and
:class:`gateway.errors.BackendError` (the index store failed).
"""

from gateway.search.extract import IndexEntry
from gateway.search.index import SearchIndex, open_index
from gateway.search.params import search_params_of
from gateway.search.service import SearchService

__all__ = ["IndexEntry", "SearchIndex", "SearchService", "open_index", "search_params_of"]
