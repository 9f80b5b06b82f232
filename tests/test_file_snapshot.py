"""The file watcher's persistent snapshot in the local store (store/snapshot.py): migration 0005
on an existing file, the snapshot following the replay rule row by row, and written with its
rows through the write queue (never without them), on real SQLite files."""

from __future__ import annotations

import dataclasses
import random
import sqlite3
from pathlib import Path

from support.data import file_event, insert_file_events, local_query

from host_agent.collectors.filesystem.replay import Change as Replayed
from host_agent.collectors.filesystem.replay import replay
from host_agent.store import FILE_CHANGES, RowWriter, connect, migrate
from host_agent.store.queue import WriteQueue
from host_agent.store.retention import SizeLimit, used_bytes
from host_agent.store.snapshot import (
    DIRECTORY,
    FILE,
    Change,
    Entry,
    SnapshotReader,
    read_all,
    relative,
)

ROOT = b"/w/root"


def row_for(change: Change) -> dict[str, object]:
    return file_event(
        0,
        event_type=change.event_type,
        file_path=change.path.decode(errors="backslashreplace"),
        monitored_root=ROOT.decode(),
        previous_path=(
            change.previous_path.decode(errors="backslashreplace")
            if change.previous_path
            else None
        ),
    )


def test_migration_0007_adds_the_columns_and_tables_to_an_existing_file(tmp_path: Path) -> None:
    db = tmp_path / "file_changes.db"
    previous = dataclasses.replace(FILE_CHANGES, migrations=FILE_CHANGES.migrations[:6])
    later = dataclasses.replace(FILE_CHANGES, migrations=FILE_CHANGES.migrations[:7])
    writer = RowWriter(db, previous)  # a file as the previous agent left it, with a row
    [old_id] = writer.insert_many([file_event(1)])
    writer.close()
    conn = connect(db)
    try:
        assert migrate(conn, later) == ["0007_file_history"]
        columns = {
            r[1]: (r[2], r[3], r[4]) for r in conn.execute("PRAGMA table_info(file_change_events)")
        }
        assert columns["previous_path"] == ("TEXT", 0, None)
        assert columns["previous_path_raw"] == ("BLOB", 0, None)
        assert columns["found_at_start"] == ("INTEGER", 1, "0")
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 7
        assert migrate(conn, later) == []
    finally:
        conn.close()
    [(found, previous)] = local_query(
        db, "SELECT found_at_start, previous_path FROM file_change_events WHERE id = ?", (old_id,)
    )
    assert (found, previous) == (0, None)
    tables = {r[0] for r in local_query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"file_snapshot", "file_snapshot_roots"} <= tables


def test_relative_paths() -> None:
    assert relative(ROOT, b"/w/root/a") == (b"", b"a")
    assert relative(ROOT, b"/w/root/a/b\xff/c") == (b"a/b\xff", b"c")
    assert relative(ROOT, b"/w/root") is None
    assert relative(ROOT, b"/w/rootx/a") is None
    assert relative(b"/", b"/a/b") == (b"a", b"b")


def random_history(seed: int, steps: int) -> list[Change]:
    """Rows a watcher could write: files and directories made, changed, moved (directories
    with their contents), deleted, names not valid UTF-8 among them. Some paths may already
    exist (a later history on the same root): every step stays consistent with the replay."""
    rng = random.Random(seed)
    present: dict[bytes, int] = {}  # path -> kind
    history: list[Change] = []
    names = [b"a", b"b", b"c\xff", b"d d", b"e"]

    def add(kind: str, path: bytes, entry_kind: int, previous: bytes | None = None) -> None:
        history.append(
            Change(ROOT, kind, path, previous, Entry(entry_kind, 1, rng.randrange(10**9), 7))
        )

    for _ in range(steps):
        dirs = [ROOT] + [p for p, k in present.items() if k == DIRECTORY]
        action = rng.random()
        if action < 0.45 or not present:
            parent = rng.choice(dirs)
            path = parent + b"/" + rng.choice(names)
            if path in present:
                continue
            kind = rng.choice((FILE, DIRECTORY))
            present[path] = kind
            add("created", path, kind)
        elif action < 0.6:
            path = rng.choice(list(present))
            add("modified", path, present[path])
        elif action < 0.8:
            source = rng.choice(list(present))
            parent = rng.choice(dirs)
            target = parent + b"/" + rng.choice(names)
            if target in present or target == source or target.startswith(source + b"/"):
                continue
            below = [p for p in present if p.startswith(source + b"/")]
            kind = present.pop(source)
            for p in below:
                present[target + p[len(source) :]] = present.pop(p)
            present[target] = kind
            add("moved", target, kind, source)
        else:
            path = rng.choice(list(present))
            for p in [p for p in present if p.startswith(path + b"/")]:
                del present[p]
                history.append(Change(ROOT, "deleted", p, None, Entry(FILE)))
            del present[path]
            history.append(Change(ROOT, "deleted", path, None, Entry(FILE)))
    return history


def test_the_snapshot_is_the_replay_of_its_rows(tmp_path: Path) -> None:
    """Row by row, through the write queue: the snapshot holds what replaying the rows gives
    (store/snapshot.py and collectors/filesystem/replay.py state one rule twice), folded or
    not: a log left unfolded (a killed agent) is applied by the reader."""
    for seed in range(4):
        db = tmp_path / f"file_changes_{seed}.db"
        history = random_history(seed, 300)
        queue = WriteQueue.start_for(db, FILE_CHANGES)
        for start in range(0, len(history), 17):  # batches of rows, each with its effects
            batch = history[start : start + 17]
            queue.insert_many([row_for(c) for c in batch], snapshot=batch)
        assert queue.flush(30)
        queue.close()  # folds the log
        expected = replay(Replayed(c.event_type, c.path, c.previous_path) for c in history)
        conn = sqlite3.connect(db)
        try:
            assert not conn.execute("SELECT count(*) FROM file_snapshot_log").fetchone()[0]
            assert {ROOT + b"/" + p for p in read_all(conn, ROOT)} == expected, seed
        finally:
            conn.close()

        # More rows, their effects logged and never folded, as when the agent is killed.
        more = random_history(seed + 100, 100)
        writer = RowWriter(db, FILE_CHANGES)
        with writer.transaction() as tx:
            tx.insert([row_for(c) for c in more])
            tx.log_snapshot(more)
        writer.close()
        expected = replay(
            Replayed(c.event_type, c.path, c.previous_path) for c in [*history, *more]
        )
        reader = SnapshotReader(db, ROOT)
        try:
            assert {ROOT + b"/" + p for p, _ in reader.below(b"")} == expected, seed
            top = {p for p in expected if p.count(b"/") == ROOT.count(b"/") + 1}
            assert {ROOT + b"/" + name for name in reader.children(b"")} == top
        finally:
            reader.close()


def test_the_reader_sees_directories_and_what_lies_below(tmp_path: Path) -> None:
    db = tmp_path / "file_changes.db"
    queue = WriteQueue.start_for(db, FILE_CHANGES)
    changes = [
        Change(ROOT, "created", ROOT + b"/d", None, Entry(DIRECTORY, None, 5, 11)),
        Change(ROOT, "created", ROOT + b"/d/f", None, Entry(FILE, 3, 6, 12)),
        Change(ROOT, "created", ROOT + b"/d/s/g", None, Entry(FILE, 4, 7, 13)),
        Change(ROOT, "created", ROOT + b"/d-x", None, Entry(FILE, 1, 1, 14)),
        Change(b"/w/other", "created", b"/w/other/f", None, Entry(FILE, 1, 1, 15)),
    ]
    queue.insert_many([row_for(c) for c in changes], snapshot=changes)
    assert queue.flush(10)
    queue.close()
    reader = SnapshotReader(db, ROOT)
    try:
        assert reader.updated_at is not None
        assert set(reader.children(b"")) == {b"d", b"d-x"}
        assert reader.children(b"d") == {b"f": Entry(FILE, 3, 6, 12)}
        assert dict(reader.below(b"d")) == {
            b"d/f": Entry(FILE, 3, 6, 12),
            b"d/s/g": Entry(FILE, 4, 7, 13),
        }
        assert len(dict(reader.below(b""))) == 4
    finally:
        reader.close()
    assert SnapshotReader(tmp_path / "none.db", ROOT).children(b"") == {}
    never = SnapshotReader(db, b"/w/never")
    assert never.updated_at is None and never.children(b"") == {}
    never.close()


def test_a_row_the_store_refuses_takes_its_snapshot_change_with_it(tmp_path: Path) -> None:
    """The size cap refuses new rows (stop_collecting): their effects are not written, so the
    snapshot never says what no row says, and the next start scan records it."""
    db = tmp_path / "file_changes.db"
    insert_file_events(db, [file_event(i, file_path="/x" * 200) for i in range(200)])
    conn = sqlite3.connect(db)
    try:
        size = used_bytes(conn)  # full already
    finally:
        conn.close()
    queue = WriteQueue.start_for(
        db, FILE_CHANGES, limit=SizeLimit(size, "stop_collecting")
    )
    change = Change(ROOT, "created", ROOT + b"/refused", None, Entry(FILE, 1, 1, 1))
    [ref] = queue.insert_many([row_for(change)], snapshot=[change])
    assert queue.flush(10)
    queue.close()
    assert ref.refused
    conn = sqlite3.connect(db)
    try:
        assert read_all(conn, ROOT) == {}
    finally:
        conn.close()
