"""Building local rows and reading both ends back, for sync tests."""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from host_agent.store import DESKTOP_ACTIVITY, FILE_CHANGES, RowWriter, prepare_file
from host_agent.sync.postgres.schema import apply_schema, schema_files


def file_event(i: int, *, now: int | None = None, **overrides: Any) -> dict[str, Any]:
    now = int(time.time()) if now is None else now
    row: dict[str, Any] = {
        "event_time": now,
        "event_time_iso": datetime.fromtimestamp(now, UTC).isoformat(),
        "event_type": ("created", "modified", "deleted", "moved")[i % 4],
        "file_path": f"/home/dev/project/src/module_{i}.py",
        "file_path_relative": f"src/module_{i}.py",
        "file_name": f"module_{i}.py",
        "file_extension": ".py",
        "file_size": 1000 + i,
        "is_symlink": 0,
        "monitored_root": "/home/dev/project",
        "project_name": "project",
        "created_at": now,
    }
    row.update(overrides)
    return row


def session(i: int, *, now: int | None = None, **overrides: Any) -> dict[str, Any]:
    now = int(time.time()) if now is None else now
    row: dict[str, Any] = {
        "start_time": now + i * 10,
        "start_time_iso": datetime.fromtimestamp(now + i * 10, UTC).isoformat(),
        "end_time": now + i * 10 + 5,
        "end_time_iso": datetime.fromtimestamp(now + i * 10 + 5, UTC).isoformat(),
        "duration_seconds": 5,
        "application_name": f"App{i % 3}",
        "window_title": f"window {i}",
        "process_name": "app",
        "pid": 1000 + i,
        "is_idle": 0,
        "created_at": now,
    }
    row.update(overrides)
    return row


def insert_file_events(path: Path, rows: Sequence[dict[str, Any]]) -> list[int]:
    writer = RowWriter(path, FILE_CHANGES)
    try:
        return writer.insert_many(rows)
    finally:
        writer.close()


def insert_sessions(path: Path, rows: Sequence[dict[str, Any]]) -> list[int]:
    writer = RowWriter(path, DESKTOP_ACTIVITY)
    try:
        return writer.insert_many(rows)
    finally:
        writer.close()


def bulk_file_events(path: Path, count: int, *, start: int = 0) -> None:
    """Many rows fast (one executemany), through the same table definition."""
    writer = RowWriter(path, FILE_CHANGES)
    writer.insert_many([file_event(start)])  # creates and migrates the file
    writer.close()
    conn = sqlite3.connect(path)
    try:
        first = file_event(start + 1)
        columns = list(first)
        marks = ", ".join("?" for _ in columns)
        conn.executemany(
            f"INSERT INTO file_change_events ({', '.join(columns)}) VALUES ({marks})",
            (tuple(file_event(i).values()) for i in range(start + 1, start + count)),
        )
        conn.commit()
    finally:
        conn.close()


def varied_file_events(path: Path, count: int, *, seed: int = 7) -> None:
    """Many rows fast whose values vary as real ones do (random names, folders, sizes, event
    types over a month), so compressed sizes are realistic: `bulk_file_events` repeats one
    row, which compresses to almost nothing."""
    rng = random.Random(seed)
    prepare_file(path, FILE_CHANGES)
    start = int(time.time()) - 30 * 86400
    projects = ["host-agent", "website", "infra", "notes", "ml-experiments"]
    extensions = [".py", ".md", ".ts", ".json", ".rs", ".go", ".txt", ".yaml", ""]

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(count):
            t = start + i * (30 * 86400) // max(1, count)
            project = projects[rng.randrange(len(projects))]
            ext = extensions[rng.randrange(len(extensions))]
            name = f"file_{rng.randrange(50_000)}{ext}"
            rel = f"src/pkg{rng.randrange(40)}/{name}"
            root = f"/home/dev/{project}"
            yield (
                t, datetime.fromtimestamp(t, UTC).isoformat(),
                ("created", "modified", "deleted", "moved")[rng.randrange(4)],
                f"{root}/{rel}", rel, name, ext or None, rng.randrange(1, 2_000_000), 0, root,
                project, t,
            )  # fmt: skip

    conn = sqlite3.connect(path)
    try:
        conn.executemany(
            "INSERT INTO file_change_events (event_time, event_time_iso, event_type, file_path, "
            "file_path_relative, file_name, file_extension, file_size, is_symlink, "
            "monitored_root, project_name, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows(),
        )
        conn.commit()
    finally:
        conn.close()


def local_query(path: Path, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def pg_fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10, statement_cache_size=0)
    try:
        return list(await conn.fetch(sql, *args, timeout=30))
    finally:
        await conn.close()


def pg_fetch_sync(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(pg_fetch(url, sql, *args))


async def apply_schema_to(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=10, statement_cache_size=0)
    try:
        await apply_schema(conn)
    finally:
        await conn.close()


def packaged_schema_versions() -> list[int]:
    """The schema versions the packaged SQL files record, in order: what `init-db` leaves in
    `schema_version` (files and versions need not line up one to one)."""
    return sorted(
        int(version)
        for path in schema_files()
        for version in re.findall(
            r"INSERT INTO schema_version \(version, description\)\s+VALUES \((\d+),",
            path.read_text(encoding="utf-8"),
        )
    )
