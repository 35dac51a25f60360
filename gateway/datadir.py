"""The layout of a gateway's data directory, in one place.

::

    <root>/
      secrets/pseudonym.key, secrets/master.key    32-byte secrets in hex, mode 0600 (when
                                                   not given in the settings)
      keys/signer.json                             this institution's checkpoint signer, 0600
      keys/keystore.jsonl                          wrapped keys (embedded profile), 0600
      trust.json                                   trusted institutions' public keys (default
                                                   trust file)
      blocks/<last two CID characters>/<CID>       ciphertext blocks (embedded profile)
      ledger/log.bin                               the ledger's log (embedded profile)
      ledger/tree-<profile>/                       the stored Merkle tree (a cache of the log)
      ledger/witness-state.json                    what this gateway's witness last cosigned
      ledger/final-checkpoint-<profile>.json       the last checkpoint the witnesses finalised
      audit/break-glass.jsonl                      break-glass accesses awaiting the privacy
                                                   officer's review (ids and times only), 0600

Runtime, ``gateway verify``, the audit, the demo, tests and benchmarks take their paths from a
:class:`DataDir`, never from path literals. Raises nothing: it only names paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.config import Settings


@dataclass(frozen=True, slots=True)
class DataDir:
    """The paths under a data directory ``root`` for a ``profile`` (embedded, production)."""

    root: Path
    profile: str

    @classmethod
    def of(cls, settings: Settings) -> DataDir:
        """The data directory the settings name. Raises nothing."""
        return cls(Path(settings.data_dir), settings.profile)

    @property
    def secrets(self) -> Path:
        """Directory of the secret files."""
        return self.root / "secrets"

    def secret(self, name: str) -> Path:
        """The file of secret ``name`` (``pseudonym``, ``master``)."""
        return self.secrets / f"{name}.key"

    @property
    def pseudonym_key(self) -> Path:
        """The alliance pseudonym key file (when not in the settings)."""
        return self.secret("pseudonym")

    @property
    def master_key(self) -> Path:
        """The master key file (when not in the settings)."""
        return self.secret("master")

    @property
    def keys(self) -> Path:
        """Directory of the signer and the file keystore."""
        return self.root / "keys"

    @property
    def signer(self) -> Path:
        """This institution's checkpoint signer (private keys)."""
        return self.keys / "signer.json"

    @property
    def keystore(self) -> Path:
        """The embedded profile's keystore of wrapped keys."""
        return self.keys / "keystore.jsonl"

    @property
    def trust(self) -> Path:
        """The default trust file (used when the settings name none)."""
        return self.root / "trust.json"

    @property
    def blocks(self) -> Path:
        """The embedded profile's blob directory."""
        return self.root / "blocks"

    @property
    def ledger(self) -> Path:
        """Directory of the ledger's files."""
        return self.root / "ledger"

    @property
    def log(self) -> Path:
        """The embedded profile's ledger log."""
        return self.ledger / "log.bin"

    @property
    def tree(self) -> Path:
        """The stored Merkle tree of this profile's ledger."""
        return self.ledger / f"tree-{self.profile}"

    @property
    def witness_state(self) -> Path:
        """The witness's state (the checkpoint it last cosigned)."""
        return self.ledger / "witness-state.json"

    @property
    def break_glass_queue(self) -> Path:
        """The privacy officer's queue of break-glass accesses to review."""
        return self.root / "audit" / "break-glass.jsonl"

    @property
    def final_checkpoint(self) -> Path:
        """The last checkpoint of this profile's ledger the witnesses finalised."""
        return self.ledger / f"final-checkpoint-{self.profile}.json"
