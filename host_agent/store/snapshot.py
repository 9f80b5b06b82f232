"""The file watcher's persistent snapshot: the only module with SQL on `file_snapshot`,
`file_snapshot_log` and `file_snapshot_roots` (made by migration 0005 of the file-changes
file).

    file_snapshot        per root, every entry the rows say exists: parent and name relative
                         to the root (bytes), kind, and size, mtime and inode when last seen
    file_snapshot_log    rows' effects not yet folded into file_snapshot, in row order
    file_snapshot_roots  per root, when its snapshot was last brought up to date

What the two tables hold together is, by construction, exactly the replay of the root's rows:
every row's effect follows the replay rule (`host_agent.collectors.filesystem.replay`:
created/modified put the path, deleted removes exactly that path, moved takes the source and
everything below it to the destination) and is appended to the log (`log`) in the row's own
transaction, by the store's write queue; a row the queue drops or the file refuses takes its
effect with it. Appending costs a third of updating the snapshot in place, so the rows of a
burst are not slowed; the queue folds the log into the snapshot (`fold`, in order, each fold
one transaction) once writes are quiet. Nothing is ever ahead of or behind the rows: a lagging
snapshot would make the start scan miss what the rows say beyond it.

The watcher's start scan compares the disk with it (`SnapshotReader`, which applies a log left
unfolded, by a crash, in memory) and records the difference. Writes happen inside the
caller's transaction; reads open their own read-only connection. Every function blocks.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

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


_LOG = (
    "INSERT INTO file_snapshot_log (root, event_type, path, previous_path, kind, size, "
    "mtime_ns, inode, logged_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_LOG_COLUMNS = "id, root, event_type, path, previous_path, kind, size, mtime_ns, inode, logged_at"
FOLD_BATCH = 20_000


def log(conn: sqlite3.Connection, changes: Sequence[Change], now: float) -> None:
    """Append the effects of rows to the log, inside the rows' transaction. One statement a
    row, as the rows themselves: one long executemany keeps the interpreter lock from the
    watcher's reader thread (see the row writer's history)."""
    for root, kind, path, previous, entry in changes:
        conn.execute(_LOG, (root, kind, path, previous, *entry, now))


def _logged(row: Sequence[Any]) -> Change:
    """A change as `_LOG_COLUMNS` reads it back."""
    previous = row[4]
    return Change(
        bytes(row[1]),
        str(row[2]),
        bytes(row[3]),
        None if previous is None else bytes(previous),
        Entry(row[5], row[6], row[7], row[8]),
    )


def fold(conn: sqlite3.Connection, now: float, limit: int = FOLD_BATCH) -> int:
    """Apply the oldest `limit` logged effects to the snapshot and forget them, inside the
    caller's transaction; how many there were."""
    rows = conn.execute(
        f"SELECT {_LOG_COLUMNS} FROM file_snapshot_log ORDER BY id LIMIT ?", (limit,)
    ).fetchall()
    if not rows:
        return 0
    apply(conn, [_logged(r) for r in rows], now)
    conn.execute("DELETE FROM file_snapshot_log WHERE id <= ?", (rows[-1][0],))
    return len(rows)


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
    A file or table that does not exist yet reads as an empty snapshot. A log left unfolded (the
    agent was killed) is applied in memory, so what it reads is always the replay of the rows.
    Errors of the file are `StoreError`s naming it. Close it when done."""

    def __init__(self, path: Path | str, root: bytes) -> None:
        self.path = Path(path)
        self.root = root
        self._conn: sqlite3.Connection | None = None
        self._memory: dict[bytes, dict[bytes, Entry]] | None = None  # by parent, when logged
        self.updated_at: float | None = None
        if not self.path.exists():
            return
        conn: sqlite3.Connection | None = connect_readonly(self.path)
        try:
            assert conn is not None
            with store_errors(self.path):
                found = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
                    "('file_snapshot', 'file_snapshot_roots', 'file_snapshot_log')"
                ).fetchone()[0]
                if found == 3:
                    self._open(conn)
                    self._conn, conn = conn, None
        finally:
            if conn is not None:
                conn.close()

    def _open(self, conn: sqlite3.Connection) -> None:
        row = conn.execute(
            "SELECT updated_at FROM file_snapshot_roots WHERE root = ?", (self.root,)
        ).fetchone()
        self.updated_at = None if row is None else float(row[0])
        logged = conn.execute(
            f"SELECT {_LOG_COLUMNS} FROM file_snapshot_log WHERE root = ? ORDER BY id",
            (self.root,),
        ).fetchall()
        if not logged:
            return
        entries = read_all(conn, self.root, folded_only=True)
        _apply_in_memory(entries, self.root, [_logged(r) for r in logged])
        memory: dict[bytes, dict[bytes, Entry]] = {}
        for relative_path, entry in entries.items():
            parent, _, name = relative_path.rpartition(b"/")
            memory.setdefault(parent, {})[name] = entry
        self._memory = memory
        self.updated_at = max(float(logged[-1][9]), self.updated_at or 0.0)

    @classmethod
    def empty(cls, root: bytes) -> SnapshotReader:
        """A reader of nothing: a root never scanned."""
        return cls(Path("/nonexistent/host-agent-snapshot"), root)

    def children(self, directory: bytes) -> dict[bytes, Entry]:
        """The entries directly in the relative `directory` (b"" for the root)."""
        if self._memory is not None:
            return dict(self._memory.get(directory, {}))
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
        if self._memory is not None:
            top = directory + b"/" if directory else b""
            for parent, names in self._memory.items():
                if parent == directory or parent.startswith(top):
                    for name, entry in names.items():
                        yield _join(parent, name), entry
            return
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


def _apply_in_memory(entries: dict[bytes, Entry], root: bytes, changes: Sequence[Change]) -> None:
    """`apply`, on a dict of relative path -> entry."""
    for _, event_type, path, previous_path, entry in changes:
        target = relative(root, path)
        if target is None:
            continue
        destination = _join(*target)
        if event_type == DELETED:
            entries.pop(destination, None)
            continue
        source = (
            relative(root, previous_path)
            if event_type == MOVED and previous_path is not None
            else None
        )
        if source is not None:
            old = _join(*source)
            top = old + b"/"
            moving = [p for p in entries if p == old or p.startswith(top)]
            taken = {p: entries.pop(p) for p in moving}
            for p, moved in taken.items():
                entries[destination + p[len(old) :]] = moved
        entries[destination] = entry


def read_all(
    conn: sqlite3.Connection, root: bytes, *, folded_only: bool = False
) -> dict[bytes, Entry]:
    """Every entry of `root`'s snapshot by relative path, the log applied (for the reader,
    tools and tests)."""
    entries = {
        _join(bytes(r[0]), bytes(r[1])): Entry(r[2], r[3], r[4], r[5])
        for r in conn.execute(
            "SELECT parent, name, kind, size, mtime_ns, inode FROM file_snapshot WHERE root = ?",
            (root,),
        )
    }
    if not folded_only:
        logged = conn.execute(
            f"SELECT {_LOG_COLUMNS} FROM file_snapshot_log WHERE root = ? ORDER BY id", (root,)
        ).fetchall()
        _apply_in_memory(entries, root, [_logged(r) for r in logged])
    return entries
