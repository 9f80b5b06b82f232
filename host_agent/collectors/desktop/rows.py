"""The columns of a `desktop_activity_sessions` row. Times are whole epoch seconds, floored, so
one session's end equals the next one's start."""

from __future__ import annotations

from host_agent.collectors.desktop.sessions import Session
from host_agent.timefmt import iso


def session_columns(session: Session) -> dict[str, object]:
    """What a row says about its session, apart from when it ended."""
    start = int(session.start)
    return {
        "start_time": start,
        "start_time_iso": iso(start),
        "application_name": session.application,
        "window_title": session.title,
        "process_name": session.process_name,
        "pid": session.pid,
        "is_idle": int(session.is_idle),
    }


def end_columns(start: int, end: int) -> dict[str, object]:
    return {"end_time": end, "end_time_iso": iso(end), "duration_seconds": end - start}


def opened_row(session: Session, created_at: int) -> dict[str, object]:
    """The row inserted when a session starts: no end yet."""
    return {
        **session_columns(session),
        "end_time": None,
        "end_time_iso": None,
        "duration_seconds": None,
        "created_at": created_at,
    }


def revised_row(session: Session, end: float) -> dict[str, object]:
    """A recorded row rewritten to describe `session`, ending (or checkpointed) at `end`."""
    return {**session_columns(session), **end_columns(int(session.start), int(end))}
