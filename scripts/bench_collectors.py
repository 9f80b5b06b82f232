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

Part b (footprint): `host-agent run` as a real process with both collectors on (the desktop
monitor on an Xvfb display with openbox and a focused xterm; the watcher over a tree of
`--tree-dirs` directories), syncing to a private PostgreSQL started by the script. Once the
agent reports READY=1 over $NOTIFY_SOCKET (as it would to systemd) and has shipped the rows
of its first start scan (the tree, recorded once; `--no-settle` skips that wait), nothing
touches it for `--idle-seconds` (with `--restart`, the agent is first stopped and started
again, as at any later start: its scan finds nothing to record); the script reports the CPU
time it used in that window (from /proc/PID/stat) as a share of one core, and its RSS at the
end and at its peak (VmRSS, VmHWM).
Targets: under 1% of a core, under 80 MB RSS.

Part c (start scan): the cost of the watcher's start scan over `--scan-files` files (100
files a directory, on the same filesystem as part a), `host-agent run` as a real process
(filesystem watcher only, no sync), three starts: the first (the root never seen: everything
is recorded as created, found_at_start), a second with nothing changed, and a third after
changes made while it was stopped (1% of the files created, 1% modified, 1% deleted, 1% of
the directories moved). For each: seconds from spawn to READY=1 (the scan is done before it),
the collector's own scan time (`fs.watching seconds`), rows found, seconds until they are all
written, and peak RSS (VmHWM) read right after.

    .venv/bin/python scripts/bench_collectors.py --files 50000 --idle-seconds 60
    .venv/bin/python scripts/bench_collectors.py --part idle
    .venv/bin/python scripts/bench_collectors.py --part startscan --scan-files 100000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sqlite3
import subprocess
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
            columns = {r[1] for r in conn.execute("PRAGMA table_info(file_change_events)")}
            # Changes seen as events: not what the start scan found (the root's directories).
            events = "AND found_at_start = 0" if "found_at_start" in columns else ""
            distinct, total, top = conn.execute(
                "SELECT COUNT(DISTINCT CASE WHEN event_type = ? THEN file_path END), COUNT(*), "
                f"COALESCE(MAX(id), ?) FROM file_change_events WHERE id > ? {events}",
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
    from host_agent.store.queue import WriteQueue
    from host_agent.store.tables import FILE_CHANGES

    configure_logging(level="warning")
    work_dir = Path(tempfile.mkdtemp(prefix="bench-collectors-"))
    root = Path(tempfile.mkdtemp(prefix="bench-root-", dir=root_parent))
    try:
        for d in range(SUBDIRS):
            (root / f"d{d:03d}").mkdir()
        db = work_dir / "file_changes.db"
        settings = FilesystemCollectorConfig(enabled=True, roots=[root], coalesce_ms=coalesce_ms)
        writer = WriteQueue.start_for(db, FILE_CHANGES)
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


# --- part b: the idle footprint of the real agent process --------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def memory_mb(pid: int) -> dict[str, float]:
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def table_rows(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def log_tail(work_dir: Path, lines: int = 20) -> str:
    text = (work_dir / "agent.log").read_text(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def unsynced(db: Path) -> int:
    """Rows not yet shipped (or no rows at all yet) in the file-changes file."""
    conn = sqlite3.connect(db)
    try:
        total, left = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE synced_at IS NULL) FROM file_change_events"
        ).fetchone()
        return int(left) if total else 1
    except sqlite3.OperationalError:
        return 1
    finally:
        conn.close()


def bench_idle(
    idle_seconds: float, tree_dirs: int, settle: bool = True, restart: bool = False
) -> int:
    import yaml

    from host_agent.embedded.cluster import LocalPostgres
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support.x11 import Desktop  # the test suite's X helper: Xvfb, openbox, xterms

    root_dir = Path(__file__).resolve().parent.parent
    work_dir = Path(tempfile.mkdtemp(prefix="bench-idle-", dir="/tmp"))
    work_dir.chmod(0o755)
    pg = LocalPostgres(work_dir / "pg")
    desktop = Desktop(work_dir)
    agent: subprocess.Popen[bytes] | None = None
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        desktop.start_xvfb()
        desktop.start_openbox()
        desktop.activate(desktop.xterm("editor - notes.md", "BenchTerm").window_id)

        watched = work_dir / "projects"
        for d in range(tree_dirs):
            sub = watched / f"project{d % 20:02d}" / f"src{d:05d}"
            sub.mkdir(parents=True)
            for f in range(5):
                (sub / f"file{f}.py").write_text("print('hello')\n")
        (watched / "project00" / ".git").mkdir()

        pg.ensure_initialized()
        pg.start()
        pg.create_database("agent")
        config = work_dir / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "host_identifier": "bench-idle",
                    "database": {
                        "desktop_activity_db": str(work_dir / "data" / "desktop_activity.db"),
                        "file_events_db": str(work_dir / "data" / "file_changes.db"),
                        "postgres_url": pg.url("agent"),
                    },
                    "collectors": {
                        "desktop": {"enabled": True},
                        "filesystem": {"enabled": True, "roots": [str(watched)]},
                    },
                }
            )
        )
        init = subprocess.run(
            [sys.executable, "-m", "host_agent", "--config", str(config), "init-db"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if init.returncode != 0:
            raise SystemExit(f"init-db failed: {init.stderr.strip()}")

        notify_path = str(work_dir / "notify.sock")
        notify.bind(notify_path)
        notify.settimeout(60)
        env = {k: v for k, v in desktop.env.items() if not k.startswith("HOST_AGENT_")}
        env["NOTIFY_SOCKET"] = notify_path
        def start_agent() -> subprocess.Popen[bytes]:
            with open(work_dir / "agent.log", "ab") as log:
                started_agent = subprocess.Popen(
                    [sys.executable, "-m", "host_agent", "--config", str(config), "run"],
                    env=env, cwd=root_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                )  # fmt: skip
            try:
                while notify.recv(256) != b"READY=1":
                    pass
            except TimeoutError:
                raise SystemExit(
                    f"the agent did not become ready:\n{log_tail(work_dir)}"
                ) from None
            return started_agent

        agent = start_agent()
        settled = 0.0
        if settle:
            # The first start records the tree (its start scan) and ships those rows: one-time
            # work, not idling. The window starts once it is done.
            began = time.monotonic()
            files_db = work_dir / "data" / "file_changes.db"
            while unsynced(files_db) and time.monotonic() - began < 300:
                time.sleep(0.2)  # polling the file, with a deadline
            settled = time.monotonic() - began
        if restart:
            # The usual start: the tree known, its scan finds nothing to record.
            agent.terminate()
            agent.wait(timeout=60)
            agent = start_agent()

        cpu_before, started = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(idle_seconds)  # the measurement itself: a fixed idle window
        cpu_used, wall = cpu_seconds(agent.pid) - cpu_before, time.monotonic() - started
        if agent.poll() is not None:
            raise SystemExit(f"the agent exited:\n{log_tail(work_dir)}")
        memory = memory_mb(agent.pid)
        share = 100 * cpu_used / wall
        data = work_dir / "data"
        sessions = table_rows(data / "desktop_activity.db", "desktop_activity_sessions")
        file_rows = table_rows(data / "file_changes.db", "file_change_events")

        print(
            f"\nidle agent: `host-agent run`, desktop monitor (Xvfb {desktop.display}, openbox, "
            f"1 xterm) + watcher over {tree_dirs} directories, syncing to a local PostgreSQL\n"
        )
        if settle:
            print(f"start rows shipped in: {settled:8.1f} s after READY (before the window)")
        if restart:
            print("measured:              a second start (the tree known from the first)")
        print(f"idle window:           {wall:8.1f} s")
        print(f"CPU used:              {cpu_used:8.2f} s   = {share:.2f}% of one core"
              f"  (target < 1%)")  # fmt: skip
        print(f"RSS at end:            {memory['VmRSS']:8.1f} MB")
        print(f"peak RSS (VmHWM):      {memory['VmHWM']:8.1f} MB   (target < 80 MB)")
        print(f"rows recorded:         {sessions} desktop session(s), {file_rows} file event(s)")
        if sessions == 0:
            print("the desktop monitor recorded nothing: it was not running", file=sys.stderr)
            return 1
        return 0 if share < 1.0 and memory["VmHWM"] < 80 else 1
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        notify.close()
        desktop.close()
        try:
            pg.stop()
        except Exception as exc:  # still clean up the directory
            print(f"stopping PostgreSQL: {exc}", file=sys.stderr)
        shutil.rmtree(work_dir, ignore_errors=True)


# --- part c: the start scan ------------------------------------------------------------------


def make_tree(root: Path, files: int, per_dir: int = 100) -> list[Path]:
    directories = []
    for d in range((files + per_dir - 1) // per_dir):
        directory = root / f"p{d // 100:03d}" / f"d{d:05d}"
        directory.mkdir(parents=True)
        directories.append(directory)
        for f in range(min(per_dir, files - d * per_dir)):
            (directory / f"f{f:03d}.txt").write_bytes(b"0123456789")
    return directories


def change_tree(root: Path, directories: list[Path], files: int) -> int:
    """1% created, 1% modified, 1% deleted, 1% of the directories moved; the changes made."""
    share = max(1, files // 100)
    made = 0
    for i in range(share):
        directory = directories[i % len(directories)]
        (directory / f"new{i:05d}.txt").write_bytes(b"new")
        made += 1
    every = max(1, files // share)
    all_files = sorted(root.rglob("f*.txt"))
    for path in all_files[::every][:share]:
        path.write_bytes(b"changed, longer than before")
        made += 1
    for path in all_files[1::every][:share]:
        path.unlink()
        made += 1
    for directory in directories[1 :: 100][: max(1, len(directories) // 100)]:
        directory.rename(directory.with_name(directory.name + "-moved"))
        made += 1
    return made


def bench_startscan(files: int, root_parent: Path) -> int:
    import yaml

    work_dir = Path(tempfile.mkdtemp(prefix="bench-startscan-", dir="/tmp"))
    root = Path(tempfile.mkdtemp(prefix="bench-scan-root-", dir=root_parent))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = str(work_dir / "notify.sock")
    notify.bind(notify_path)
    notify.settimeout(600)
    db = work_dir / "data" / "file_changes.db"
    config = work_dir / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "host_identifier": "bench-startscan",
                "database": {
                    "desktop_activity_db": str(work_dir / "data" / "desktop_activity.db"),
                    "file_events_db": str(db),
                },
                "data_sync": {"enabled": False},
                "collectors": {
                    "desktop": {"enabled": False},
                    "filesystem": {"enabled": True, "roots": [str(root)]},
                },
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOST_AGENT_")}
    env["NOTIFY_SOCKET"] = notify_path
    results: list[tuple[str, float, float, int, float | None, dict[str, float]]] = []
    try:
        started = time.monotonic()
        directories = make_tree(root, files)
        print(f"made {files} files in {len(directories)} directories under {root} "
              f"({filesystem_type(root)}) in {time.monotonic() - started:.1f} s")  # fmt: skip
        for label in ("first start (nothing known)", "no change", "after changes while down"):
            if label.startswith("after"):
                made = change_tree(root, directories, files)
                label += f" ({made} changes)"
            before = table_rows(db, "file_change_events") if db.exists() else 0
            log_path = work_dir / f"agent-{len(results)}.log"
            with open(log_path, "wb") as log:
                spawned = time.monotonic()
                agent = subprocess.Popen(
                    [sys.executable, "-m", "host_agent", "--config", str(config), "run"],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                )  # fmt: skip
            try:
                while notify.recv(256) != b"READY=1":
                    pass
                ready = time.monotonic() - spawned
                text = log_path.read_text(errors="replace")
                line = next(x for x in text.splitlines() if "fs.watching" in x)
                found = int(line.split("found_at_start=")[1].split()[0])
                scan = float(line.split("seconds=")[1].split()[0])
                written: float | None = None
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    if table_rows(db, "file_change_events") - before >= found:
                        written = time.monotonic() - spawned
                        break
                    time.sleep(0.05)  # polling the file, with a deadline
                memory = memory_mb(agent.pid)
            finally:
                agent.terminate()
                agent.wait(timeout=120)
            results.append((label, ready, scan, found, written, memory))
    finally:
        notify.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"\nstart scan: `host-agent run`, watcher only, {files} files\n")
    header = (
        f"{'start':<44} {'to READY':>9} {'scan':>7} {'found':>7} {'all written':>12} "
        f"{'peak RSS':>9}"
    )
    print(header)
    print("-" * len(header))
    for label, ready, scan, found, written, memory in results:
        shown = f"{written:.2f}s" if written is not None else "never"
        print(
            f"{label:<44} {ready:>8.2f}s {scan:>6.2f}s {found:>7} {shown:>12} "
            f"{memory['VmHWM']:>6.1f} MB"
        )
    return 0 if all(r[4] is not None for r in results) else 1


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
    parser.add_argument("--part", choices=["files", "idle", "startscan", "all"], default="all")
    parser.add_argument(
        "--scan-files", type=int, default=100_000, help="files under the start scan's root"
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="start the idle window at READY=1, before the start scan's rows are shipped",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="measure a second start of the agent (after the first one's rows are shipped)",
    )
    parser.add_argument(
        "--tree-dirs", type=int, default=2000, help="directories under the idle agent's root"
    )
    parser.add_argument("--worker", choices=[p for p, _ in PHASES], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work(args.worker, args.root, args.files)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    status = 0
    if args.part in ("files", "all"):
        status |= asyncio.run(bench(args.files, args.dir, args.coalesce_ms, args.patience))
    if args.part in ("idle", "all"):
        status |= bench_idle(
            args.idle_seconds, args.tree_dirs, not args.no_settle, args.restart
        )
    if args.part in ("startscan", "all"):
        status |= bench_startscan(args.scan_files, args.dir)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
