"""The desktop session state machine: observations in, session commands out. No I/O, no X.

`SessionTracker.observe` turns one poll's `Observation` into `Opened` / `Extended` / `Closed`
commands; the collector writes them (insert on open, update on checkpoint and close). All times
are the injected clock's epoch seconds, so the rules below are testable with synthetic input.

Rules, in the order `observe` applies them:

1. Gap: when the time since the previous poll is negative or longer than `gap_threshold`
   (suspend, a frozen process, the clock set back), the open session ends at the previous poll,
   not stretched over the gap, and recording starts afresh at this poll.
2. Idle: once X reports `idle_seconds >= idle_timeout`, input stopped at `t0 = time -
   idle_seconds`, never before this stretch of polls began nor before a session opened by a
   poll that saw fresh input (that input likely caused it). Idle is only known that late, so
   what was recorded since t0 is revised: the session open at t0 ends at t0, and sessions
   opened after it (a title or focus change without input: a chat client's unread counter, a
   build finishing) become idle rows that follow each other from t0, the newest staying open as
   the idle session (`Revised`); with nothing recorded since t0, the open session ends at t0
   and a new idle session begins there. While idle, focus changes are ignored. The first poll
   with fresh input ends the idle session at the moment input resumed and opens the focused
   activity from that moment.
3. Focus: a change of application, title or pid ends the open session and starts a new one at
   this poll. `activity=None` (no focused window, or an excluded application) ends the open
   session and records nothing until something recordable is focused.
4. Checkpoint: every `checkpoint_interval` the open session is extended to "now", so a crash
   loses at most that much.

Sessions never overlap and follow each other without holes while something is recorded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

IDLE_APPLICATION = "idle"
UNKNOWN_APPLICATION = "unknown"
REDACTED_TITLE = "[redacted]"

# Polls are expected every poll_interval; a few missed polls are scheduling noise, but ten
# seconds without a poll means the machine or the process was not running (suspend, SIGSTOP,
# a hung X request), and that time must not be credited to the window focused before it.
GAP_MIN_SECONDS = 10.0
GAP_POLL_FACTOR = 3.0


def gap_threshold(poll_interval: float) -> float:
    return max(GAP_POLL_FACTOR * poll_interval, GAP_MIN_SECONDS)


@dataclass(frozen=True)
class WindowInfo:
    """What the X server says about the focused window (all fields may be missing)."""

    window_id: int
    wm_class: str | None  # the class part of WM_CLASS, e.g. "XTerm"
    wm_instance: str | None  # the instance part of WM_CLASS, e.g. "xterm"
    title: str | None
    pid: int | None
    process_name: str | None


@dataclass(frozen=True)
class Activity:
    """A recordable focused window, after exclusion and redaction."""

    application: str
    title: str | None
    pid: int | None
    process_name: str | None


@dataclass(frozen=True)
class Observation:
    time: float
    activity: Activity | None  # None: nothing to record (no focused window, or excluded)
    idle_seconds: float | None  # None: the X server cannot tell


@dataclass(frozen=True)
class Session:
    start: float
    application: str
    title: str | None
    pid: int | None
    process_name: str | None
    is_idle: bool


@dataclass(frozen=True)
class Opened:
    session: Session


@dataclass(frozen=True)
class Extended:
    """Checkpoint: the still-open session lasts at least until `end`."""

    session: Session
    end: float


@dataclass(frozen=True)
class Closed:
    session: Session
    end: float
    reason: str  # changed, idle, active, unrecorded, gap, interrupted, stopped


@dataclass(frozen=True)
class Revision:
    """The row recorded for `old` now describes `new` and ends (or is checkpointed) at `end`."""

    old: Session
    new: Session
    end: float


@dataclass(frozen=True)
class Revised:
    """Idle found after the fact: rows recorded since input stopped, rewritten together.

    Rewritten rather than deleted: an update is shipped again (newest wins), a deletion is not.
    """

    revisions: tuple[Revision, ...]


Command = Opened | Extended | Closed | Revised


def application_name(window: WindowInfo) -> str:
    """WM_CLASS class, else its instance, else the process name; "unknown" only as last resort."""
    for candidate in (window.wm_class, window.wm_instance, window.process_name):
        if candidate and candidate.strip():
            return candidate.strip()
    return UNKNOWN_APPLICATION


class Privacy:
    """Applies `exclude_applications` and `redact_title_patterns` before anything is recorded."""

    def __init__(
        self, exclude_applications: Iterable[str], redact_title_patterns: Iterable[str]
    ) -> None:
        self._excluded = {name.strip().casefold() for name in exclude_applications if name.strip()}
        self._patterns = [re.compile(pattern) for pattern in redact_title_patterns]

    def excluded(self, window: WindowInfo) -> bool:
        # The process name counts too: a window without WM_CLASS must not slip through an
        # exclusion its user wrote with the program's name in mind.
        names = (window.wm_class, window.wm_instance, window.process_name, application_name(window))
        return any(name is not None and name.casefold() in self._excluded for name in names)

    def redact(self, title: str | None) -> str | None:
        if not title:
            return None
        if any(pattern.search(title) for pattern in self._patterns):
            return REDACTED_TITLE
        return title

    def activity(self, window: WindowInfo | None) -> Activity | None:
        if window is None or self.excluded(window):
            return None
        return Activity(
            application=application_name(window),
            title=self.redact(window.title),
            pid=window.pid,
            process_name=window.process_name,
        )


def _same(session: Session, activity: Activity) -> bool:
    return (
        not session.is_idle
        and session.application == activity.application
        and session.title == activity.title
        and session.pid == activity.pid
    )


class SessionTracker:
    """Pure session bookkeeping; see the module docstring for the rules."""

    def __init__(
        self, *, idle_timeout: float, checkpoint_interval: float, gap_threshold: float
    ) -> None:
        self._idle_timeout = idle_timeout
        self._checkpoint_interval = checkpoint_interval
        self._gap = gap_threshold
        self._open: Session | None = None
        self._checkpointed = 0.0
        self._last: float | None = None  # time of the previous observation in this stretch
        # Nothing may be revised or start before this (start of the stretch, end of a session
        # that can no longer change): sessions must not overlap.
        self._floor = -math.inf
        self._input = -math.inf  # latest moment input was seen in this stretch
        # Sessions closed after the latest input seen: idle detected later may revise them.
        self._recent: list[tuple[Session, float]] = []
        self.gaps = 0

    @property
    def open_session(self) -> Session | None:
        return self._open

    @property
    def revisable(self) -> tuple[Session, ...]:
        """Closed sessions a later `Revised` may still rewrite; older ones are final."""
        return tuple(session for session, _ in self._recent)

    @property
    def last_observation(self) -> float | None:
        return self._last

    def observe(self, obs: Observation) -> list[Command]:
        now = obs.time
        commands: list[Command] = []
        if self._last is not None and not 0 <= now - self._last <= self._gap:
            self.gaps += 1
            commands += self._close(self._last, "gap")
            self._last = None
        previous = self._last
        if previous is None:
            self._floor, self._input, self._recent = now, -math.inf, []
        self._last = now

        idle = obs.idle_seconds
        current = self._open
        if idle is not None and idle >= self._idle_timeout:
            if current is None or not current.is_idle:
                commands += self._go_idle(now, min(max(now - idle, self._floor), now))
        else:
            # Without the screen-saver extension every poll counts as input.
            input_at = now if idle is None else min(now - idle, now)
            if current is not None and current.is_idle:
                since = max(input_at, current.start)
                commands += self._close(since, "active")
                if obs.activity is not None:
                    commands += self._start(_session(obs.activity, since))
            elif obs.activity is None:
                commands += self._close(now, "unrecorded")
            elif current is None or not _same(current, obs.activity):
                commands += self._close(now, "changed")
                commands += self._start(_session(obs.activity, now))
            if self._open is not None and (previous is None or input_at > previous):
                # Input since the previous poll may be what changed the focus (a click, a
                # key): the session it opened is the user's, and idle never starts before it.
                self._floor = max(self._floor, self._open.start)
            self._settle(input_at)

        if self._open is not None and now - self._checkpointed >= self._checkpoint_interval:
            self._checkpointed = now
            commands.append(Extended(self._open, now))
        return commands

    def interrupt(self) -> list[Command]:
        """The X server went away: end the open session at the last poll that saw it."""
        commands = self._close(self._last, "interrupted") if self._last is not None else []
        self._last = None
        return commands

    def finish(self, now: float) -> list[Command]:
        """Stop: end the open session now, or at the last poll if `now` is past a gap."""
        if self._last is None:
            return []
        end = now if 0 <= now - self._last <= self._gap else self._last
        self._last = None
        return self._close(end, "stopped")

    def _go_idle(self, now: float, since: float) -> list[Command]:
        """Input stopped at `since`: nothing recorded after it may count as activity."""
        self._settle(since)
        current = self._open
        if current is not None and current.start <= since:
            # The usual case: no change since input stopped.
            return self._close(since, "idle") + self._start(_idle(since))
        revisions: list[Revision] = []
        start = since  # idle rows follow each other from `since`, holes between them filled
        for session, end in self._recent:
            if session.start <= since:
                revisions.append(Revision(session, session, since))
            else:
                revisions.append(Revision(session, _idle(start), end))
                start = end
        self._recent = []
        if current is None and revisions and revisions[-1].new.is_idle:
            # Nothing open to reuse: the newest revised row becomes the open idle session.
            newest = revisions.pop()
            current, start = newest.old, newest.new.start
        if current is None:
            commands: list[Command] = [Revised(tuple(revisions))] if revisions else []
            return commands + self._start(_idle(start))
        idle = _idle(start)
        revisions.append(Revision(current, idle, now))
        self._open, self._checkpointed = idle, now
        return [Revised(tuple(revisions))]

    def _settle(self, input_at: float) -> None:
        """Input was seen at `input_at`: sessions closed by then can no longer be revised."""
        self._input = max(self._input, input_at)
        while self._recent and self._recent[0][1] <= self._input:
            _, end = self._recent.pop(0)
            self._floor = max(self._floor, end)

    def _start(self, session: Session) -> list[Command]:
        self._open = session
        self._checkpointed = session.start
        return [Opened(session)]

    def _close(self, end: float, reason: str) -> list[Command]:
        session = self._open
        if session is None:
            return []
        end = max(end, session.start)
        self._open = None
        self._recent.append((session, end))
        return [Closed(session, end, reason)]


def _idle(start: float) -> Session:
    return Session(start, IDLE_APPLICATION, None, None, None, is_idle=True)


def _session(activity: Activity, start: float) -> Session:
    return Session(
        start=start,
        application=activity.application,
        title=activity.title,
        pid=activity.pid,
        process_name=activity.process_name,
        is_idle=False,
    )
