"""The file watcher's persistent snapshot: the only module with SQL on `file_snapshot` and
`file_snapshot_roots` (both made by migration 0005 of the file-changes file).

    file_snapshot        per root, every entry the rows say exists: parent and name relative
                         to the root (bytes), kind, and size, mtime and inode when last seen
    file_snapshot_roots  per root, when its snapshot was last brought up to date

What it holds is, by construction, the replay of a prefix of the root's rows: every row's
effect (`apply`) follows the replay rule (`host_agent.collectors.filesystem.replay`):
created/modified put the path, deleted removes exactly that path, moved takes the source and
everything below it to the destination; the store's write queue writes the effects of written
rows only, in order, right after them (later, in a burst). A row the queue drops (buffer full,
size cap) takes its effect with it, so the snapshot never claims what no row says; it may lag
the rows, never lead them. The watcher's start scan compares the disk with it
(`SnapshotReader`) and records the difference: what a lagging snapshot misses is recorded once
more, which replays harmlessly.

Writes happen inside the caller's transaction; reads open their own read-only connection.
Every function blocks.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from host_agent.store.connection import connect_readonly
from host_agent.store.faults import store_errors

FILE, DIRECTORY, SYMLINK = 0, 1, 2
DELETED, MOVED = "deleted", "moved"


class Entry(NamedTuple):
    """An entry as last seen. `size`, `mtime_ns` and `inode` are None when it was gone
    before it could be looked at. (Named tuples: one is made per row, on the hot path.)"""

    kind: int
    size: int | None = None
    mtime_ns: int | None = None
    inode: int | None = None


class Change(NamedTuple):
    """What one row does to its root's snapshot. `entry` is the path's state when the row
    was written (ignored for `deleted`)."""

    root: bytes
    event_type: str
    path: bytes
    previous_path: bytes | None
    entry: Entry


def relative(root: bytes, path: bytes) -> tuple[bytes, bytes] | None:
    """(parent, name) of `path` relative to `root` (parent b"" for entries in the root
    itself); None when `path` is not below `root`."""
    top = root if root.endswith(b"/") else root + b"/"
    if not path.startswith(top) or len(path) == len(top):
        return None
    parent, _, name = path[len(top) :].rpartition(b"/")
    return parent, name


def _below(parent_column: str, directory: bytes) -> tuple[str, tuple[bytes, ...]]:
    """A condition on `parent_column` for entries below the relative `directory`."""
    if not directory:
        return "1", ()
    return (
        f"({parent_column} = ? OR ({parent_column} >= ? AND {parent_column} < ?))",
        (directory, directory + b"/", directory + b"0"),  # "0" sorts right after "/"
    )


_PUT = (
    "INSERT OR REPLACE INTO file_snapshot (root, parent, name, kind, size, mtime_ns, inode) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_REMOVE = "DELETE FROM file_snapshot WHERE root = ? AND parent = ? AND name = ?"


def apply(conn: sqlite3.Connection, changes: Sequence[Change], now: float) -> None:
    """Apply the effect of rows, in their order, inside the caller's transaction. Runs of
    puts and of removals go to SQLite in one call each (this is on every row's path)."""
    touched: set[bytes] = set()
    run: list[tuple[object, ...]] = []
    run_sql = _PUT

    def flush() -> None:
        if run:
            conn.executemany(run_sql, run)
            run.clear()

    for root, event_type, path, previous_path, entry in changes:
        target = relative(root, path)
        if target is None:
            continue
        touched.add(root)
        if event_type == DELETED:
            if run_sql is not _REMOVE:
                flush()
                run_sql = _REMOVE
            run.append((root, *target))
            continue
        if event_type == MOVED and previous_path is not None:
            source = relative(root, previous_path)
            if source is not None:
                flush()
                _move(conn, root, source, target)
        if run_sql is not _PUT:
            flush()
            run_sql = _PUT
        run.append((root, *target, *entry))
    flush()
    for root in touched:
        conn.execute(
            "INSERT INTO file_snapshot_roots (root, updated_at) VALUES (?, ?) "
            "ON CONFLICT (root) DO UPDATE SET updated_at = excluded.updated_at",
            (root, now),
        )


def _move(
    conn: sqlite3.Connection, root: bytes, source: tuple[bytes, bytes], target: tuple[bytes, bytes]
) -> None:
    """The entry at `source` and everything below it now live at `target`."""
    conn.execute(
        "UPDATE OR REPLACE file_snapshot SET parent = ?, name = ? "
        "WHERE root = ? AND parent = ? AND name = ?",
        (*target, root, *source),
    )
    old = _join(*source)
    new = _join(*target)
    condition, arguments = _below("parent", old)
    # Blob || blob is text in SQLite; the cast keeps the bytes a blob, as they were written.
    conn.execute(
        "UPDATE OR REPLACE file_snapshot SET parent = CAST(? || substr(parent, ?) AS BLOB) "
        f"WHERE root = ? AND {condition}",
        (new, len(old) + 1, root, *arguments),
    )


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class SnapshotReader:
    """One root's snapshot, read through a read-only connection of its own (the start scan's).
    A file or table that does not exist yet reads as an empty snapshot. Errors of the file are
    `StoreError`s naming it. Close it when done."""

    def __init__(self, path: Path | str, root: bytes) -> None:
        self.path = Path(path)
        self.root = root
        self._conn: sqlite3.Connection | None = None
        self.updated_at: float | None = None
        if not self.path.exists():
            return
        conn: sqlite3.Connection | None = connect_readonly(self.path)
        try:
            assert conn is not None
            with store_errors(self.path):
                found = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' "
                    "AND name IN ('file_snapshot', 'file_snapshot_roots')"
                ).fetchone()[0]
                if found == 2:
                    row = conn.execute(
                        "SELECT updated_at FROM file_snapshot_roots WHERE root = ?", (root,)
                    ).fetchone()
                    self.updated_at = None if row is None else float(row[0])
                    self._conn, conn = conn, None
        finally:
            if conn is not None:
                conn.close()

    @classmethod
    def empty(cls, root: bytes) -> SnapshotReader:
        """A reader of nothing: a root never scanned."""
        return cls(Path("/nonexistent/host-agent-snapshot"), root)

    def children(self, directory: bytes) -> dict[bytes, Entry]:
        """The entries directly in the relative `directory` (b"" for the root)."""
        if self._conn is None:
            return {}
        with store_errors(self.path):
            rows = self._conn.execute(
                "SELECT name, kind, size, mtime_ns, inode FROM file_snapshot "
                "WHERE root = ? AND parent = ?",
                (self.root, directory),
            ).fetchall()
        return {bytes(r[0]): Entry(r[1], r[2], r[3], r[4]) for r in rows}

    def below(self, directory: bytes) -> Iterator[tuple[bytes, Entry]]:
        """(relative path, entry) of everything below the relative `directory`."""
        if self._conn is None:
            return
        condition, arguments = _below("parent", directory)
        with store_errors(self.path):
            rows = self._conn.execute(
                "SELECT parent, name, kind, size, mtime_ns, inode FROM file_snapshot "
                f"WHERE root = ? AND {condition}",
                (self.root, *arguments),
            ).fetchall()
        for r in rows:
            yield _join(bytes(r[0]), bytes(r[1])), Entry(r[2], r[3], r[4], r[5])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def read_all(conn: sqlite3.Connection, root: bytes) -> dict[bytes, Entry]:
    """Every entry of `root`'s snapshot by relative path (for tools and tests)."""
    return {
        _join(bytes(r[0]), bytes(r[1])): Entry(r[2], r[3], r[4], r[5])
        for r in conn.execute(
            "SELECT parent, name, kind, size, mtime_ns, inode FROM file_snapshot WHERE root = ?",
            (root,),
        )
    }
