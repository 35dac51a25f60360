"""The data directory's layout (gateway/datadir.py) and the durability of the files in it.

The secret files, the signer and the trust file are written through ledger.durable: each is
fsynced, then its directory, before the gateway uses it.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gateway.backends.blobs_local import LocalBlobStore
from gateway.backends.keys_file import FileKeyStore
from gateway.backends.log_file import FileLog
from gateway.config import default_settings_for_tests
from gateway.datadir import DataDir
from gateway.errors import ConfigurationError
from gateway.runtime import build_backends, load_secrets, load_signer, load_trust
from tests.fakes import Inode, inode, record_fsyncs


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Inode]:
    """The (device, inode) of every descriptor os.fsync is called on from now on."""
    return record_fsyncs(monkeypatch)


def test_layout_names_every_file() -> None:
    d = DataDir(Path("/data"), "production")
    assert d.pseudonym_key == Path("/data/secrets/pseudonym.key")
    assert d.master_key == Path("/data/secrets/master.key")
    assert d.signer == Path("/data/keys/signer.json")
    assert d.keystore == Path("/data/keys/keystore.jsonl")
    assert d.log == Path("/data/ledger/log.bin")
    assert d.tree == Path("/data/ledger/tree-production")
    assert d.witness_state == Path("/data/ledger/witness-state.json")
    assert d.final_checkpoint == Path("/data/ledger/final-checkpoint-production.json")
    assert d.trust == Path("/data/trust.json")
    assert d.blocks == Path("/data/blocks")


def test_secrets_signer_and_trust_are_fsynced_where_the_layout_says(
    tmp_path: Path, fsynced: list[Inode]
) -> None:
    settings = default_settings_for_tests(tmp_path, pseudonym_key=None, master_key=None)
    d = DataDir.of(settings)
    pkey, master = load_secrets(settings)
    signer = load_signer(settings)
    load_trust(settings, signer)
    for path in (d.pseudonym_key, d.master_key, d.signer, d.trust):
        assert inode(path) in fsynced, f"{path} was not fsynced"
    for directory in (d.secrets, d.keys, d.root):
        assert inode(directory) in fsynced, f"{directory} was not fsynced"
    for path in (d.pseudonym_key, d.master_key, d.signer):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bytes.fromhex(d.pseudonym_key.read_text()) == pkey
    assert bytes.fromhex(d.master_key.read_text()) == master
    assert load_secrets(settings) == (pkey, master)  # read back, not replaced


def test_a_damaged_secret_file_is_a_configuration_error(tmp_path: Path) -> None:
    settings = default_settings_for_tests(tmp_path, pseudonym_key=None, master_key=None)
    d = DataDir.of(settings)
    d.secrets.mkdir(parents=True)
    d.pseudonym_key.write_text("not hex\n")
    with pytest.raises(ConfigurationError, match="32 bytes in hex"):
        load_secrets(settings)
    d.pseudonym_key.write_text("ab" * 16 + "\n")
    with pytest.raises(ConfigurationError, match="32 bytes in hex"):
        load_secrets(settings)


def test_embedded_backends_use_the_layout(tmp_path: Path) -> None:
    settings = default_settings_for_tests(tmp_path)
    d = DataDir.of(settings)
    backends = build_backends(settings, master_key=bytes(32))
    assert isinstance(backends.blobs, LocalBlobStore) and backends.blobs.directory == d.blocks
    assert isinstance(backends.log, FileLog) and backends.log.path == d.log
    assert isinstance(backends.keys, FileKeyStore) and backends.keys.path == d.keystore
