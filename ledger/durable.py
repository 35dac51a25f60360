"""Durable file writes: the one routine everything that writes a file goes through.

A file that must survive a crash whole or not at all is written by :func:`write_durably`:
the bytes go to a temporary file in the same directory, which is fsynced, then renamed over
the target (or, for ``exclusive=True``, hard-linked to it, which fails if the target exists),
and finally the directory is fsynced so that the new name is on disk too; directories it
creates are synced into their parents (:func:`make_directory`). A crash at any point
leaves either the old file or the new one, never a torn one; a leftover temporary file is named
``.<name>.<random>`` and is never read. :func:`write_files_durably` does the same for many
files at once and fsyncs each directory once (the local blob store's batches).

Append-only files (the file log, the keystore, the stored tree's levels) keep their own
append-and-fsync logic, but sync their directory with :func:`fsync_directory` when they create
a file, since a new file's name is durable only once its directory is, and create their
directories with :func:`make_directory`.

This module lives in ``ledger/`` (the lowest package, which the gateway already depends on and
whose stored tree writes files) so that ``ledger`` never imports ``gateway``. Every function
raises OSError, which callers translate into their package's error at their boundary.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

#: Mode of files only the gateway's user may read (secrets, private keys, wrapped keys).
PRIVATE = 0o600
#: Mode of other files (public keys, checkpoints, blocks).
PUBLIC = 0o644


def fsync_directory(directory: Path) -> None:
    """Make the names in ``directory`` durable (fsync of the directory). Raises OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directory(directory: Path) -> None:
    """Create ``directory`` and its missing parents durably: each directory created is synced
    into its parent. Costs one ``stat`` when it exists. Raises OSError."""
    directory = Path(directory)
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    if not missing:
        return
    directory.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_directory(created.parent)


def _write_temp(path: Path, data: bytes, mode: int) -> str:
    """A fsynced temporary file beside ``path`` holding ``data``; its name. Raises OSError."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _install(tmp: str, path: Path, exclusive: bool) -> None:
    """Give the temporary file ``tmp`` the name ``path``. Raises OSError (FileExistsError when
    ``exclusive`` and ``path`` exists)."""
    try:
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_durably(path: Path, data: bytes, *, mode: int = PUBLIC, exclusive: bool = False) -> None:
    """Replace ``path`` by ``data`` atomically and durably (temp file, fsync, rename, fsync of
    the directory), creating its directory if needed. The file gets ``mode`` (``PRIVATE`` for
    secrets) from its first byte on. With ``exclusive`` an existing file is left alone and
    FileExistsError raised (creating a secret once, even with rival processes).

    Raises OSError.
    """
    path = Path(path)
    make_directory(path.parent)
    tmp = _write_temp(path, data, mode)
    _install(tmp, path, exclusive)
    fsync_directory(path.parent)


def write_files_durably(files: Iterable[tuple[Path, bytes]], *, mode: int = PUBLIC) -> None:
    """:func:`write_durably` for many files, each directory fsynced once after all renames.

    Raises OSError (files renamed before the failure stay, whole).
    """
    dirs: dict[Path, None] = {}
    for path, data in files:
        path = Path(path)
        make_directory(path.parent)
        _install(_write_temp(path, data, mode), path, exclusive=False)
        dirs[path.parent] = None
    for d in dirs:
        fsync_directory(d)
