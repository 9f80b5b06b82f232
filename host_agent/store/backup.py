"""Consistent copies of the local stores while the agent runs, with a manifest.

Each store is copied with SQLite's `VACUUM INTO` on a connection of its own: the copy is one
read transaction's snapshot (WAL lets collectors and sync go on writing meanwhile, and the
copy holds every commit up to that moment, unsynced rows and the sync journal included). The
copy is a plain SQLite file (rollback journal; the agent switches it back to WAL when it opens
it), checked with `PRAGMA quick_check`, fsynced, and described in the manifest from the copy
itself: its size, SHA-256, table, store identity, row counts (total, unsynced), last id and
change counter. `manifest.json` is written last (atomically), so a directory without one is
an unfinished backup; `SHA256SUMS` lets `sha256sum -c` check the files.

Restoring is copying the files back (README, "Backup and restore"). Blocking: the command runs
it in its own process, off any event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from host_agent.errors import StoreUnusable
from host_agent.store.connection import connect
from host_agent.store.faults import store_errors
from host_agent.store.tables import LocalTable
from host_agent.timefmt import iso

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
FORMAT = 1


@dataclass(frozen=True)
class StoreCopy:
    """One store in a backup, as the manifest lists it."""

    table: str
    config_key: str  # database.<key>: where a restore puts the file
    source: str  # the original file, absolute
    file: str  # the copy's name in the backup directory
    size: int
    sha256: str
    store_id: str
    rows: int
    unsynced: int
    last_id: int  # the largest id the store had given
    change_counter: int
    schema_migrations: list[str]


@dataclass
class Backup:
    directory: Path
    manifest: Path
    stores: list[StoreCopy] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # stores with no file yet


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(copy: Path, table: LocalTable) -> tuple[str, int, int, int, int, list[str]]:
    """(store id, rows, unsynced, last id, change counter, migrations) read from the copy."""
    uri = f"file:{copy.absolute()}?mode=ro&immutable=1"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        with store_errors(copy):
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreUnusable(f"the copy {copy} failed its check: {check}")
            store_id = conn.execute("SELECT store_id FROM store_identity WHERE id = 1").fetchone()
            rows, unsynced, high = conn.execute(
                f"SELECT count(*), count(*) FILTER (WHERE synced_at IS NULL), max(id) "
                f"FROM {table.name}"
            ).fetchone()
            seq = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = ?", (table.name,)
            ).fetchone()
            counter = conn.execute("SELECT value FROM sync_counter WHERE id = 1").fetchone()[0]
            migrations = [
                str(r[0])
                for r in conn.execute("SELECT name FROM schema_migrations ORDER BY rowid")
            ]
    finally:
        conn.close()
    last = max(int(high or 0), int(seq[0]) if seq is not None else 0)
    return str(store_id[0]), int(rows), int(unsynced), last, int(counter), migrations


def copy_store(source: Path, table: LocalTable, target: Path) -> StoreCopy:
    """`VACUUM INTO target` of `source` (which must exist), checked and described."""
    conn = connect(source)
    try:
        with store_errors(source):
            conn.execute("VACUUM INTO ?", (str(target),))
    finally:
        conn.close()
    _fsync(target)
    store_id, rows, unsynced, last, counter, migrations = _describe(target, table)
    return StoreCopy(
        table=table.name,
        config_key=f"database.{table.config_key}",
        source=str(source.absolute()),
        file=target.name,
        size=target.stat().st_size,
        sha256=_sha256(target),
        store_id=store_id,
        rows=rows,
        unsynced=unsynced,
        last_id=last,
        change_counter=counter,
        schema_migrations=migrations,
    )


def _names(stores: Sequence[tuple[LocalTable, Path]]) -> list[str]:
    """The copies' names: the originals' (so a restore is a plain copy), or the table's when
    two stores share a file name."""
    names = [path.name for _, path in stores]
    return [
        name if names.count(name) == 1 else f"{table.name}.db"
        for (table, _), name in zip(stores, names, strict=True)
    ]


def write_backup(
    stores: Sequence[tuple[LocalTable, Path]], out: Path, *, host: str, version: str
) -> Backup:
    """Copy every store of `stores` that has a file into `out` (new or empty) and write the
    manifest last."""
    out.mkdir(parents=True, exist_ok=True)
    done = Backup(out, out / MANIFEST)
    for (table, path), name in zip(stores, _names(stores), strict=True):
        if not path.exists():
            done.skipped.append(
                {"table": table.name, "source": str(path.absolute()), "reason": "no such file"}
            )
            continue
        done.stores.append(copy_store(path, table, out / name))
    sums = out / SUMS
    sums.write_text("".join(f"{s.sha256}  {s.file}\n" for s in done.stores), encoding="utf-8")
    _fsync(sums)
    manifest = {
        "format": FORMAT,
        "host_agent_version": version,
        "created_at": iso(time.time()),
        "host_identifier": host,
        "stores": [asdict(s) for s in done.stores],
        "skipped": done.skipped,
    }
    partial = out / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _fsync(partial)
    partial.replace(done.manifest)
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        _fsync(out)
    return done

