"""The file change collector's state and counters, as the agent's health and metrics read them.
Real inotify; its unavailability is real too (a user namespace allowed no inotify instance)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import structlog
from support.ci import unavailable

from host_agent.collectors.base import Collector
from host_agent.collectors.filesystem import FileChangeCollector
from host_agent.config import FilesystemCollectorConfig
from host_agent.store.queue import WriteQueue
from host_agent.store.tables import FILE_CHANGES

from .conftest import StartCollector

COUNTERS = {
    "events_recorded", "found_at_start", "overflows", "watches", "unwatched", "watch_limit_hits",
    "rows_dropped",
}  # fmt: skip


async def test_running_state_and_counters(start_collector: StartCollector, root: Path) -> None:
    (root / "sub").mkdir()
    run = await start_collector()
    collector: Collector = run.collector  # the protocol the agent holds it by
    assert collector.name == "FileChangeCollector"
    assert collector.state == "running"
    (root / "a.txt").write_text("a")
    await run.wait_rows(lambda rows: len(rows) == 1)
    counters = collector.counters()
    assert set(counters) == COUNTERS
    # "sub" existed at the first start: found by the start scan, then a.txt as an event.
    assert counters["found_at_start"] == 1
    assert counters["events_recorded"] == 2 and counters["watches"] == 2
    assert counters["overflows"] == counters["rows_dropped"] == counters["unwatched"] == 0


async def test_disabled_and_rootless_states(tmp_path: Path) -> None:
    for settings, state in (
        (FilesystemCollectorConfig(enabled=False, roots=[tmp_path]), "disabled: by configuration"),
        (FilesystemCollectorConfig(enabled=True, roots=[]), "idle: no roots configured"),
    ):
        writer = WriteQueue.start_for(tmp_path / "unused.db", FILE_CHANGES)
        collector = FileChangeCollector(settings, writer, structlog.get_logger())
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))
        await asyncio.wait_for(collector.ready.wait(), 5)
        assert collector.state == state
        stop.set()
        await asyncio.wait_for(task, 5)
        assert collector.state == "stopped"
        writer.close()


# A collector in a user namespace allowed no inotify instance: it must say so, not "running".
_CHILD = """
import asyncio, json, sys
from host_agent.collectors.filesystem import FileChangeCollector
from host_agent.config import FilesystemCollectorConfig
from host_agent.store.tables import FILE_CHANGES
from host_agent.store.queue import WriteQueue

open("/proc/sys/user/max_inotify_instances", "w").write("0\\n")

async def main() -> None:
    settings = FilesystemCollectorConfig(enabled=True, roots=[sys.argv[1]])
    writer = WriteQueue.start_for(sys.argv[2], FILE_CHANGES)
    collector = FileChangeCollector(settings, writer)
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await asyncio.wait_for(collector.ready.wait(), 10)
    seen = {"state": collector.state, "errors": collector.errors, **collector.counters()}
    stop.set()
    await asyncio.wait_for(task, 10)
    writer.close()
    print(json.dumps({**seen, "final": collector.state}))

asyncio.run(main())
"""


async def test_inotify_unavailable_is_a_failed_state(root: Path, tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        unavailable("util-linux unshare is not installed")
    command = [unshare, "--user", "--map-root-user"]
    probe = await asyncio.to_thread(
        subprocess.run,
        [*command, "sh", "-c", "echo 0 > /proc/sys/user/max_inotify_instances"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        unavailable(f"cannot limit inotify instances in a user namespace: {probe.stderr}")
    child = await asyncio.to_thread(
        subprocess.run,
        [*command, sys.executable, "-c", _CHILD, str(root), str(tmp_path / "events.db")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert seen["state"].startswith("failed: inotify unavailable"), seen
    assert seen["errors"] == 1 and seen["watches"] == 0 and seen["events_recorded"] == 0
    assert seen["final"] == "stopped"
