"""The local store: migrations, the version trigger, and marking rules, on real SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from support.data import file_event, insert_file_events, local_query, session

from host_agent.store import (
    DESKTOP_ACTIVITY,
    FILE_CHANGES,
    RowWriter,
    applied_migrations,
    connect,
    migrate,
)


def test_migrations_are_recorded_and_applying_twice_is_a_no_op(tmp_path: Path) -> None:
    conn = connect(tmp_path / "f.db")
    try:
        first = migrate(conn, FILE_CHANGES)
        assert first == [m.name for m in FILE_CHANGES.migrations]
        assert applied_migrations(conn) == first
        assert migrate(conn, FILE_CHANGES) == []
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    finally:
        conn.close()


def test_file_change_events_has_every_column_of_the_plan(tmp_path: Path) -> None:
    conn = connect(tmp_path / "f.db")
    try:
        migrate(conn, FILE_CHANGES)
        columns = {
            r[1]: (r[2], r[3]) for r in conn.execute("PRAGMA table_info(file_change_events)")
        }
        plan = {
            "id": "INTEGER", "event_time": "INTEGER", "event_time_iso": "TEXT",
            "event_type": "TEXT", "file_path": "TEXT", "file_path_relative": "TEXT",
            "file_name": "TEXT", "file_extension": "TEXT", "file_size": "INTEGER",
            "is_symlink": "INTEGER", "monitored_root": "TEXT", "project_name": "TEXT",
            "synced_at": "INTEGER", "created_at": "INTEGER",
        }  # fmt: skip
        for name, sql_type in plan.items():
            assert columns[name][0] == sql_type, name
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(file_change_events)")}
        assert {"idx_file_event_time", "idx_file_unsynced"} <= indexes
    finally:
        conn.close()


def test_old_desktop_database_without_synced_at_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "desktop_activity.db"
    old = sqlite3.connect(path)
    old.execute(
        """CREATE TABLE desktop_activity_sessions (
               id INTEGER PRIMARY KEY AUTOINCREMENT, start_time INTEGER NOT NULL,
               start_time_iso TEXT NOT NULL, end_time INTEGER, end_time_iso TEXT,
               duration_seconds INTEGER, application_name TEXT NOT NULL, window_title TEXT,
               process_name TEXT, pid INTEGER, is_idle INTEGER NOT NULL DEFAULT 0,
               created_at INTEGER NOT NULL)"""
    )
    rows = [tuple(session(i).values()) for i in range(50)]
    old.executemany(
        f"INSERT INTO desktop_activity_sessions ({', '.join(session(0))}) "
        f"VALUES ({', '.join('?' * len(session(0)))})",
        rows,
    )
    old.commit()
    old.close()

    conn = connect(path)
    try:
        applied = migrate(conn, DESKTOP_ACTIVITY)
        assert "0002_add_synced_at" in applied
        kept = conn.execute(
            "SELECT window_title, synced_at, row_version FROM desktop_activity_sessions ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    assert [r[0] for r in kept] == [f"window {i}" for i in range(50)]
    assert all(r[1] is None and r[2] == 0 for r in kept)


def test_insert_naming_only_documented_columns_works(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    insert_file_events(path, [file_event(0)])  # creates the schema
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO file_change_events (event_time, event_time_iso, event_type, file_path, "
        "file_name, monitored_root, created_at) VALUES (1, 'x', 'created', '/a', 'a', '/', 1)"
    )
    conn.commit()
    conn.close()
    assert local_query(path, "SELECT row_version, synced_at FROM file_change_events") == [
        (0, None),
        (0, None),
    ]


def test_a_change_gets_a_new_version_and_becomes_unsynced_but_marking_does_not(
    tmp_path: Path,
) -> None:
    path = tmp_path / "d.db"
    writer = RowWriter(path, DESKTOP_ACTIVITY)
    try:
        [a, b] = writer.insert_many([session(0), session(1)])
        conn = sqlite3.connect(path)
        conn.execute("UPDATE desktop_activity_sessions SET synced_at = 100")  # the sync marking
        conn.commit()
        conn.close()
        assert local_query(
            path, "SELECT row_version, synced_at FROM desktop_activity_sessions"
        ) == [
            (0, 100),
            (0, 100),
        ]
        writer.update(a, {"end_time": 999, "duration_seconds": 50})
        writer.update(a, {"window_title": "again"})
        writer.update(b, {"window_title": "other"})
    finally:
        writer.close()
    rows = local_query(path, "SELECT id, row_version, synced_at FROM desktop_activity_sessions")
    versions = {r[0]: r[1] for r in rows}
    assert all(r[2] is None for r in rows)
    # Versions come from one counter: every change is newer than every earlier change.
    assert 0 < versions[a] - 1 < versions[a] < versions[b]


def test_writer_after_close_raises(tmp_path: Path) -> None:
    writer = RowWriter(tmp_path / "f.db", FILE_CHANGES)
    writer.close()
    writer.close()
    try:
        writer.insert_many([file_event(0)])
    except Exception as exc:
        assert "closed" in str(exc)
    else:
        raise AssertionError("insert after close must fail")


def test_sync_reads_seek_through_the_synced_at_index_even_after_analyze(tmp_path: Path) -> None:
    """Keyset pagination only helps if the read seeks to the first unsynced row. With a long
    synced history and fresh statistics, SQLite would otherwise walk the table by id."""
    from host_agent.sync.records import Selection
    from host_agent.sync.source import read_batch_sql

    for table in (FILE_CHANGES, DESKTOP_ACTIVITY):
        path = tmp_path / f"{table.name}.db"
        if table is FILE_CHANGES:
            insert_file_events(path, [file_event(i) for i in range(4000)])
        conn = connect(path)
        try:
            migrate(conn, table)
            if table is DESKTOP_ACTIVITY:
                conn.executemany(
                    "INSERT INTO desktop_activity_sessions (start_time, start_time_iso, "
                    "application_name, created_at) VALUES (?, 'x', 'app', ?)",
                    [(i, i) for i in range(4000)],
                )
            conn.execute(f"UPDATE {table.name} SET synced_at = 1 WHERE id <= 3000")
            conn.commit()
            conn.execute("ANALYZE")
            sql = read_batch_sql(table, Selection.plain(("created_at",)))
            plan = " ".join(str(r[3]) for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", (0, 10)))
            assert f"USING INDEX {table.synced_index} (synced_at=? AND rowid>?)" in plan, plan
            rows = conn.execute(sql, (0, 10)).fetchall()
            assert [r[0] for r in rows] == list(range(3001, 3011))
        finally:
            conn.close()
