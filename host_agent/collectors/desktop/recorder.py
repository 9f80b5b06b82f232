"""Recording desktop sessions: observations into the pure `SessionTracker`, its commands into
store writes. Runs on the collector's worker thread; knows nothing of X.

Rows: a session is inserted when it starts (end_time NULL), extended every
`checkpoint_interval_seconds` and given its final end when it closes; idle detected after a
title or focus change rewrites the rows recorded since input stopped (`sessions.Revised`).
Times are whole epoch seconds from the injected clock, floored, so one session's end equals the
next one's start. At start, rows a killed process left open are closed (see
`SessionRecorder.close_leftover_rows`).

Writes go to the store's write queue and never wait for SQLite: while the file refuses them
(locked, disk full) they wait in memory, in order, so a session's close always lands before
the rows recorded after it, and nothing overlaps. An insert gives a `RowRef` that later updates
of the row use; a row the store refuses for good (the size cap under `stop_collecting`) takes
its later updates with it, so an end never lands on another session's row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import closing
from typing import Any

from host_agent.collectors.base import describe
from host_agent.collectors.desktop.rows import end_columns, opened_row, revised_row
from host_agent.collectors.desktop.sessions import (
    Closed,
    Command,
    Observation,
    Opened,
    Revised,
    Revision,
    Session,
    SessionTracker,
)
from host_agent.store.connection import connect
from host_agent.store.queue import RowRef, WriteQueue


class SessionRecorder:
    """Writes what `tracker` decides through `writer`. `sessions_recorded` counts session rows
    handed to the store, `store_errors` writes the queue no longer took (it was closed). Not
    thread-safe: one worker thread uses it."""

    def __init__(
        self, tracker: SessionTracker, writer: WriteQueue, log: Any, clock: Callable[[], float]
    ) -> None:
        self.tracker = tracker
        self.writer = writer
        self._log = log
        self._clock = clock
        # Rows of the open session and of the closed ones the tracker may still revise,
        # matched by identity (equal sessions may exist): id(session) -> (session, row),
        # which keeps each key's session alive.
        self._rows: dict[int, tuple[Session, RowRef]] = {}
        self.sessions_recorded = 0
        self.store_errors = 0

    def record(self, observed: Observation) -> None:
        """One poll's observation."""
        previous, gaps = self.tracker.last_observation, self.tracker.gaps
        commands = self.tracker.observe(observed)
        if self.tracker.gaps != gaps and previous is not None:
            self._log.info(
                "desktop.gap_detected",
                seconds=round(observed.time - previous, 1),
                note="session closed at the last poll before the gap",
            )
        self.apply(commands)

    def interrupt(self) -> None:
        """The X server went away: the open session ends at the last poll that saw it."""
        self.apply(self.tracker.interrupt())

    def finish(self) -> None:
        """Stopping: the open session ends now."""
        self.apply(self.tracker.finish(self._clock()))

    def apply(self, commands: Sequence[Command]) -> None:
        """Hand `commands` to the store, in order; never raises (raising would end the poll
        and tear down a healthy X connection for a store problem)."""
        for command in commands:
            try:
                self._write_command(command)
            except Exception as exc:
                self.store_errors += 1
                self._log.error(
                    "desktop.store_write_failed",
                    command=type(command).__name__,
                    error=describe(exc),
                    exc_info=True,
                )
        keep = {id(self.tracker.open_session), *map(id, self.tracker.revisable)}
        for key in [key for key in self._rows if key not in keep]:
            del self._rows[key]

    def _write_command(self, command: Command) -> None:
        """The one place a command reaches the store: one write, one transaction."""
        if isinstance(command, Opened):
            row = self.writer.insert(opened_row(command.session, int(self._clock())))
            self._opened(command.session, row)
        elif isinstance(command, Revised):
            recorded = self._recorded(command.revisions)
            # One transaction: no half-revised idle period.
            self.writer.update_many([(row, revised_row(r.new, r.end)) for r, row in recorded])
            self._revised(recorded)
        elif (known := self._row_of(command.session)) is not None:
            self.writer.update(known, end_columns(int(command.session.start), int(command.end)))
            if isinstance(command, Closed):
                self._log.debug(
                    "desktop.session_closed",
                    application=command.session.application,
                    reason=command.reason,
                    seconds=round(command.end - command.session.start, 1),
                )

    def _opened(self, session: Session, row: RowRef) -> None:
        self._rows[id(session)] = (session, row)
        self.sessions_recorded += 1
        self._log.debug(
            "desktop.session_started", application=session.application, idle=session.is_idle
        )

    def _recorded(self, revisions: Sequence[Revision]) -> list[tuple[Revision, RowRef]]:
        """The revisions whose old session has a row, with that row's id."""
        found = [(r, self._row_of(r.old)) for r in revisions]
        return [(r, row) for r, row in found if row is not None]

    def _revised(self, recorded: list[tuple[Revision, RowRef]]) -> None:
        for revision, row in recorded:
            self._rows.pop(id(revision.old), None)
            self._rows[id(revision.new)] = (revision.new, row)
        self._log.debug("desktop.sessions_revised", rows=len(recorded), reason="idle")

    def _row_of(self, session: Session) -> RowRef | None:
        known = self._rows.get(id(session))
        return known[1] if known is not None and known[0] is session else None

    # --- rows left open by a killed process ------------------------------------------------

    def close_leftover_rows(self) -> None:
        """End the rows a killed process left open, so none stays open forever.

        A checkpoint writes end_time, so a row whose end_time is NULL was never checkpointed:
        all that is known is when it began, and it ends there. A row checkpointed before the
        kill already ends at its last checkpoint and is left alone. The update makes the sync
        engine ship the row again.
        """
        try:
            open_rows = self._rows_left_open()
            if not open_rows:
                return
            self.writer.update_many(
                [(row_id, end_columns(start, start)) for row_id, start in open_rows]
            )
        except Exception as exc:
            self.store_errors += 1
            self._log.error(
                "desktop.store_write_failed",
                command="close_leftover_rows",
                error=describe(exc),
                exc_info=True,
            )
            return
        self._log.info(
            "desktop.leftover_sessions_closed",
            rows=len(open_rows),
            note="left open by a process that was killed; ended at their start",
        )

    def _rows_left_open(self) -> list[tuple[int, int]]:
        """(id, start_time) of rows with end_time NULL, read on a short-lived connection.

        Nothing else writes this table before the first poll, so reading apart from the
        writer and then updating through it (which wakes the sync loop) is safe.
        """
        table, path = self.writer.table.name, self.writer.path
        if not path.exists():
            return []
        with closing(connect(path)) as conn:
            known = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
            if known is None:
                return []
            query = f"SELECT id, start_time FROM {table} WHERE end_time IS NULL ORDER BY id"
            return [(int(row_id), int(start)) for row_id, start in conn.execute(query)]
