"""A file change collector run in a user namespace of its own, for tests of the inotify watch
limit on the real kernel.

    unshare --user --map-root-user python limited_collector.py ROOT DB WATCHES RETRY_SECONDS

Since Linux 5.11 the watch limit is counted per user namespace (`/proc/sys/user/
max_inotify_watches`) as well as per user, and the namespace's owner may lower it there. So
this process can be refused watches without lowering `fs.inotify.max_user_watches` for the
whole machine, which would make every other inotify user fail meanwhile (other tests, editors,
the desktop); the lowered limit disappears with the process, so nothing needs restoring.

Logs are JSON lines on stdout. Commands, one a line on stdin: `limit N` sets the namespace's
watch limit, `status` asks for one; both answer with a `status` line (the collector's
counters). `stop`, or the end of stdin, stops the collector and exits.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import structlog

from host_agent.collectors.filesystem import FileChangeCollector
from host_agent.config import FilesystemCollectorConfig
from host_agent.store.queue import WriteQueue
from host_agent.store.tables import FILE_CHANGES

WATCH_LIMIT = Path("/proc/sys/user/max_inotify_watches")


async def main(root: Path, db: Path, watches: int, retry_seconds: float) -> None:
    WATCH_LIMIT.write_text(f"{watches}\n")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
    )
    log = structlog.get_logger()
    settings = FilesystemCollectorConfig(enabled=True, roots=[root], coalesce_ms=100)
    collector = FileChangeCollector(
        settings, WriteQueue.start_for(db, FILE_CHANGES), retry_seconds=retry_seconds
    )
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        await asyncio.wait_for(collector.ready.wait(), 10)
        while True:
            command = (await asyncio.to_thread(sys.stdin.readline)).split()
            if not command or command[0] == "stop":
                break
            if command[0] == "limit":
                WATCH_LIMIT.write_text(f"{int(command[1])}\n")
            log.info(
                "status",
                watches=collector.watches,
                unwatched=collector.unwatched,
                watch_limit_hits=collector.watch_limit_hits,
                errors=collector.errors,
            )
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
