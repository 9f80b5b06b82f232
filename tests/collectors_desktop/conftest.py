"""A real X desktop for the desktop collector's tests: Xvfb, optionally openbox, xterms.

Without the programs these tests skip, except under CI=true where they fail. Every process
started here is killed and reaped at teardown.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from support.x11 import Desktop, XTerm, poll_until, require_tools  # noqa: F401

from host_agent.store.queue import WriteQueue
from host_agent.store.tables import DESKTOP_ACTIVITY


@pytest.fixture
def bare_display(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Desktop]:
    """Xvfb without a window manager."""
    require_tools()
    # A developer's Wayland session would add an XWayland notice to the logs tests inspect.
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    desktop = Desktop(tmp_path)
    try:
        desktop.start_xvfb()
        yield desktop
    finally:
        desktop.close()


@pytest.fixture
def desktop(bare_display: Desktop) -> Desktop:
    """Xvfb with openbox managing it."""
    bare_display.start_openbox()
    return bare_display


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "desktop_activity.db"


@pytest.fixture
def writer(db_path: Path) -> Iterator[WriteQueue]:
    writer = WriteQueue.start_for(db_path, DESKTOP_ACTIVITY)
    yield writer
    writer.close()  # as the agent does


def read_rows(db_path: Path) -> list[dict[str, Any]]:
    """The table's rows in id order, read through a separate read-only connection."""
    if not db_path.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM desktop_activity_sessions ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        return []  # file created but the table not yet migrated
    return [dict(row) for row in rows]


def db_bytes(db_path: Path) -> bytes:
    """Every byte SQLite keeps for the database: the file, its WAL and shared memory."""
    data = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = Path(f"{db_path}{suffix}")
        if path.exists():
            data += path.read_bytes()
    return data
