"""The desktop collector when the local store says no: a full database, a refused write, a
write lock held by another process, and rows left open by a process killed with SIGKILL. Real
Xvfb, openbox, xterms and SQLite files.

A store problem never costs the X connection: no reconnect, no lost polling; a fault of the
file costs nothing at all (the rows wait in memory, in order).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from support.x11 import poll_until

from host_agent.store.connection import connect
from host_agent.store.queue import WriteQueue
from host_agent.store.retention import SizeLimit, used_bytes
from host_agent.store.tables import DESKTOP_ACTIVITY
from host_agent.store.writer import RowWriter

from .conftest import Desktop, read_rows
from .helpers import (
    WAIT,
    RecordingLog,
    apps,
    assert_well_formed,
    make_collector,
    running,
    wait_for,
    wait_rows,
)


def _execute(db_path: Path, sql: str) -> None:
    """One statement on a connection of its own, as another process would run it."""
    with closing(connect(db_path)) as conn:
        conn.execute(sql)


def _assert_never_reconnected(log: RecordingLog) -> None:
    assert len(log.named("desktop.x11_connected")) == 1
    for event in ("desktop.x11_connection_lost", "desktop.poll_failed", "desktop.x11_reconnected"):
        assert not log.named(event), event


async def test_full_local_store_drops_sessions_but_keeps_polling(
    desktop: Desktop, db_path: Path
) -> None:
    # Unsynced rows fill the file up to the cap: under stop_collecting nothing more goes in.
    with closing(RowWriter(db_path, DESKTOP_ACTIVITY)) as setup:
        filler = {
            "start_time": 1000,
            "start_time_iso": "1970-01-01T00:16:40+00:00",
            "end_time": 1000,
            "end_time_iso": "1970-01-01T00:16:40+00:00",
            "duration_seconds": 0,
            "application_name": "Filler",
            "window_title": "x" * 2000,
            "is_idle": 0,
            "created_at": 1000,
        }
        setup.insert_many([filler] * 40)
    with closing(connect(db_path)) as conn:
        full = used_bytes(conn)
    limited = WriteQueue.start_for(
        db_path, DESKTOP_ACTIVITY, limit=SizeLimit(full, "stop_collecting")
    )
    alpha = desktop.xterm("alpha window", "Alpha")
    beta = desktop.xterm("beta window", "Beta")
    desktop.activate(alpha.window_id)
    log = RecordingLog()
    collector = make_collector(desktop, limited, log)
    try:
        async with running(collector) as task:
            await wait_for(lambda: limited.writer.dropped_rows == 1, "the Alpha session refused")
            desktop.activate(beta.window_id)
            await wait_for(lambda: limited.writer.dropped_rows == 2, "the Beta session refused")
            assert collector.state == "running" and not task.done()
            assert collector.sessions_recorded == 2 and collector.errors == 0  # handed over
            assert apps(read_rows(db_path)) == ["Filler"] * 40

            # The sync engine shipped the filler: room is made by deleting it, and the next
            # session is stored, on the same X connection.
            await asyncio.to_thread(
                _execute, db_path, "UPDATE desktop_activity_sessions SET synced_at = 1"
            )
            desktop.activate(alpha.window_id)
            await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "Alpha stored again")
            assert collector.state == "running"
    finally:
        limited.close()

    rows = read_rows(db_path)
    assert apps(rows) == ["Alpha"] and rows[0]["pid"] == alpha.pid
    assert_well_formed(rows)
    assert collector.sessions_recorded == 3 and collector.x_errors == 0
    _assert_never_reconnected(log)


async def test_a_refused_write_is_isolated_and_never_lands_on_another_row(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = desktop.xterm("alpha window", "Alpha")
    beta = desktop.xterm("beta window", "Beta")
    desktop.activate(alpha.window_id)
    log = RecordingLog()
    collector = make_collector(desktop, writer, log)

    async with running(collector):
        (first,) = await wait_rows(db_path, lambda r: apps(r) == ["Alpha"], "the Alpha session")
        # A real SQLite failure for every update of Alpha's row (a disk error would do the same).
        await asyncio.to_thread(
            _execute,
            db_path,
            "CREATE TRIGGER refuse BEFORE UPDATE ON desktop_activity_sessions "
            f"WHEN OLD.id = {first['id']} BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        )
        desktop.activate(beta.window_id)
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha", "Beta"], "Beta stored anyway")
        await wait_for(lambda: writer.refused == 1, "the refused close counted")
        assert collector.state == "running" and collector.errors == 0
        await asyncio.to_thread(_execute, db_path, "DROP TRIGGER refuse")
    # Stopping closes Beta: its end must reach Beta's row, not the row whose close failed.

    alpha_row, beta_row = read_rows(db_path)
    assert alpha_row["end_time"] is None  # its close was refused, not misplaced
    assert beta_row["end_time"] is not None and beta_row["pid"] == beta.pid
    assert_well_formed([beta_row])
    _assert_never_reconnected(log)


# A collector in a process of its own, so that it can be killed like a real agent.
_CHILD = """
import asyncio, sys
from host_agent.collectors.desktop import DesktopActivityCollector
from host_agent.config import DesktopCollectorConfig
from host_agent.store.queue import WriteQueue
from host_agent.store.tables import DESKTOP_ACTIVITY

db, display, checkpoint = sys.argv[1], sys.argv[2], float(sys.argv[3])
config = DesktopCollectorConfig(poll_interval_seconds=0.1, checkpoint_interval_seconds=checkpoint)
queue = WriteQueue.start_for(db, DESKTOP_ACTIVITY)
collector = DesktopActivityCollector(config, queue, display=display)
asyncio.run(collector.run(asyncio.Event()))
"""


def _run_and_kill(
    desktop: Desktop,
    db_path: Path,
    checkpoint: float,
    ready: str,
    until: Callable[[list[dict[str, Any]]], bool],
) -> None:
    """Run a collector process until `until(rows)` holds, then SIGKILL it."""
    with open(desktop.workdir / "child.log", "ab") as output:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(db_path), desktop.display, str(checkpoint)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )

    def reached() -> bool:
        assert child.poll() is None, "the collector process exited; see child.log"
        return until(read_rows(db_path))

    try:
        poll_until(reached, WAIT, ready)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


async def test_rows_left_open_by_a_killed_process_are_closed_at_start(
    desktop: Desktop, writer: WriteQueue, db_path: Path
) -> None:
    alpha = desktop.xterm("alpha window", "Alpha")
    desktop.activate(alpha.window_id)
    # Killed after a checkpoint: the row ends at the checkpoint already.
    await asyncio.to_thread(
        _run_and_kill,
        desktop,
        db_path,
        1.0,
        "a checkpoint",
        lambda r: len(r) == 1 and r[0]["end_time"] is not None,
    )
    # Killed before its first checkpoint: end_time stays NULL, forever unless fixed.
    await asyncio.to_thread(
        _run_and_kill, desktop, db_path, 600.0, "a second session", lambda r: len(r) == 2
    )
    checkpointed, never = read_rows(db_path)
    assert checkpointed["end_time"] > checkpointed["start_time"]
    assert never["end_time"] is None
    # Both already shipped, as if the sync engine had run meanwhile.
    await asyncio.to_thread(_execute, db_path, "UPDATE desktop_activity_sessions SET synced_at = 1")

    log = RecordingLog()
    collector = make_collector(desktop, writer, log)
    async with running(collector):
        await wait_rows(db_path, lambda r: apps(r) == ["Alpha"] * 3, "a session of this run")

    first, second, third = read_rows(db_path)
    assert first == {**checkpointed, "synced_at": 1}  # untouched: it ends at its checkpoint
    assert second["end_time"] == second["start_time"]  # ended where it is known to have begun
    assert second["end_time_iso"] == second["start_time_iso"]
    assert second["duration_seconds"] == 0
    assert second["synced_at"] is None  # changed, so shipped again
    assert third["start_time"] >= second["start_time"]
    assert_well_formed([first, second, third])
    (closed,) = log.named("desktop.leftover_sessions_closed")
    assert closed[2]["rows"] == 1


def test_a_write_lock_during_late_idle_keeps_the_rows_in_order_and_loses_none(
    tmp_path: Path,
) -> None:
    """Idle is found late, so the idle row starts in the past, before the open session's last
    checkpoint. If the file refuses the session's close meanwhile (another process holds the
    write lock), the close and the idle row wait in memory and land in order once it is
    free: no overlap, nothing lost. (Polls fed straight to the session logic: no X here.)"""
    from host_agent.collectors.desktop import DesktopActivityCollector
    from host_agent.collectors.desktop.sessions import Activity, Observation
    from host_agent.config import DesktopCollectorConfig

    db_path = tmp_path / "desktop_activity.db"
    config = DesktopCollectorConfig(idle_timeout_seconds=60, checkpoint_interval_seconds=30)
    writer = WriteQueue.start_for(db_path, DESKTOP_ACTIVITY)
    try:
        collector = DesktopActivityCollector(config, writer, RecordingLog())
        editor = Activity("Editor", "main.py", 4242, "editor")

        def poll(t: float, idle: float) -> None:
            recorder = collector._recorder
            recorder.apply(recorder.tracker.observe(Observation(t, editor, idle)))

        for t in range(1000, 1060):  # input at 1000, then none; a checkpoint at 1030
            poll(float(t), 0.0 if t == 1000 else t - 1000.0)
        assert writer.flush(WAIT)
        with closing(connect(db_path)) as holder:
            holder.execute("BEGIN IMMEDIATE")  # another process's write lock, for a while
            poll(1060.0, 60.0)  # idle detected: end Editor at 1000, idle from 1000
            poll(1061.0, 0.0)  # input again
            assert not writer.flush(0.5)  # the file refuses: the rows wait
            holder.execute("ROLLBACK")
        assert writer.flush(WAIT)
    finally:
        writer.close()

    rows = read_rows(db_path)
    assert collector.store_errors == 0 and writer.rows_dropped == 0
    assert [(r["application_name"], r["is_idle"], r["end_time"]) for r in rows][:2] == [
        ("Editor", 0, 1000),
        ("idle", 1, 1061),
    ], rows
    for earlier, later in itertools.pairwise(rows):
        assert later["start_time"] >= earlier["end_time"], rows  # no overlap
