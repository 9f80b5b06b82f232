"""Local faults, from outside and for real: a local file write-locked by another process, the
data directory's disk filled up, a text value that is not UTF-8, a truncated, a foreign and a
newer-schema file. The daemon stays up and catches up; a command refuses a file it cannot use
with one line naming it and exit 10, and leaves the file as it was."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent_process import (
    AgentProcess,
    agent_env,
    run_agent,
    wait_until,
    write_config,
)
from support.ci import unavailable
from support.data import (
    file_event,
    insert_file_events,
    insert_sessions,
    local_query,
    pg_fetch_sync,
    session,
)

from host_agent.store.migrations import prepare_file
from host_agent.store.tables import DESKTOP_ACTIVITY, FILE_CHANGES

FAST_SYNC = {
    "wake_delay_seconds": 0.3,
    "interval_seconds": 3600,
    "retry_backoff_seconds": 0.3,
    "retry_backoff_max_seconds": 1.5,
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def server_paths(url: str) -> list[str]:
    rows = pg_fetch_sync(url, "SELECT file_path FROM file_change_events ORDER BY file_path")
    return [r["file_path"] for r in rows]


def local_paths(db: Path) -> list[str]:
    return [r[0] for r in local_query(db, "SELECT file_path FROM file_change_events")]


def watcher_config(tmp_path: Path, url: str, data_dir: Path, watched: Path) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        url=url,
        data_dir=data_dir,
        data_sync=FAST_SYNC,
        collectors={
            "desktop": {"enabled": False},
            "filesystem": {"enabled": True, "roots": [str(watched)], "coalesce_ms": 100},
        },
    )


def wait_watching(agent: AgentProcess, watched: Path, db: Path) -> None:
    """The agent records: it said it started, and a probe file's row is in the local file."""
    wait_until(
        lambda: "agent.started" in agent.stderr or agent.poll() is not None,
        30,
        "the agent to start",
    )
    probe = watched / "probe.txt"
    probe.write_text("probe")
    wait_until(
        lambda: (db.exists() and str(probe) in local_paths(db)) or agent.poll() is not None,
        30,
        "the watcher to record a probe file",
    )
    assert agent.poll() is None, agent.output()


def make_files(directory: Path, names: list[str], seconds: float) -> None:
    """Create the files spread over `seconds` (a user working through the fault)."""
    pause = seconds / max(1, len(names))
    for name in names:
        (directory / name).write_text(name)
        time.sleep(pause)  # pacing the workload itself, not waiting for a result


def assert_each_once_on_the_server(url: str, expected: list[str]) -> None:
    on_server = server_paths(url)
    for path in expected:
        assert on_server.count(path) == 1, (path, on_server.count(path))


# --- a write lock held by another process -----------------------------------------------------


@contextlib.contextmanager
def write_locked(db: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process (an open `sqlite3` shell, a backup tool) holds the write lock."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
            str(db),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()
        holder.wait(timeout=30)


@pytest.mark.slow
def test_a_write_lock_held_longer_than_the_busy_timeout_loses_nothing(
    tmp_path: Path, schema_url: str
) -> None:
    data_dir, watched = tmp_path / "data", tmp_path / "watched"
    data_dir.mkdir()
    watched.mkdir()
    db = data_dir / "file_changes.db"
    config = watcher_config(tmp_path, schema_url, data_dir, watched)
    with AgentProcess(config, "run", env=agent_env(), workdir=tmp_path) as agent:
        wait_watching(agent, watched, db)
        names = [f"during-lock-{i:03}.txt" for i in range(120)]
        with write_locked(db):
            # Longer than SQLite's 10 s busy timeout: every write and mark meanwhile fails.
            make_files(watched, names, seconds=13)
            assert agent.poll() is None, agent.output()
        expected = [str(watched / n) for n in names]
        wait_until(
            lambda: set(expected) <= set(local_paths(db)) or agent.poll() is not None,
            60,
            "the rows kept in memory to reach the file",
        )
        wait_until(
            lambda: set(expected) <= set(server_paths(schema_url)) or agent.poll() is not None,
            60,
            "the rows to reach PostgreSQL",
        )
        assert agent.poll() is None, agent.output()
        assert_each_once_on_the_server(schema_url, expected)
        assert local_paths(db).count(expected[0]) == 1
        log = agent.stderr
        assert "store.write_failed" in log and "is locked by another process" in log
        assert "store.write_recovered" in log
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.output()


# --- the disk fills up -------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        unavailable("mounting a tmpfs needs root")
    mount_point = Path(tempfile.mkdtemp(prefix="host-agent-tmpfs-"))
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        mount_point.rmdir()
        unavailable(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        mount_point.rmdir()


def fill(directory: Path) -> Path:
    """Write a filler file until the disk is full; return it."""
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                handle.write(chunk)
                handle.flush()
    return filler


@pytest.mark.slow
def test_a_full_disk_is_said_as_such_and_everything_is_recorded_once_it_is_freed(
    tmp_path: Path, schema_url: str
) -> None:
    with small_tmpfs("4m") as data_dir:
        watched = tmp_path / "watched"
        watched.mkdir()
        db = data_dir / "file_changes.db"
        config = watcher_config(tmp_path, schema_url, data_dir, watched)
        with AgentProcess(config, "run", env=agent_env(), workdir=tmp_path) as agent:
            wait_watching(agent, watched, db)
            filler = fill(data_dir)
            names = [f"while-full-{i:03}.txt" for i in range(300)]
            make_files(watched, names, seconds=3)
            wait_until(
                lambda: "the disk is full" in agent.stderr or agent.poll() is not None,
                30,
                "the agent to say the disk is full",
            )
            assert agent.poll() is None, agent.output()
            filler.unlink()
            expected = [str(watched / n) for n in names]
            wait_until(
                lambda: set(expected) <= set(local_paths(db)) or agent.poll() is not None,
                60,
                "the rows kept in memory to reach the file",
            )
            wait_until(
                lambda: set(expected) <= set(server_paths(schema_url))
                or agent.poll() is not None,
                60,
                "the rows to reach PostgreSQL",
            )
            assert agent.poll() is None, agent.output()
            assert_each_once_on_the_server(schema_url, expected)
            assert "cannot rollback" not in agent.stderr
            agent.send(signal.SIGTERM)
            assert agent.wait(timeout=60) == 0, agent.output()


# --- a text value that is not UTF-8 ------------------------------------------------------------


def test_a_text_value_that_is_not_utf8_is_quarantined_and_the_daemon_runs_on(
    tmp_path: Path, schema_url: str
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    desktop = data_dir / "desktop_activity.db"
    [bad] = insert_sessions(desktop, [session(0)])
    insert_sessions(desktop, [session(i) for i in range(1, 6)])
    conn = sqlite3.connect(desktop)
    conn.execute(
        "UPDATE desktop_activity_sessions SET window_title = CAST(x'ff41' AS TEXT) WHERE id = ?",
        (bad,),
    )
    conn.commit()
    conn.close()
    config = write_config(tmp_path / "config.yaml", url=schema_url, data_dir=data_dir,
                          data_sync=FAST_SYNC)
    with AgentProcess(config, "run", env=agent_env(), workdir=tmp_path) as agent:
        wait_until(
            lambda: len(pg_fetch_sync(schema_url, "SELECT 1 FROM desktop_activity_sessions")) == 5
            or agent.poll() is not None,
            30,
            "the first run to ship the good rows",
        )
        assert agent.poll() is None, agent.output()
        # Several more runs, each asked for by trigger-sync, which waits for its result.
        for round_ in range(3):
            insert_sessions(desktop, [session(10 + round_)])
            triggered = run_agent(config, "trigger-sync", "--wait", "30", env=agent_env(),
                                  cwd=tmp_path)
            assert triggered.returncode == 0, (triggered.stdout, triggered.stderr, agent.output())
            assert agent.poll() is None, agent.output()
        ids = {r["source_id"] for r in pg_fetch_sync(
            schema_url, "SELECT source_id FROM desktop_activity_sessions")}
        assert bad not in ids and len(ids) == 8
        status = run_agent(config, "status", env=agent_env(), cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert f"row {bad}: column window_title: text is not valid UTF-8" in status.stdout
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, agent.output()


# --- files the agent must not use -----------------------------------------------------------


def truncated_file(data_dir: Path) -> Path:
    db = data_dir / "file_changes.db"
    insert_file_events(db, [file_event(i, file_path="/p/" + "x" * 200 + str(i))
                            for i in range(2000)])
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    with open(db, "r+b") as handle:
        handle.truncate(db.stat().st_size // 2)
    return db


def foreign_sqlite_file(data_dir: Path) -> Path:
    db = data_dir / "file_changes.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE moz_places (id INTEGER PRIMARY KEY, url TEXT)")
    conn.execute("INSERT INTO moz_places (url) VALUES ('https://example.org')")
    conn.commit()
    conn.close()
    return db


def not_sqlite_file(data_dir: Path) -> Path:
    db = data_dir / "file_changes.db"
    db.write_bytes(b"%PDF-1.7\n" + os.urandom(8192))
    return db


def newer_schema_file(data_dir: Path) -> Path:
    db = data_dir / "file_changes.db"
    prepare_file(db, FILE_CHANGES)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO schema_migrations VALUES ('0099_from_a_newer_agent', 0)")
    conn.commit()
    conn.close()
    return db


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (truncated_file, "is corrupt"),
        (foreign_sqlite_file, "belongs to something else (it holds moz_places"),
        (not_sqlite_file, "is not an SQLite database"),
        (newer_schema_file, f"has schema version {len(FILE_CHANGES.migrations) + 1} (migration "
                            "0099_from_a_newer_agent), written by a newer host-agent; this one "
                            f"knows up to version {len(FILE_CHANGES.migrations)}"),
    ],
    ids=["truncated", "foreign-sqlite", "not-sqlite", "newer-schema"],
)
def test_a_file_the_agent_cannot_use_is_refused_untouched_with_exit_10(
    tmp_path: Path, schema_url: str, make: object, says: str
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    prepare_file(data_dir / "desktop_activity.db", DESKTOP_ACTIVITY)
    db = make(data_dir)  # type: ignore[operator]
    before = sha256(db)
    config = write_config(tmp_path / "config.yaml", url=schema_url, data_dir=data_dir)
    for args in (("sync", "--once"), ("status",), ("init-db",), ("run",)):
        result = run_agent(config, *args, env=agent_env(), cwd=tmp_path, timeout=60)
        assert result.returncode == 10, (args, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("host-agent:")]
        assert len(lines) == 1, (args, result.stderr)
        assert str(db) in lines[0] and says in lines[0], (args, lines[0])
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert sha256(db) == before, args
