"""The one durable-write routine (ledger/durable.py): atomic, fsynced, directory synced."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ledger.durable import (
    PRIVATE,
    fsync_directory,
    make_directory,
    write_durably,
    write_files_durably,
)
from tests.fakes import Inode, inode, record_fsyncs


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Inode]:
    """The (device, inode) of every descriptor os.fsync is called on from now on."""
    return record_fsyncs(monkeypatch)


def test_write_fsyncs_the_file_then_its_directory(tmp_path: Path, fsynced: list[Inode]) -> None:
    path = tmp_path / "state.json"
    write_durably(path, b"one")
    assert path.read_bytes() == b"one"
    assert fsynced == [inode(path), inode(tmp_path)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_replace_keeps_mode_private_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "signer.json"
    write_durably(path, b"old", mode=PRIVATE)
    write_durably(path, b"new", mode=PRIVATE)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_created_directories_are_synced_into_their_parents(
    tmp_path: Path, fsynced: list[Inode]
) -> None:
    path = tmp_path / "a" / "b" / "f"
    write_durably(path, b"x")
    # a into tmp_path, b into a, then the file, then b (the file's name)
    assert fsynced == [
        inode(tmp_path),
        inode(tmp_path / "a"),
        inode(path),
        inode(tmp_path / "a" / "b"),
    ]
    fsynced.clear()
    make_directory(tmp_path / "a" / "b")  # exists: nothing to sync
    assert fsynced == []


def test_exclusive_never_replaces(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    write_durably(path, b"first", mode=PRIVATE, exclusive=True)
    with pytest.raises(FileExistsError):
        write_durably(path, b"second", mode=PRIVATE, exclusive=True)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]


def test_failed_fsync_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "trust.json"
    write_durably(path, b"old contents")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        write_durably(path, b"new contents that never became durable")
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["trust.json"]


def test_crash_before_the_rename_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """A process killed between writing the temporary file and renaming it (``os._exit`` in
    place of ``os.replace``, so no cleanup runs) leaves the old file exactly as it was."""
    path = tmp_path / "witness-state.json"
    write_durably(path, b"old state")
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from ledger.durable import write_durably
        os.replace = lambda *a: os._exit(9)
        write_durably(Path({str(path)!r}), b"new state " * 1000)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert res.returncode == 9
    assert path.read_bytes() == b"old state"
    leftovers = [p for p in tmp_path.iterdir() if p.name != path.name]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".witness-state.json.")
    write_durably(path, b"next")  # a leftover temporary file is harmless
    assert path.read_bytes() == b"next"


def test_many_files_one_directory_sync_each(tmp_path: Path, fsynced: list[Inode]) -> None:
    (tmp_path / "aa").mkdir()
    (tmp_path / "bb").mkdir()
    files = [
        (tmp_path / "aa" / "1", b"1"),
        (tmp_path / "aa" / "2", b"2"),
        (tmp_path / "bb" / "3", b"3"),
    ]
    write_files_durably(files)
    assert [p.read_bytes() for p, _ in files] == [b"1", b"2", b"3"]
    dirs = [i for i in fsynced if i in {inode(tmp_path / "aa"), inode(tmp_path / "bb")}]
    assert sorted(dirs) == sorted([inode(tmp_path / "aa"), inode(tmp_path / "bb")])
    assert {inode(p) for p, _ in files} <= set(fsynced)


def test_fsync_directory_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_directory(f)
