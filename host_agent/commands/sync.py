"""`host-agent sync --once | --retry-rejected`: ship everything unsynced now and exit.

On a terminal, a progress line per table (rows shipped of the backlog, rows/s, time left)
redraws in place on stderr; tqdm draws it (small, no dependencies of its own, and it handles
the terminal's width and redrawing). Without a terminal nothing of it is written, and the
engine's `sync.progress` log events (every 10 s of a long run) say the same instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from tqdm import tqdm

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import open_sync, prepare_stores
from host_agent.sync.engine import SyncReport
from host_agent.sync.progress import TableProgress


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


class ProgressLines:
    """One tqdm line per table, closed when the table's run ends."""

    def __init__(self) -> None:
        self._bars: dict[str, tqdm[Any]] = {}

    def __call__(self, progress: TableProgress) -> None:
        if progress.table not in self._bars:
            if progress.backlog == 0 and progress.shipped == 0:
                return  # nothing to ship: the summary line says so
            sized = _terminal_columns() > 0  # a terminal that does not say its size: 80
            self._bars[progress.table] = tqdm(
                total=progress.backlog,
                desc=progress.table,
                unit=" rows",
                unit_scale=True,
                file=sys.stderr,
                dynamic_ncols=sized,
                ncols=None if sized else 80,
                nrows=None if sized else 24,  # tqdm hides lines below a height of 0
                mininterval=0.2,
                leave=True,
            )
        bar = self._bars[progress.table]
        if progress.shipped > (bar.total or 0):  # rows arrived after the run began
            bar.total = progress.shipped
        bar.update(progress.shipped - bar.n)
        if progress.done:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


async def sync_once(
    config: AgentConfig, *, retry_rejected: bool = False, progress: bool = False
) -> SyncReport:
    """Ship everything unsynced now. Gives up on a server that cannot be reached or does not
    answer within `data_sync.once_deadline_seconds`. `progress`: draw progress lines on
    stderr (a terminal)."""
    await asyncio.to_thread(prepare_stores, config, integrity=True)
    lines = ProgressLines() if progress else None
    try:
        async with open_sync(config, once=True) as engine:
            if lines is not None:
                engine.on_progress = lines
                engine.progress_log = None  # the line says it; log lines would break it
            if retry_rejected:
                await engine.release_rejected()
            return await engine.sync_all()
    finally:
        if lines is not None:
            lines.close()
