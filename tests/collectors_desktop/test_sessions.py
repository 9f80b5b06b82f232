"""SessionTracker and Privacy: the pure session rules, with synthetic observations."""

from __future__ import annotations

import itertools
from typing import Any

from host_agent.collectors.desktop.sessions import (
    REDACTED_TITLE,
    Activity,
    Closed,
    Command,
    Extended,
    Observation,
    Opened,
    Privacy,
    Revised,
    Session,
    SessionTracker,
    WindowInfo,
)

# --- the pure state machine ------------------------------------------------------------------


def _tracker(gap: float = 10) -> SessionTracker:
    return SessionTracker(idle_timeout=60, checkpoint_interval=30, gap_threshold=gap)


EDITOR = Activity("Editor", "file.py", 10, "editor")
BROWSER = Activity("Browser", "docs", 20, "browser")


class Table:
    """Applies commands as the collector does: a row per session, found by identity."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._rows: list[tuple[Session, dict[str, Any]]] = []

    def apply(self, commands: list[Command]) -> list[Command]:
        for command in commands:
            if isinstance(command, Opened):
                row = {"session": command.session, "end": None}
                self.rows.append(row)
                self._rows.append((command.session, row))
            elif isinstance(command, Revised):
                for revision in command.revisions:
                    row = self._row(revision.old)
                    row.update(session=revision.new, end=revision.end)
                    self._rows.append((revision.new, row))
            else:
                self._row(command.session)["end"] = command.end
        return commands

    def _row(self, session: Session) -> dict[str, Any]:
        return next(row for known, row in self._rows if known is session)

    def spans(self) -> list[tuple[str, str | None, float, float | None]]:
        """(application, title, start, end) of every row, checked to follow each other."""
        spans = [
            (row["session"].application, row["session"].title, row["session"].start, row["end"])
            for row in self.rows
        ]
        for (_, _, start, end), (_, _, later, _) in itertools.pairwise(spans):
            assert end is not None and start <= end <= later, spans
        return spans


def observe_all(
    tracker: SessionTracker, table: Table, polls: list[tuple[float, Activity | None, float]]
) -> None:
    for time, activity, idle in polls:
        table.apply(tracker.observe(Observation(time, activity, idle)))


def test_tracker_focus_change_without_input_is_revised_into_idle() -> None:
    tracker = _tracker(gap=100)
    table = Table()
    # Input last at 1000; at 1005 the focus moved without input (a window raising itself).
    observe_all(tracker, table, [(990, EDITOR, 0), (1000, EDITOR, 0), (1005, BROWSER, 5)])
    (revised,) = table.apply(tracker.observe(Observation(1070, BROWSER, 70)))
    assert isinstance(revised, Revised)
    editor, browser = (revision.old for revision in revised.revisions)
    assert editor.application == "Editor" and browser.application == "Browser"
    assert [(r.new, r.end) for r in revised.revisions] == [
        (editor, 1000),  # ends when input stopped
        (Session(1000, "idle", None, None, None, is_idle=True), 1070),  # reused, checkpointed
    ]
    assert tracker.open_session is revised.revisions[-1].new
    closed, opened = table.apply(tracker.observe(Observation(1100, BROWSER, 0)))
    assert closed == Closed(revised.revisions[-1].new, 1100, "active")
    assert isinstance(opened, Opened) and opened.session == Session(
        1100, "Browser", "docs", 20, "browser", is_idle=False
    )
    assert table.spans() == [
        ("Editor", "file.py", 990, 1000),
        ("idle", None, 1000, 1100),
        ("Browser", "docs", 1100, None),
    ]


def test_tracker_idle_never_starts_before_a_session_opened_by_input() -> None:
    # A key switched to Browser at 1000.5, seen by the poll at 1001; then nothing. The switch
    # was the user's: Browser is kept (zero-length) and idle starts where it does.
    tracker, table = _tracker(gap=100), Table()
    polls: list[tuple[float, Activity | None, float]] = [(990, EDITOR, 0), (1000, EDITOR, 0)]
    polls += [(1001, BROWSER, 0.5), (1030, BROWSER, 29.5)]
    observe_all(tracker, table, polls)
    closed, opened, checkpoint = table.apply(tracker.observe(Observation(1061, BROWSER, 60.5)))
    assert isinstance(closed, Closed) and closed.reason == "idle" and closed.end == 1001
    assert isinstance(opened, Opened) and opened.session.is_idle
    assert checkpoint == Extended(opened.session, 1061)  # known late: checkpointed at once
    assert table.spans() == [
        ("Editor", "file.py", 990, 1001),
        ("Browser", "docs", 1001, 1001),
        ("idle", None, 1001, 1061),
    ]


def _slack(title: str) -> Activity:
    return Activity("Slack", title, 30, "slack")


def test_tracker_title_churn_while_idle_is_not_counted_as_work() -> None:
    # No input from 1000; the title changes at 1100 and 1170 (unread counters); idle is
    # detected at 1180. Before the fix: Slack 1000-1100 and "(1) Slack" 1100-1170 were work.
    tracker = SessionTracker(idle_timeout=180, checkpoint_interval=1000, gap_threshold=100)
    table = Table()
    polls: list[tuple[float, Activity | None, float]] = [(900, _slack("Slack"), 0)]
    polls += [(t, _slack("Slack"), max(0, t - 1000)) for t in range(910, 1100, 10)]
    polls += [(t, _slack("(1) Slack"), t - 1000) for t in range(1100, 1170, 10)]
    polls += [(1170, _slack("(2) Slack"), 170), (1180, _slack("(2) Slack"), 180)]
    polls += [(t, _slack("(3) Slack"), t - 1000) for t in range(1190, 1300, 10)]  # ignored
    polls += [(1300, _slack("(3) Slack"), 0.5)]  # input again at 1299.5
    observe_all(tracker, table, polls)

    assert table.spans() == [
        ("Slack", "Slack", 900, 1000),  # ends when input stopped
        ("idle", None, 1000, 1170),  # was "(1) Slack" 1100-1170
        ("idle", None, 1170, 1299.5),  # was "(2) Slack", then the idle session
        ("Slack", "(3) Slack", 1299.5, None),
    ]
    assert all(row["session"].is_idle for row in table.rows[1:3])


def test_tracker_idle_after_unrecorded_focus_covers_the_time_since_input() -> None:
    excluded = None
    # Input stopped at 1000 in Editor; an excluded window had focus 1030-1050, then Browser.
    tracker, table = _tracker(gap=100), Table()
    polls: list[tuple[float, Activity | None, float]] = [(990, EDITOR, 0), (1000, EDITOR, 0)]
    polls += [(1030, excluded, 30), (1050, BROWSER, 50), (1060, BROWSER, 60)]
    observe_all(tracker, table, polls)
    assert table.spans() == [("Editor", "file.py", 990, 1000), ("idle", None, 1000, 1060)]
    assert tracker.open_session is table.rows[1]["session"]

    # Nothing recorded after input stopped: the session is cut, a new idle row opens at t0.
    tracker, table = _tracker(gap=100), Table()
    observe_all(tracker, table, [(1000, EDITOR, 0), (1010, EDITOR, 0), (1030, excluded, 20)])
    observe_all(tracker, table, [(1070, excluded, 60), (1080, BROWSER, 70)])
    # (the idle row is open; 1070 is the checkpoint made as it opened 60 s after its start)
    assert table.spans() == [("Editor", "file.py", 1000, 1010), ("idle", None, 1010, 1070)]

    # Recorded, then unrecorded when idle is found: the recorded row becomes the idle session.
    tracker, table = _tracker(gap=100), Table()
    polls = [(1000, EDITOR, 0), (1010, EDITOR, 0)]
    polls += [(1040, BROWSER, 30), (1050, excluded, 40), (1070, excluded, 60)]
    observe_all(tracker, table, polls)
    assert table.spans() == [("Editor", "file.py", 1000, 1010), ("idle", None, 1010, 1070)]
    assert tracker.open_session is table.rows[1]["session"]
    observe_all(tracker, table, [(1075, BROWSER, 1)])
    assert table.spans()[1:] == [("idle", None, 1010, 1074), ("Browser", "docs", 1074, None)]


def test_tracker_never_revises_across_a_gap() -> None:
    tracker, table = _tracker(gap=100), Table()
    # Input stopped at 1000, then a suspend: the stretch after it starts at 2000.
    observe_all(tracker, table, [(1000, EDITOR, 0), (1030, EDITOR, 30), (2000, BROWSER, 1000)])
    assert table.spans() == [("Editor", "file.py", 1000, 1030), ("idle", None, 2000, None)]
    assert tracker.revisable == ()


def test_tracker_clock_going_back_is_a_gap_and_stop_after_gap_uses_last_poll() -> None:
    tracker = _tracker()
    tracker.observe(Observation(1000, EDITOR, 0))
    tracker.observe(Observation(1001, EDITOR, 0))
    commands = tracker.observe(Observation(900, EDITOR, 0))
    assert [type(c) for c in commands] == [Closed, Opened]
    assert isinstance(commands[0], Closed) and commands[0].end == 1001
    session = tracker.open_session
    assert session is not None and session.start == 900
    assert tracker.finish(2000) == [Closed(session, 900, "stopped")]


def test_tracker_checkpoints_and_excluded_focus() -> None:
    tracker = _tracker(gap=100)
    tracker.observe(Observation(1000, EDITOR, 0))
    assert tracker.observe(Observation(1029, EDITOR, 0)) == []
    (checkpoint,) = tracker.observe(Observation(1030, EDITOR, 0))
    assert isinstance(checkpoint, Extended) and checkpoint.end == 1030
    (closed,) = tracker.observe(Observation(1031, None, 0))
    assert isinstance(closed, Closed) and closed.reason == "unrecorded"
    assert tracker.open_session is None


def test_privacy_matches_class_instance_and_process_case_insensitively() -> None:
    privacy = Privacy(["keepassxc", "Firefox"], [r"\bbank\b"])
    window = WindowInfo(1, "KeePassXC", "keepassxc", "db.kdbx", 5, "keepassxc")
    assert privacy.activity(window) is None
    by_instance = WindowInfo(1, "Navigator", "firefox", "x", 6, "firefox-bin")
    assert privacy.activity(by_instance) is None
    by_process = WindowInfo(1, None, None, "x", 7, "FIREFOX")
    assert privacy.activity(by_process) is None
    kept = privacy.activity(WindowInfo(1, None, None, "my bank account", 8, "chromium"))
    assert kept == Activity("chromium", REDACTED_TITLE, 8, "chromium")
