#!/usr/bin/env python3
"""Benchmark the collectors.

Part a (file changes): create N files under a watched root as fast as a separate process can,
then modify them all, then delete them all. After each phase the SQLite file is polled (with a
deadline) until the collector has written every change, and the table reports, per phase, the
distinct changes recorded against those made (target: none missing), rows that were not
expected (duplicates or wrong kinds), how long the filesystem work took, how long until the
last row was committed, and rows written per second.

The file operations run in a child process so they do not share the collector's interpreter
lock. The watched root defaults to /dev/shm (tmpfs) when it exists, because the point is the
collector's throughput, not the disk's; the SQLite file stays on the normal temp directory.

    .venv/bin/python scripts/bench_collectors.py --files 50000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SUBDIRS = 100
PHASES = (("create", "created"), ("modify", "modified"), ("delete", "deleted"))


def file_path(root: Path, i: int) -> str:
    return f"{root}/d{i % SUBDIRS:03d}/f{i:06d}.txt"


def work(phase: str, root: Path, files: int) -> None:
    """The child process: one phase of filesystem work, as fast as possible."""
    flags = {
        "create": os.O_CREAT | os.O_WRONLY | os.O_EXCL,
        "modify": os.O_WRONLY | os.O_APPEND,
    }
    for i in range(files):
        path = file_path(root, i)
        if phase == "delete":
            os.unlink(path)
            continue
        fd = os.open(path, flags[phase], 0o644)
        try:
            os.write(fd, b"0123456789abcdef")
        finally:
            os.close(fd)


@dataclass
class PhaseResult:
    name: str
    made: int
    recorded: int
    unexpected: int
    ops_seconds: float
    written_seconds: float | None  # phase start -> last expected row committed

    @property
    def missing(self) -> int:
        return self.made - self.recorded


def count_phase(db: Path, after_id: int, event_type: str) -> tuple[int, int, int]:
    """(distinct paths with `event_type`, all rows, highest id) for rows after `after_id`."""
    conn = sqlite3.connect(db)
    try:
        try:
            distinct, total, top = conn.execute(
                "SELECT COUNT(DISTINCT CASE WHEN event_type = ? THEN file_path END), COUNT(*), "
                "COALESCE(MAX(id), ?) FROM file_change_events WHERE id > ?",
                (event_type, after_id, after_id),
            ).fetchone()
        except sqlite3.OperationalError:  # the table does not exist before the first write
            return 0, 0, after_id
        return int(distinct), int(total), int(top)
    finally:
        conn.close()


async def run_phase(
    phase: str, event_type: str, root: Path, db: Path, files: int, after_id: int, patience: float
) -> tuple[PhaseResult, int]:
    started = time.monotonic()
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--worker", phase, "--root", str(root), "--files", str(files)
    )
    if await child.wait() != 0:
        raise SystemExit(f"the {phase} worker failed")
    ops_seconds = time.monotonic() - started

    deadline = time.monotonic() + patience
    written: float | None = None
    while True:
        distinct, total, top = await asyncio.to_thread(count_phase, db, after_id, event_type)
        if distinct >= files and written is None:
            written = time.monotonic() - started
            # Give stragglers (duplicates, unexpected kinds) a moment to show up as well.
            deadline = min(deadline, time.monotonic() + 1.0)
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    result = PhaseResult(phase, files, distinct, total - distinct, ops_seconds, written)
    return result, top


async def bench(files: int, root_parent: Path, coalesce_ms: int, patience: float) -> int:
    from host_agent.collectors.filesystem import FileChangeCollector
    from host_agent.config import FilesystemCollectorConfig
    from host_agent.logging import configure_logging
    from host_agent.store.schema import FILE_CHANGES
    from host_agent.store.writer import RowWriter

    configure_logging(level="warning")
    work_dir = Path(tempfile.mkdtemp(prefix="bench-collectors-"))
    root = Path(tempfile.mkdtemp(prefix="bench-root-", dir=root_parent))
    try:
        for d in range(SUBDIRS):
            (root / f"d{d:03d}").mkdir()
        db = work_dir / "file_changes.db"
        settings = FilesystemCollectorConfig(enabled=True, roots=[root], coalesce_ms=coalesce_ms)
        writer = RowWriter(db, FILE_CHANGES)
        collector = FileChangeCollector(settings, writer)
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))
        results: list[PhaseResult] = []
        try:
            await asyncio.wait_for(collector.ready.wait(), 60)
            last_id = 0
            for phase, event_type in PHASES:
                result, last_id = await run_phase(
                    phase, event_type, root, db, files, last_id, patience
                )
                results.append(result)
        finally:
            stop.set()
            await task
            writer.close()
        fs_type = filesystem_type(root)
        print_table(results, files, root, fs_type, coalesce_ms, collector)
        missing = sum(r.missing for r in results)
        return 1 if missing else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from the longest matching mount point."""
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                point = fields[1].replace("\\040", " ")
                inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def print_table(
    results: list[PhaseResult],
    files: int,
    root: Path,
    fs_type: str,
    coalesce_ms: int,
    collector: object,
) -> None:
    print(
        f"\nfile change collector: {files} files in {SUBDIRS} directories, root {root} "
        f"({fs_type}), coalesce_ms={coalesce_ms}\n"
    )
    header = (
        f"{'phase':<8} {'made':>7} {'recorded':>9} {'missing':>8} {'unexpected':>11} "
        f"{'fs ops/s':>9} {'all written':>12} {'rows/s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ops_rate = r.made / r.ops_seconds if r.ops_seconds else 0.0
        if r.written_seconds is None:
            written, rate = "never", "-"
        else:
            written = f"{r.written_seconds:.2f}s"
            rate = f"{r.recorded / r.written_seconds:,.0f}"
        print(
            f"{r.name:<8} {r.made:>7} {r.recorded:>9} {r.missing:>8} {r.unexpected:>11} "
            f"{ops_rate:>9,.0f} {written:>12} {rate:>8}"
        )
    counters = {
        name: getattr(collector, name)
        for name in ("events_recorded", "overflows", "errors", "rows_dropped")
    }
    print("\n" + "  ".join(f"{k}={v}" for k, v in counters.items()))
    print(
        "\n'all written': from the phase's first filesystem call to the last expected row "
        "committed; rows/s = recorded / that time."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=50_000, help="files per phase")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir()),
        help="where the watched root is made (default: /dev/shm when present)",
    )
    parser.add_argument("--coalesce-ms", type=int, default=500)
    parser.add_argument(
        "--patience", type=float, default=120.0, help="seconds to wait for a phase's rows"
    )
    parser.add_argument("--worker", choices=[p for p, _ in PHASES], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work(args.worker, args.root, args.files)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    return asyncio.run(bench(args.files, args.dir, args.coalesce_ms, args.patience))


if __name__ == "__main__":
    raise SystemExit(main())
