"""How far a table's run has come: rows shipped of the backlog, the rate, the time left.

The engine updates a `TableProgress` after every settled batch and hands it to whoever
watches (`SyncEngine.on_progress`: the progress line of `sync --once` on a terminal), and logs
a `sync.progress` event every `PROGRESS_LOG_SECONDS` while a table's run lasts longer than
that (the daemon's and any non-terminal run's view of a long catch-up).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

PROGRESS_LOG_SECONDS = 10.0
RATE_AFTER_SECONDS = 0.5  # a rate measured over less than this says little


@dataclass
class TableProgress:
    table: str
    backlog: int  # unsynced rows when the table's run began (more may arrive meanwhile)
    shipped: int = 0  # rows written or refused so far in this run
    done: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def left(self) -> int:
        return max(0, self.backlog - self.shipped)

    @property
    def rate(self) -> float | None:
        """Rows per second over the run so far."""
        elapsed = self.elapsed
        if elapsed < RATE_AFTER_SECONDS or self.shipped == 0:
            return None
        return self.shipped / elapsed

    @property
    def seconds_left(self) -> float | None:
        rate = self.rate
        return None if rate is None else self.left / rate


class ProgressLog:
    """Logs `sync.progress` for a table at most every `every` seconds, the first time only
    once its run has lasted that long."""

    def __init__(self, log: object, every: float = PROGRESS_LOG_SECONDS) -> None:
        self._log = log
        self.every = every
        self._last: dict[str, float] = {}

    def __call__(self, progress: TableProgress) -> None:
        if progress.done:
            self._last.pop(progress.table, None)
            return
        now = time.monotonic()
        last = self._last.setdefault(progress.table, progress.started)
        if now - last < self.every:
            return
        self._last[progress.table] = now
        rate = progress.rate
        seconds_left = progress.seconds_left
        self._log.info(  # type: ignore[attr-defined]
            "sync.progress",
            table=progress.table,
            shipped=progress.shipped,
            backlog_left=progress.left,
            rows_per_second=None if rate is None else round(rate),
            seconds_left=None if seconds_left is None else round(seconds_left),
        )
