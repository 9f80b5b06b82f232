"""The one boundary where sqlite3 (and file system) errors become host-agent errors.

A local fault is said as what it is, naming the file:
    locked by another process (SQLITE_BUSY/LOCKED)      -> StoreUnavailable  (it can clear)
    disk full (SQLITE_FULL, ENOSPC)                     -> StoreUnavailable
    I/O error, read-only file, cannot open (permissions) -> StoreUnavailable
    not an SQLite file (SQLITE_NOTADB)                  -> StoreUnusable     (a person must look)
    corrupt (SQLITE_CORRUPT)                            -> StoreUnusable
    anything else                                       -> StoreError
A constraint failure (`sqlite3.IntegrityError`) is not a fault of the store but of the row; it
passes through untranslated so the writer can isolate the row (`is_row_error`).
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from host_agent.errors import StoreError, StoreUnavailable, StoreUnusable

_BUSY, _LOCKED, _NOMEM, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _PROTOCOL = (
    5,
    6,
    7,
    8,
    10,
    11,
    13,
    14,
    15,
)
_NOTADB = 26

_UNAVAILABLE = {
    _BUSY: "is locked by another process (a backup tool, an open sqlite3 shell?)",
    _LOCKED: "is locked by another connection",
    _PROTOCOL: "is locked by another process",
    _FULL: "cannot be written: the disk is full",
    _IOERR: "cannot be read or written: I/O error",
    _READONLY: "cannot be written: the file or its directory is read-only",
    _CANTOPEN: "cannot be opened (missing directory or permissions?)",
    _NOMEM: "cannot be used: out of memory",
}
_UNUSABLE = {
    _NOTADB: "is not an SQLite database (a foreign or damaged file; it is left untouched)",
    _CORRUPT: "is corrupt (database disk image is malformed; it is left untouched)",
}
_OS_ERRORS = {
    errno.ENOSPC: _UNAVAILABLE[_FULL],
    errno.EDQUOT: "cannot be written: disk quota exceeded",
    errno.EROFS: _UNAVAILABLE[_READONLY],
    errno.EACCES: "cannot be opened: permission denied",
    errno.EIO: _UNAVAILABLE[_IOERR],
}


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def translate(exc: BaseException, path: Path | str) -> StoreError:
    """A `StoreError` saying what went wrong with the local file at `path`."""
    if isinstance(exc, StoreError):
        return exc
    where = f"local database {path}"
    if isinstance(exc, sqlite3.Error):
        code = _primary_code(exc)
        if code is None:  # errors raised by the module itself, without an SQLite code
            text = str(exc).lower()
            code = next(
                (c for c, k in ((_FULL, "full"), (_BUSY, "locked"), (_NOTADB, "not a database"))
                 if k in text),
                None,
            )
        if code in _UNUSABLE:
            return StoreUnusable(f"{where} {_UNUSABLE[code]}")
        if code in _UNAVAILABLE:
            return StoreUnavailable(f"{where} {_UNAVAILABLE[code]}")
        return StoreError(f"{where}: {exc}")
    if isinstance(exc, OSError):
        reason = _OS_ERRORS.get(exc.errno or 0)
        if reason is not None:
            return StoreUnavailable(f"{where} {reason}")
        return StoreUnavailable(f"{where}: {exc.strerror or exc}")
    return StoreError(f"{where}: {type(exc).__name__}: {exc}")


def is_row_error(exc: BaseException) -> bool:
    """True when SQLite refused the row itself (a constraint), not the file."""
    return isinstance(exc, sqlite3.IntegrityError | sqlite3.InterfaceError)


@contextlib.contextmanager
def store_errors(path: Path | str) -> Iterator[None]:
    """Translate sqlite3 and OS errors raised inside into `StoreError`s naming `path`;
    row errors pass through."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        if is_row_error(exc):
            raise
        raise translate(exc, path) from exc
