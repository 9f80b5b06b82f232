"""The thread runner every collector uses: real threads, real events, waits against deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import structlog
from structlog.testing import capture_logs

from host_agent.collectors.base import FAILED, STARTING, STOPPED, run_in_threads

WAIT = 5.0


class Stub:
    def __init__(self) -> None:
        self.state = STARTING
        self.ready = asyncio.Event()


async def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_workers_run_until_stop_then_are_halted_and_joined() -> None:
    collector, stop, halt = Stub(), asyncio.Event(), threading.Event()
    started: list[str] = []

    def work(name: str) -> None:
        started.append(name)
        halt.wait()

    task = asyncio.create_task(
        run_in_threads(
            collector,
            stop,
            {"one": lambda: work("one"), "two": lambda: work("two")},
            halt=halt.set,
            log=structlog.get_logger(),
            crash_event="test.crashed",
        )
    )
    await wait_for(lambda: len(started) == 2, "both workers")
    assert not task.done() and not halt.is_set()
    stop.set()
    await asyncio.wait_for(task, WAIT)
    assert halt.is_set() and collector.state == STOPPED and collector.ready.is_set()
    names = ("one", "two")
    await wait_for(lambda: not any(t.name in names for t in threading.enumerate()), "the exits")


async def test_a_crashed_worker_is_a_failed_state_not_a_failed_agent() -> None:
    collector, stop, halt = Stub(), asyncio.Event(), threading.Event()

    def crash() -> None:
        raise RuntimeError("a bug")

    with capture_logs() as logs:
        task = asyncio.create_task(
            run_in_threads(
                collector,
                stop,
                {"steady": halt.wait, "crashing": crash},
                halt=halt.set,
                log=structlog.get_logger(),
                crash_event="test.crashed",
            )
        )
        await wait_for(lambda: collector.state == FAILED, "the failed state")
    assert halt.is_set()  # the other worker was told to stop
    assert collector.ready.is_set()  # nobody waits for a collector that is gone
    assert not task.done()  # returns only when asked to, like any collector
    (crash_log,) = [log for log in logs if log["event"] == "test.crashed"]
    assert crash_log["log_level"] == "error" and "a bug" in crash_log["error"]
    stop.set()
    await asyncio.wait_for(task, WAIT)
    assert collector.state == STOPPED


async def test_watchdog_runs_meanwhile_and_unblock_frees_a_stuck_worker() -> None:
    collector, stop = Stub(), asyncio.Event()
    halt, unstuck = threading.Event(), threading.Event()
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    task = asyncio.create_task(
        run_in_threads(
            collector,
            stop,
            {"stuck": unstuck.wait},  # ignores halt, as a request hung on a dead server would
            halt=halt.set,
            log=structlog.get_logger(),
            crash_event="test.crashed",
            watchdog=tick,
            watchdog_seconds=0.01,
            unblock=unstuck.set,
            grace_seconds=0.05,
        )
    )
    await wait_for(lambda: ticks >= 3, "watchdog ticks")
    stop.set()
    await asyncio.wait_for(task, WAIT)
    assert unstuck.is_set() and collector.state == STOPPED
