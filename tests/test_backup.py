"""`host-agent backup`: consistent copies of the live stores with a manifest that describes them
exactly, and a restore that ships every row unsynced at backup time once."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.agent_process import AgentProcess, agent_env, run_agent, wait_until, write_config
from support.data import file_event, local_query, pg_fetch_sync
from support.tcp_proxy import TcpProxy

from host_agent import __version__
from host_agent.commands.backup import backup
from host_agent.config import AgentConfig
from host_agent.store import FILE_CHANGES, RowWriter

TABLE = "file_change_events"


def read_copy(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
def writing(
    make_config: Callable[..., AgentConfig],
) -> Iterator[tuple[AgentConfig, threading.Event]]:
    """A config whose file_changes.db gets rows in small transactions from another thread
    until the test ends; the event is set once the first rows are in."""
    config = make_config(None)
    started, stop = threading.Event(), threading.Event()

    def write() -> None:
        writer = RowWriter(config.database.file_events_db, FILE_CHANGES)
        try:
            n = 0
            while not stop.is_set():
                writer.insert_many([file_event(n + i) for i in range(50)])
                n += 50
                started.set()
        finally:
            writer.close()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        yield config, started
    finally:
        stop.set()
        thread.join(30)


def test_a_backup_taken_while_rows_are_written_is_a_consistent_copy_described_exactly(
    tmp_path: Path, writing: tuple[AgentConfig, threading.Event]
) -> None:
    config, started = writing
    assert started.wait(30)
    out = tmp_path / "backup"
    done = backup(config, out)
    source = config.database.file_events_db

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["host_agent_version"] == __version__
    assert manifest["host_identifier"] == "test-host" and manifest["skipped"] == []
    stores = {s["table"]: s for s in manifest["stores"]}
    assert set(stores) == {TABLE, "desktop_activity_sessions"}
    assert [s.file for s in done.stores] == [s["file"] for s in manifest["stores"]]
    entry = stores[TABLE]
    copy = out / entry["file"]
    assert entry["file"] == "file_changes.db" and entry["source"] == str(source.absolute())
    assert entry["config_key"] == "database.file_events_db"
    assert entry["size"] == copy.stat().st_size
    assert entry["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert entry["store_id"] == local_query(source, "SELECT store_id FROM store_identity")[0][0]
    # One snapshot: the rows of whole transactions, ids 1..n without a gap, all unsynced.
    count, low, high, unsynced = read_copy(
        copy, f"SELECT count(*), min(id), max(id), count(*) FILTER (WHERE synced_at IS NULL) "
        f"FROM {TABLE}"
    )[0]  # fmt: skip
    assert (low, high) == (1, count) and count % 50 == 0 and count > 0
    assert entry["rows"] == count and entry["unsynced"] == unsynced == count
    assert entry["last_id"] == count
    assert entry["change_counter"] == read_copy(copy, "SELECT value FROM sync_counter")[0][0]
    assert entry["schema_migrations"] == [m.name for m in FILE_CHANGES.migrations]
    assert read_copy(copy, "PRAGMA integrity_check") == [("ok",)]
    # The writer was never stopped: it goes on past the snapshot.
    wait_until(lambda: local_query(source, f"SELECT count(*) FROM {TABLE}")[0][0] > count, 30,
               "rows written after the backup")  # fmt: skip
    checked = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count(": OK") == 2


def test_backup_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", url=None, data_dir=tmp_path / "data")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    refused = run_agent(config, "backup", "--out", str(taken), env=agent_env(), cwd=tmp_path)
    assert refused.returncode == 2 and "--out:" in refused.stderr, refused.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["something"]
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_agent(config, "backup", "--out", str(empty), env=agent_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (empty / "manifest.json").exists() and "wrote" in done.stdout


def server_ids(url: str) -> list[int]:
    rows = pg_fetch_sync(url, f"SELECT source_id FROM {TABLE} ORDER BY source_id")
    return [int(r["source_id"]) for r in rows]


def local_rows(db: Path) -> int:
    return int(local_query(db, f"SELECT count(*) FROM {TABLE}")[0][0])


def test_a_backup_taken_while_the_agent_collects_restores_and_ships_each_unsynced_row_once(
    tmp_path: Path, schema_url: str, tcp_proxy_factory: Callable[[str, int], TcpProxy]
) -> None:
    """The agent collects file changes; some reach the server, then the server becomes
    unreachable and the rest stay unsynced. A backup is taken while files keep changing; the
    agent stops (and its later rows are lost with its directory). The backup is restored into
    a fresh directory as the README says, an agent started there ships every row that was
    unsynced at backup time, and the server then holds every row of the backup exactly once."""
    pg = pg_fetch_sync(schema_url, "SELECT inet_server_port() AS port")[0]["port"]
    proxy = tcp_proxy_factory("127.0.0.1", int(pg))
    through_proxy = schema_url.replace(f":{pg}/", f":{proxy.port}/")
    watched = tmp_path / "watched"
    watched.mkdir()
    original = tmp_path / "original"
    settings: dict[str, Any] = {
        "collectors": {"filesystem": {"enabled": True, "roots": [str(watched)],
                                      "coalesce_ms": 50}},
        "data_sync": {"wake_delay_seconds": 0.2, "interval_seconds": 3600,
                      "retry_backoff_seconds": 0.2, "retry_backoff_max_seconds": 1},
    }
    config = write_config(tmp_path / "original.yaml", url=through_proxy, data_dir=original,
                          **settings)  # fmt: skip
    db = original / "file_changes.db"
    out = tmp_path / "backup"
    with AgentProcess(config, "run", env=agent_env(), workdir=tmp_path) as agent:
        wait_until(lambda: "agent.started" in agent.stderr, 30, "the agent watching")
        for i in range(20):
            (watched / f"shipped-{i}.txt").write_text("x")
        wait_until(lambda: len(server_ids(schema_url)) >= 20 and not local_query(
            db, f"SELECT 1 FROM {TABLE} WHERE synced_at IS NULL LIMIT 1"),
            60, "the first files' rows on the server")  # fmt: skip
        shipped = server_ids(schema_url)
        proxy.block()  # the server is unreachable from now on
        for i in range(30):
            (watched / f"kept-{i}.txt").write_text("y")
        wait_until(lambda: local_rows(db) >= len(shipped) + 30, 30, "rows kept locally")

        stop = threading.Event()

        def keep_changing() -> None:
            n = 0
            while not stop.is_set():
                (watched / f"during-{n}.txt").write_text("z")
                n += 1
                stop.wait(0.01)

        changer = threading.Thread(target=keep_changing)
        changer.start()
        try:
            wait_until(lambda: local_rows(db) >= len(shipped) + 40, 30, "rows while changing")
            taken = run_agent(config, "backup", "--out", str(out), env=agent_env(), cwd=tmp_path)
            assert taken.returncode == 0, taken.stderr
            wait_until(lambda: local_rows(db) > entry_rows(out), 30, "rows after the backup")
        finally:
            stop.set()
            changer.join(30)
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.output()
    assert server_ids(schema_url) == shipped  # nothing arrived while blocked

    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(s for s in manifest["stores"] if s["table"] == TABLE)
    copy = out / entry["file"]
    in_backup = [int(r[0]) for r in read_copy(copy, f"SELECT id FROM {TABLE} ORDER BY id")]
    unsynced = [int(r[0]) for r in read_copy(
        copy, f"SELECT id FROM {TABLE} WHERE synced_at IS NULL ORDER BY id")]  # fmt: skip
    assert entry["unsynced"] == len(unsynced) > 30 and entry["rows"] == len(in_backup)
    assert sorted(set(in_backup) - set(unsynced)) == shipped

    # The README's restore: check the files, copy them to a fresh data directory, verify
    # against the server (with --repair), then start the agent.
    checked = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, check=False)
    assert checked.returncode == 0
    restored = tmp_path / "restored"
    restored.mkdir()
    for store in manifest["stores"]:
        shutil.copy(out / store["file"], restored / Path(store["source"]).name)
    fresh_watched = tmp_path / "nothing-new"
    fresh_watched.mkdir()
    settings["collectors"]["filesystem"]["roots"] = [str(fresh_watched)]
    fresh = write_config(tmp_path / "restored.yaml", url=schema_url, data_dir=restored,
                         **settings)  # fmt: skip
    env = agent_env()
    verified = run_agent(fresh, "verify", "--repair", env=env, cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{len(unsynced)} not yet shipped" in verified.stdout, verified.stdout
    with AgentProcess(fresh, "run", env=env, workdir=tmp_path) as agent:
        wait_until(lambda: len(server_ids(schema_url)) >= len(in_backup) or agent.poll()
                   is not None, 60, "the unsynced rows of the backup on the server")  # fmt: skip
        assert agent.poll() is None, agent.output()
        wait_until(lambda: not local_query(
            restored / "file_changes.db", f"SELECT 1 FROM {TABLE} WHERE synced_at IS NULL"),
            30, "every restored row marked synced")  # fmt: skip
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.output()
    # Every row of the backup, each once: the unsynced ones arrived, none twice.
    assert server_ids(schema_url) == in_backup
    again = run_agent(fresh, "sync", "--once", env=env, cwd=tmp_path)
    assert again.returncode == 0 and f"{TABLE}: success, 0 synced" in again.stdout, again.stdout
    assert server_ids(schema_url) == in_backup


def entry_rows(out: Path) -> int:
    """Rows of file_change_events in a finished backup (0 before its manifest exists)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except FileNotFoundError:
        return 1 << 62
    return int(next(s["rows"] for s in manifest["stores"] if s["table"] == TABLE))
