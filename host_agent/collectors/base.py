"""What every collector is to the agent, and the one way a collector's blocking work is run.

`Collector` is the protocol the agent, the health endpoint and the metrics rely on. A collector
whose work blocks (X11 requests, filesystem walks, SQLite writes) runs it in threads of its own
through `run_in_threads`, which bridges them to asyncio: the event loop only waits.

States (`Collector.state`) start with one of these words, so a reader can tell them apart:
"starting", "running", "reconnecting", "idle: ..." (nothing to record, as configured),
"disabled: ..." (off, and why), "failed: ..." (not recording, and why; the agent goes on),
"stopped".
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any, Protocol

STARTING = "starting"
RUNNING = "running"
RECONNECTING = "reconnecting"
STOPPED = "stopped"
DISABLED = "disabled: by configuration"
FAILED = "failed: see log"


def disabled(reason: str) -> str:
    return f"disabled: {reason}"


def failed(reason: str) -> str:
    return f"failed: {reason}"


def idle(reason: str) -> str:
    return f"idle: {reason}"


class Collector(Protocol):
    """A source of rows for the local store, as the agent runs and reports it.

    `run(stop)` records until `stop` is set, then flushes what it holds, closes what it opened
    and returns. It never raises for conditions it can recover from (an X server gone, a watch
    refused), nor for a bug in its worker threads: those are logged and shown in `state`.
    """

    @property
    def name(self) -> str:
        """Stable name for health output and metric labels."""
        ...

    @property
    def state(self) -> str:
        """One of the states in this module's docstring."""
        ...

    @property
    def errors(self) -> int:
        """Failures it recovered from (or gave up on), exported as a counter."""
        ...

    @property
    def ready(self) -> asyncio.Event:
        """Set once it records (or once it is clear it will not, for now)."""
        ...

    def counters(self) -> dict[str, int]:
        """Plain counters for metrics, by name."""
        ...

    async def run(self, stop: asyncio.Event) -> None: ...


class ThreadedCollector(Protocol):
    """What `run_in_threads` updates on the collector it runs."""

    state: str

    @property
    def ready(self) -> asyncio.Event: ...


async def wait_stopped(collector: ThreadedCollector, state: str, stop: asyncio.Event) -> None:
    """Record nothing, in `state`, until `stop`: for a collector that is off or has nothing
    to watch. It is ready at once (nothing to wait for)."""
    collector.state = state
    collector.ready.set()
    await stop.wait()
    collector.state = STOPPED


def describe(exc: BaseException) -> str:
    """An exception as a log field: its type, and its message if it has one."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def call_from_thread(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """Run `callback` on `loop`'s thread soon; nothing happens once the loop is closed (nobody
    is waiting any more)."""
    with suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


async def run_in_threads(
    collector: ThreadedCollector,
    stop: asyncio.Event,
    workers: Mapping[str, Callable[[], None]],
    *,
    halt: Callable[[], None],
    log: Any,
    crash_event: str,
    watchdog: Callable[[], None] | None = None,
    watchdog_seconds: float = 1.0,
    unblock: Callable[[], None] | None = None,
    grace_seconds: float = 0.0,
) -> None:
    """Run each of `workers` (thread name -> blocking function) in a thread of its own, until
    `stop` is set or a worker returns; then `halt()` and wait for all of them, without ever
    blocking the event loop. Returns after `stop`, with the collector "stopped".

    - `halt` must be thread-safe and make every worker return soon.
    - `watchdog`, if given, runs on the loop every `watchdog_seconds` while the workers run
      (to notice a request that hangs, say); it must not block.
    - `unblock`, if given, is called when the workers have not returned `grace_seconds` after
      `halt` (a request stuck on a frozen server); the wait then goes on.
    - A worker that raises, or returns before `stop`, is a bug: it is logged as `crash_event`
      with its traceback, the collector's state becomes "failed: see log", and the agent keeps
      running until `stop` as usual.

    The threads are daemon threads: only a worker stuck beyond `unblock` could outlive this
    call, and it must not then keep the process from exiting.
    """
    loop = asyncio.get_running_loop()
    crashed = threading.Event()

    def main(work: Callable[[], None], finished: asyncio.Future[None]) -> None:
        try:
            work()
        except BaseException as exc:  # a bug: say so loudly, but keep the agent alive
            crashed.set()
            log.error(crash_event, error=describe(exc), exc_info=True)
        finally:
            call_from_thread(loop, lambda: _resolve(finished))

    finished: list[asyncio.Future[None]] = []
    for thread_name, work in workers.items():
        future: asyncio.Future[None] = loop.create_future()
        finished.append(future)
        threading.Thread(target=main, args=(work, future), name=thread_name, daemon=True).start()
    try:
        await _supervise(stop, finished, watchdog, watchdog_seconds)
    finally:
        halt()
        await _join(finished, unblock, grace_seconds)
        collector.ready.set()  # whoever waits for it must not wait for a worker that is gone
    if crashed.is_set() or not stop.is_set():
        collector.state = FAILED
        await stop.wait()
    collector.state = STOPPED


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _supervise(
    stop: asyncio.Event,
    finished: list[asyncio.Future[None]],
    watchdog: Callable[[], None] | None,
    period: float,
) -> None:
    """Return when `stop` is set or any worker has ended, calling `watchdog` meanwhile."""
    stop_waiter = asyncio.ensure_future(stop.wait())
    waiting: set[asyncio.Future[Any]] = {stop_waiter, *finished}
    try:
        while not any(future.done() for future in waiting):
            await asyncio.wait(
                waiting,
                timeout=period if watchdog is not None else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if watchdog is not None:
                watchdog()
    finally:
        stop_waiter.cancel()
        with suppress(asyncio.CancelledError):
            await stop_waiter


async def _join(
    finished: list[asyncio.Future[None]], unblock: Callable[[], None] | None, grace: float
) -> None:
    if unblock is not None:
        _, pending = await asyncio.wait(finished, timeout=grace)
        if pending:
            unblock()
    await asyncio.wait(finished)
