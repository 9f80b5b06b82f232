"""Opening local SQLite files with the settings every host-agent connection shares."""

from __future__ import annotations

import sqlite3
from pathlib import Path

BUSY_TIMEOUT_MS = 10_000

# WAL lets the sync engine read while collectors write. synchronous=FULL makes every commit
# survive a power cut, not only a process crash: collectors write in batches, so the cost is
# one fsync per batch, and "a row written to SQLite reaches PostgreSQL" needs the row to exist.
PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)


def apply_pragmas(conn: sqlite3.Connection) -> None:
    for pragma in PRAGMAS:
        conn.execute(pragma)


def connect(path: Path | str, *, any_thread: bool = False) -> sqlite3.Connection:
    """Open `path` (creating its directory) in autocommit mode with WAL and a busy timeout.

    Autocommit (`isolation_level=None`) means callers open transactions explicitly with
    `BEGIN`; nothing is committed behind their back. `any_thread=True` lifts sqlite3's
    same-thread check; the caller must then serialise use of the connection itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        timeout=BUSY_TIMEOUT_MS / 1000,
        check_same_thread=not any_thread,
    )
    apply_pragmas(conn)
    return conn
