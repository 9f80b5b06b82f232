"""SyncLoop: when to run the engine. The daemon's schedule; it never gives up.

The first run starts at a random point of the first `start_jitter_seconds`. After a successful
run the next one is `interval_seconds` later, or sooner: `wake()` (new rows
written) brings it forward to `wake_delay_seconds` after the first wake, so a burst of writes
is shipped in one run; `trigger()` (an operator's request) runs at once. After a failed run the
next attempt waits a full-jitter exponential backoff: a uniform draw from
[0, min(cap, retry_backoff_seconds * 2^(failures-1))]. While backing off, new rows do not wake
the loop (that would hammer a server that is down); a trigger still does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import structlog

from host_agent.aio import first_of
from host_agent.errors import HostAgentError
from host_agent.retry import RetryPolicy
from host_agent.store.journal import Schedule
from host_agent.sync.engine import SyncEngine, SyncReport


class SyncLoop:
    def __init__(
        self,
        engine: SyncEngine,
        *,
        interval: float,
        backoff: RetryPolicy,
        wake_delay: float,
        start_jitter: float = 0.0,
        shutdown_grace: float = 10.0,
        log: Any = None,
    ) -> None:
        self.engine = engine
        self.interval = interval
        self.backoff = backoff
        self.wake_delay = wake_delay
        self.start_jitter = start_jitter
        self.shutdown_grace = shutdown_grace
        self.log = log or structlog.get_logger("host_agent.sync")
        self.consecutive_failures = 0
        self.next_attempt_at: float | None = None
        self.last_report: SyncReport | None = None
        self.last_success_at: float | None = None
        self.runs = 0
        # Called after every run with (report, duration in seconds); must not raise.
        self.listeners: list[Callable[[SyncReport, float], None]] = []
        # Called when a wake-up brings the next run forward; must not raise.
        self.schedule_listeners: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self._trigger = asyncio.Event()

    @property
    def next_run_at(self) -> float | None:
        """When the next run starts, as far as is known now (a pending wake-up included)."""
        return self.next_attempt_at

    def wake(self) -> None:
        """New rows were written (loop thread only). While healthy, the next run comes
        `wake_delay` seconds after the first wake-up since the last run."""
        if self.wake_delay <= 0 or self._wake.is_set():
            return
        self._wake.set()
        if self.consecutive_failures == 0:
            due = time.time() + self.wake_delay
            if self.next_attempt_at is None or due < self.next_attempt_at:
                self.next_attempt_at = due
                for listener in self.schedule_listeners:
                    listener()

    def trigger(self) -> None:
        """Run now, backoff or not."""
        self._trigger.set()

    async def run(self, stop: asyncio.Event) -> None:
        if self.start_jitter > 0:
            # A fleet restarted together (a reboot, a package update) does not stampede the
            # server: each agent's first run comes at a random point of this window.
            delay = random.uniform(0, self.start_jitter)
            self.next_attempt_at = time.time() + delay
            await first_of(stop.wait(), self._trigger.wait(), seconds=delay)
        while not stop.is_set():
            self._wake.clear()
            self._trigger.clear()
            started = time.monotonic()
            report = await self._run_once(stop)
            # Hold no server connection between runs: a fleet of idle agents costs the server
            # nothing, and the next run connects afresh.
            await self.engine.release()
            if report is None:
                break
            await self._after_run(report, time.monotonic() - started)
            if stop.is_set():
                break
            await self._sleep(stop)

    async def _run_once(self, stop: asyncio.Event) -> SyncReport | None:
        """One engine run. When `stop` is set meanwhile, the run has `shutdown_grace`
        seconds to finish its batch (it stops between batches by itself); after that it is
        cancelled: a connect or retry in progress ends, an uncommitted batch is dropped with
        its connection (the server rolls it back), a marking in progress completes."""
        run = asyncio.ensure_future(self.engine.sync_all(stop))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({run, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not run.done():
                await asyncio.wait({run}, timeout=self.shutdown_grace)
            if not run.done():
                self.log.warning("sync.abandoned_for_shutdown", grace_seconds=self.shutdown_grace)
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
                return None
            return run.result()
        finally:
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)

    async def _after_run(self, report: SyncReport, duration: float) -> None:
        now = time.time()
        error = report.first_error
        if error is None:
            self.consecutive_failures = 0
            self.last_success_at = now
            delay = self.interval
        else:
            self.consecutive_failures += 1
            delay = self.backoff.delay(self.consecutive_failures)
            asked = getattr(error, "retry_after", None)
            if asked is not None:  # a gateway's Retry-After: never come back sooner
                delay = max(delay, float(asked))
        self.next_attempt_at = now + delay
        if error is None and self._wake.is_set():  # rows arrived during the run
            self.next_attempt_at = min(self.next_attempt_at, now + self.wake_delay)
        await self._save_state()
        if error is not None:
            self.log.warning(
                "sync.backing_off",
                failures=self.consecutive_failures,
                retry_in_seconds=round(delay, 1),
                error=str(error),
            )
        self.last_report = report
        for listener in self.listeners:
            listener(report, duration)
        self.runs += 1

    async def _save_state(self) -> None:
        """The schedule, for `host-agent status` (the engine saves each run's outcome)."""
        schedule = Schedule(
            consecutive_failures=self.consecutive_failures,
            backoff_seconds=self.backoff.ceiling(self.consecutive_failures),
            next_attempt_at=self.next_attempt_at,
        )
        for source in self.engine.sources:
            try:
                await source.save_schedule(schedule)
            except HostAgentError as exc:  # status is advisory; never stop syncing over it
                self.log.warning("sync.state_not_saved", table=source.table.name, error=str(exc))

    async def _sleep(self, stop: asyncio.Event) -> None:
        deadline = self.next_attempt_at or time.time()
        healthy = self.consecutive_failures == 0
        waits = [stop.wait(), self._trigger.wait()]
        if healthy:
            waits.append(self._wake.wait())
        await first_of(*waits, seconds=max(0.0, deadline - time.time()))
        if healthy and self._wake.is_set() and not (stop.is_set() or self._trigger.is_set()):
            # Coalesce a burst: give the writers wake_delay seconds before shipping.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.wake_delay)
