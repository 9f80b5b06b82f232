"""Upgrading an existing installation to store identities and partitions (server schema
version 3, local migration 0004), against a real PostgreSQL, through the real CLI.

An existing server on the previous schema (versions 1-2) holds rows the old agent shipped, and
an existing local store made by the old migrations holds rows: some shipped, one changed after
it was shipped, some never shipped. After `init-db` the old rows keep their identity (the nil
store id, on both ends), so the changed row updates its server row instead of doubling it. A
fresh store reusing the host_identifier (a reinstall, a cloned VM) gets a random store id and
its rows, whose ids restart at 1, are kept beside the old ones; `host-agent stats` shows the
host's two stores.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from support.agent_process import Finished, agent_env, run_agent, write_config
from support.data import (
    file_event,
    insert_file_events,
    insert_sessions,
    local_query,
    pg_fetch_sync,
    session,
)
from support.legacy import (
    LEGACY_DESKTOP,
    LEGACY_FILES,
    apply_legacy_schema,
    local_rows,
    log_old_runs,
    mark_synced,
    ship_as_old_agent,
)

from host_agent.store import RowWriter

HOST = "legacy-host"
NIL = uuid.UUID(int=0)
TABLES = ("desktop_activity_sessions", "file_change_events")


def cli(tmp_path: Path, url: str, data: str, *args: str) -> Finished:
    config = write_config(
        tmp_path / f"config-{data}.yaml", url=url, data_dir=tmp_path / data, host=HOST
    )
    result = run_agent(config, *args, env=agent_env(), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


def store_id(path: Path) -> uuid.UUID:
    [(value,)] = local_query(path, "SELECT store_id FROM store_identity")
    return uuid.UUID(value)


def per_host_stats(tmp_path: Path, url: str) -> dict[str, str]:
    """This host's row of `host-agent stats`' per-host section (plain format)."""
    out = cli(tmp_path, url, "old", "stats", "--format", "plain", "--host", HOST).stdout
    block = out.split("== Per host (host legacy-host) ==\n", 1)[1].split("\n\n", 1)[0]
    header, row = block.splitlines()[:2]
    return dict(zip(header.split("|"), row.split("|"), strict=True))


def test_an_existing_server_and_store_keep_their_rows_and_identity_through_the_upgrade(
    pg_database: str, tmp_path: Path
) -> None:
    url = pg_database
    old = tmp_path / "old"
    old.mkdir()
    files_db, desktop_db = old / "file_changes.db", old / "desktop_activity.db"

    # --- what the old agent left behind ------------------------------------------------------
    asyncio.run(apply_legacy_schema(url))
    writer = RowWriter(files_db, LEGACY_FILES)
    files = writer.insert_many([file_event(i) for i in range(10)])
    writer.close()
    writer = RowWriter(desktop_db, LEGACY_DESKTOP)
    sessions = writer.insert_many([session(i) for i in range(4)])
    writer.close()
    shipped = {"file_change_events": files[:7], "desktop_activity_sessions": sessions[:3]}
    for table, path in (("file_change_events", files_db), ("desktop_activity_sessions",
                                                           desktop_db)):
        asyncio.run(ship_as_old_agent(url, HOST, table, local_rows(path, table, shipped[table])))
        mark_synced(path, table, shipped[table], at=1_700_000_000)
    asyncio.run(log_old_runs(url, HOST, TABLES))
    # Changed after it was shipped: unsynced again, at a newer version.
    changed_file, changed_session = files[1], sessions[2]
    writer = RowWriter(files_db, LEGACY_FILES)
    writer.update(changed_file, {"file_size": 9999})
    writer.close()
    writer = RowWriter(desktop_db, LEGACY_DESKTOP)
    writer.update(changed_session, {"window_title": "still open", "duration_seconds": 600})
    writer.close()
    [(version, synced_at)] = local_query(
        files_db, "SELECT row_version, synced_at FROM file_change_events WHERE id = ?",
        (changed_file,),
    )
    assert version > 0 and synced_at is None
    assert local_query(files_db, "SELECT name FROM sqlite_master WHERE name = 'store_identity'") \
        == []
    assert pg_fetch_sync(url, "SELECT max(version) AS v FROM schema_version")[0]["v"] == 2
    # `stats` reads a server still on version 2 (its sync_logs has no store_id yet).
    assert per_host_stats(tmp_path, url)["stores"] == "1"

    # --- the upgrade ---------------------------------------------------------------------------
    cli(tmp_path, url, "old", "init-db")

    versions = pg_fetch_sync(url, "SELECT version FROM schema_version ORDER BY 1")
    assert [r["version"] for r in versions] == [1, 2, 3, 4, 5]
    partitioned = pg_fetch_sync(
        url, "SELECT partrelid::regclass::text AS t FROM pg_partitioned_table ORDER BY 1"
    )
    assert [r["t"] for r in partitioned] == list(TABLES)
    for table in TABLES:
        rows = pg_fetch_sync(
            url, f"SELECT host_identifier, store_id, source_id FROM {table} ORDER BY source_id"
        )
        assert [(r["host_identifier"], r["store_id"], r["source_id"]) for r in rows] == [
            (HOST, NIL, i) for i in shipped[table]
        ]
    [before] = pg_fetch_sync(
        url, "SELECT file_size, row_version FROM file_change_events WHERE source_id = $1",
        changed_file,
    )
    assert (before["file_size"], before["row_version"]) == (1001, 0)  # as the old agent left it
    runs = pg_fetch_sync(url, "SELECT store_id FROM sync_logs")
    assert len(runs) == 2 and all(r["store_id"] is None for r in runs)
    for path in (files_db, desktop_db):
        assert store_id(path) == NIL
        assert ("0004_store_identity",) in local_query(path, "SELECT name FROM schema_migrations")

    # --- the first sync after it ----------------------------------------------------------------
    out = cli(tmp_path, url, "old", "sync", "--once").stdout
    assert "file_change_events: success, 4 synced" in out  # 3 never shipped + 1 changed
    assert "desktop_activity_sessions: success, 2 synced" in out

    all_files = pg_fetch_sync(
        url,
        "SELECT source_id, store_id, file_size, row_version FROM file_change_events "
        "ORDER BY source_id",
    )
    assert [(r["source_id"], r["store_id"]) for r in all_files] == [(i, NIL) for i in files]
    updated = next(r for r in all_files if r["source_id"] == changed_file)
    [(local_version,)] = local_query(
        files_db, "SELECT row_version FROM file_change_events WHERE id = ?", (changed_file,)
    )
    assert (updated["file_size"], updated["row_version"]) == (9999, local_version)
    all_sessions = pg_fetch_sync(
        url,
        "SELECT source_id, store_id, window_title, duration_seconds "
        "FROM desktop_activity_sessions ORDER BY source_id",
    )
    assert [(r["source_id"], r["store_id"]) for r in all_sessions] == [
        (i, NIL) for i in sessions
    ]
    longer = next(r for r in all_sessions if r["source_id"] == changed_session)
    assert (longer["window_title"], longer["duration_seconds"]) == ("still open", 600)
    assert per_host_stats(tmp_path, url)["stores"] == "1"  # the old runs and the nil store

    # --- a fresh store under the same host_identifier --------------------------------------------
    fresh = tmp_path / "fresh"
    fresh_files = insert_file_events(
        fresh / "file_changes.db",
        [file_event(i, file_name=f"fresh_{i}.py") for i in range(5)],
    )
    fresh_sessions = insert_sessions(fresh / "desktop_activity.db",
                                     [session(i, window_title="fresh") for i in range(2)])
    assert fresh_files == [1, 2, 3, 4, 5] and fresh_sessions == [1, 2]  # ids restart at 1
    cli(tmp_path, url, "fresh", "sync", "--once")

    fresh_id = store_id(fresh / "file_changes.db")
    assert fresh_id != NIL and fresh_id.version == 4
    by_store = pg_fetch_sync(
        url,
        "SELECT store_id, count(*) AS n, "
        "count(*) FILTER (WHERE file_name LIKE 'fresh_%') AS fresh "
        "FROM file_change_events WHERE host_identifier = $1 GROUP BY 1",
        HOST,
    )
    assert {r["store_id"]: (r["n"], r["fresh"]) for r in by_store} == {
        NIL: (10, 0), fresh_id: (5, 5),
    }
    assert pg_fetch_sync(
        url, "SELECT file_size FROM file_change_events WHERE store_id = $1 AND source_id = $2",
        NIL, changed_file,
    )[0]["file_size"] == 9999  # the old store's rows untouched by the new one's
    assert pg_fetch_sync(
        url, "SELECT count(*) AS n FROM desktop_activity_sessions WHERE host_identifier = $1",
        HOST,
    )[0]["n"] == 6
    assert per_host_stats(tmp_path, url)["stores"] == "2"


def test_a_reinstalled_host_with_a_fresh_store_keeps_every_row(
    pg_database: str, tmp_path: Path
) -> None:
    """The fleet issue's observation: a reinstalled agent (or a cloned VM) reusing its
    host_identifier with fresh local files, whose ids restart at 1, silently lost its rows."""
    url = pg_database
    first = write_config(tmp_path / "first.yaml", url=url, data_dir=tmp_path / "first",
                         host=HOST)
    again = write_config(tmp_path / "again.yaml", url=url, data_dir=tmp_path / "again",
                         host=HOST)
    env = agent_env()
    insert_file_events(tmp_path / "first" / "file_changes.db",
                       [file_event(i, file_name=f"first_{i}.py") for i in range(6)])
    for args in (("init-db",), ("sync", "--once")):
        result = run_agent(first, *args, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr

    insert_file_events(tmp_path / "again" / "file_changes.db",
                       [file_event(i, file_name=f"again_{i}.py") for i in range(4)])
    result = run_agent(again, "sync", "--once", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    names = pg_fetch_sync(
        url, "SELECT file_name FROM file_change_events WHERE host_identifier = $1", HOST
    )
    assert sorted(r["file_name"] for r in names) == sorted(
        [f"first_{i}.py" for i in range(6)] + [f"again_{i}.py" for i in range(4)]
    )
