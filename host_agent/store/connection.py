"""Opening local SQLite files with the settings every host-agent connection shares, and
using one from asyncio without blocking the loop.

Every error that escapes a connection here is a `StoreError` naming the file
(`host_agent.store.faults`), except a row refused for a constraint.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from host_agent.errors import StoreClosed
from host_agent.store.faults import store_errors

BUSY_TIMEOUT_MS = 10_000

# WAL lets the sync engine read while collectors write. synchronous=FULL makes every commit
# survive a power cut, not only a process crash: collectors write in batches, so the cost is
# one fsync per batch, and "a row written to SQLite reaches PostgreSQL" needs the row to exist.
WAL = "PRAGMA journal_mode=WAL"
PRAGMAS = (
    WAL,
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)

P = ParamSpec("P")
T = TypeVar("T")


def apply_pragmas(conn: sqlite3.Connection, *extra: str) -> None:
    for pragma in (*PRAGMAS, *extra):
        if pragma == WAL:
            _switch_to_wal(conn)
        else:
            conn.execute(pragma)


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """Put a new file in WAL mode. When two processes do it to the same new file at the same
    moment (two `sync --once` on a fresh data directory), SQLite answers "database is
    locked" at once, without waiting in its busy handler: wait for the other here instead,
    within the same busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute(WAL)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def connect(path: Path | str, *, any_thread: bool = False, extra: tuple[str, ...] = ()) -> (
    sqlite3.Connection
):
    """Open `path` (creating it and its directory) in autocommit mode with WAL and a busy
    timeout.

    Autocommit (`isolation_level=None`) means callers open transactions explicitly with
    `BEGIN`; nothing is committed behind their back. `any_thread=True` lifts sqlite3's
    same-thread check; the caller must then serialise use of the connection itself.
    """
    path = Path(path)
    with store_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            path,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=not any_thread,
        )
        try:
            apply_pragmas(conn, *extra)
        except BaseException:
            conn.close()
            raise
    return conn


def connect_readonly(path: Path | str) -> sqlite3.Connection:
    """Open an existing file for reading only: nothing is created, migrated or written."""
    path = Path(path)
    with store_errors(path):
        conn = sqlite3.connect(
            f"file:{path.absolute()}?mode=ro", uri=True, isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except BaseException:
            conn.close()
            raise
    return conn


def rollback_quietly(conn: sqlite3.Connection) -> None:
    """Roll back an open transaction, if SQLite has not already done so itself (it does after
    a full disk or an I/O error); never raise over the error that brought us here."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class AsyncConnection:
    """One sqlite3 connection owned by one worker thread, used from asyncio.

    `await run(fn, *args)` calls `fn(connection, *args)` on that thread; SQLite errors come
    back translated (`StoreError` naming the file). Lifecycle: `open()` -> `run()`... ->
    `close()`; closing twice is harmless, use after close raises `StoreClosed`.
    """

    def __init__(self, path: Path | str, *extra_pragmas: str, name: str = "sqlite") -> None:
        self.path = Path(path)
        self._extra = extra_pragmas
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._lock = threading.Lock()

    async def open(self) -> None:
        if self._closed:
            raise StoreClosed(f"connection to {self.path} is closed")
        if self._conn is None:
            self._conn = await self._on_thread(
                lambda: connect(self.path, extra=self._extra)
            )

    async def _on_thread(self, call: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, call)

    async def run(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        conn = self._conn
        if conn is None:
            raise StoreClosed(f"connection to {self.path} is not open")

        def call() -> T:
            with store_errors(self.path):
                return fn(conn, *args, **kwargs)

        return await self._on_thread(call)

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._on_thread(conn.close)
        self._executor.shutdown(wait=False)


def decode_lossless(raw: bytes) -> str:
    """A `text_factory` that never fails: bytes that are not UTF-8 survive as surrogates (a
    later `is_utf8` finds them)."""
    return raw.decode("utf-8", "surrogateescape")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
