#!/usr/bin/env python3
"""Benchmark: `host-agent sync --once` against `psql \\copy` of the same rows, in one run.

Builds a local SQLite file with N rows of one table, in one of two data shapes, starts a
private PostgreSQL cluster, then, for each of --runs runs,
  (a) psql \\copy of the same rows, from CSV, into an identical empty table (the reference);
  (b) `host-agent sync --once` of a fresh copy of the file into another empty database, with
      the default configuration (batch size overridable with --batch-size to explore).
It checks both databases hold every row, and prints rows/s for both, the ratio (b)/(a), the
agent's CPU time and peak RSS, for every run, then the median ratio.

    .venv/bin/python scripts/bench_sync.py [--rows 1000000] [--runs 5]
        [--table file_change_events|desktop_activity_sessions] [--shape wide|narrow]
        [--batch-size N]
    .venv/bin/python scripts/bench_sync.py --freshness [--seconds 60] [--rate 50]

Shapes: `wide` is realistic (file paths of 40-60 characters, five projects; window titles of
30-80 characters); `narrow` has short values (paths like `/r/a/f123`), so per-row costs weigh
more than per-byte ones.

--freshness runs the agent (`host-agent run`, collectors off) at the default
`wake_delay_seconds` and at 1 s, writes rows through the agent's own store queue at a steady
--rate while it runs (the agent is started in this process, so the rows take the collectors'
path: the write queue, its commit, the wake-up of the sync loop), and reports p50/p99 of the
time from a row's hand-over to the store to its visibility on the server (measured by polling
the server every 20 ms; the hand-over precedes the local commit by the queue's flush, so this
is an upper bound of "committed locally -> visible").

To profile the agent, set BENCH_AGENT_PREFIX to a command that wraps it, for example
`BENCH_AGENT_PREFIX="py-spy record --threads -f raw -o prof.txt --"`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host_agent.embedded.cluster import LocalPostgres  # noqa: E402
from host_agent.store import connect, migrate  # noqa: E402
from host_agent.store.tables import TABLES_BY_NAME  # noqa: E402
from host_agent.sync.postgres.schema import schema_files  # noqa: E402

HOST = "bench-host"
EXTENSIONS = [".py", ".md", ".ts", ".json", ".rs", ".go", ".txt", ".yaml", None]
PROJECTS = ["host-agent", "website", "infra", "notes", "ml-experiments"]
EVENTS = ["created", "modified", "modified", "modified", "deleted", "moved"]
APPS = ["Firefox", "Code", "Terminal", "Slack", "Evince", "LibreOffice Writer"]
WORDS = "report draft notes review plan budget design issue release sync agent".split()

Row = tuple[Any, ...]


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def file_rows(rows: int, shape: str, rng: random.Random) -> Iterator[dict[str, Any]]:
    start = int(time.time()) - 30 * 86400
    for i in range(rows):
        t = start + i // 20
        if shape == "wide":
            project = PROJECTS[i % len(PROJECTS)]
            ext = EXTENSIONS[rng.randrange(len(EXTENSIONS))]
            name = f"file_{rng.randrange(50_000)}{ext or ''}"
            rel = f"src/pkg{rng.randrange(40)}/{name}"
            root = f"/home/dev/{project}"
        else:
            project, ext = "p", None
            name = f"f{rng.randrange(50_000)}"
            rel = f"a/{name}"
            root = "/r"
        yield {
            "event_time": t,
            "event_time_iso": _iso(t),
            "event_type": EVENTS[rng.randrange(len(EVENTS))],
            "file_path": f"{root}/{rel}",
            "file_path_relative": rel,
            "file_name": name,
            "file_extension": ext,
            "file_size": rng.randrange(1, 2_000_000),
            "is_symlink": 0,
            "monitored_root": root,
            "project_name": project,
            "created_at": t,
        }


def desktop_rows(rows: int, shape: str, rng: random.Random) -> Iterator[dict[str, Any]]:
    start = int(time.time()) - 30 * 86400
    for i in range(rows):
        t = start + i * 3
        app = APPS[rng.randrange(len(APPS))]
        if shape == "wide":
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 10)))
            title = f"{words} - {app}"
        else:
            app, title = app[:2], f"w{rng.randrange(1000)}"
        yield {
            "start_time": t,
            "start_time_iso": _iso(t),
            "end_time": t + 2,
            "end_time_iso": _iso(t + 2),
            "duration_seconds": 2,
            "application_name": app,
            "window_title": title,
            "process_name": app.lower(),
            "pid": rng.randrange(1000, 60000),
            "is_idle": int(rng.random() < 0.05),
            "created_at": t,
        }


GENERATORS: dict[str, Callable[[int, str, random.Random], Iterator[dict[str, Any]]]] = {
    "file_change_events": file_rows,
    "desktop_activity_sessions": desktop_rows,
}


def build_sqlite(path: Path, table: str, rows: int, shape: str, seed: int = 7) -> None:
    conn = connect(path)
    migrate(conn, TABLES_BY_NAME[table])
    generate = GENERATORS[table](rows, shape, random.Random(seed))
    first = next(generate)
    columns = list(first)

    def values() -> Iterator[Row]:
        yield tuple(first.values())
        for row in generate:
            yield tuple(row.values())

    conn.execute("BEGIN")
    conn.executemany(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        values(),
    )
    conn.execute("COMMIT")
    conn.close()


def server_columns(pg: LocalPostgres, db: str, table: str) -> list[tuple[str, str]]:
    out = pg.psql(
        "SELECT column_name || '|' || udt_name FROM information_schema.columns "
        f"WHERE table_name = '{table}' AND table_schema = 'public' "
        "AND column_name <> 'synced_at' ORDER BY ordinal_position",
        dbname=db,
    )
    return [tuple(line.strip().split("|", 1)) for line in out.splitlines() if "|" in line]  # type: ignore[misc]


def export_csv(db: Path, table: str, columns: list[tuple[str, str]], out: Path) -> list[str]:
    """The rows as PostgreSQL will hold them, in the reference table's column order."""
    conn = sqlite3.connect(db)
    [(store,)] = conn.execute("SELECT store_id FROM store_identity")
    local = {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")}
    picks: list[Callable[[sqlite3.Row], Any]] = []
    names: list[str] = []
    for name, kind in columns:
        source = {"source_id": "id"}.get(name, name)
        if name == "host_identifier":
            picks.append(lambda r: HOST)
        elif name == "store_id":
            picks.append(lambda r, s=store: s)
        elif source not in local:
            continue  # a server column the agent does not fill either
        elif kind == "timestamptz":
            picks.append(lambda r, c=source: None if r[c] is None else _iso(r[c]))
        elif kind == "bool":
            picks.append(lambda r, c=source: None if r[c] is None else ("t" if r[c] else "f"))
        else:
            picks.append(lambda r, c=source: r[c])
        names.append(name)
    conn.row_factory = sqlite3.Row
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC)  # None: unquoted, NULL
        for r in conn.execute(f"SELECT * FROM {table} ORDER BY id"):
            writer.writerow([pick(r) for pick in picks])
    conn.close()
    return names


def server_cpu(pg: LocalPostgres) -> float:
    """CPU seconds used so far by the cluster's processes (postmaster and its children, the
    exited ones included through the postmaster's children's times)."""
    pid = pg.postmaster_pid()
    if pid is None:
        return 0.0
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        if int(entry.name) == pid or ppid == pid:
            # utime, stime, and for the postmaster the times of its reaped children
            times = [int(x) for x in fields[11:15]]
            total += (sum(times[:2]) + (sum(times[2:]) if int(entry.name) == pid else 0)) / tick
    return total


def stop_and_clean(pg: LocalPostgres, work: Path, *, keep: bool) -> None:
    """A benchmark's end: stop its cluster (saying so if that fails) and remove its work
    directory unless `--keep`."""
    try:
        pg.stop()
    except Exception as exc:  # still clean up the directory
        print(f"stopping PostgreSQL: {exc}", file=sys.stderr)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


def cluster_children(pg: LocalPostgres) -> set[int]:
    pid = pg.postmaster_pid()
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                    children.add(int(entry.name))
    return children


def settled_server_cpu(pg: LocalPostgres, children: set[int]) -> float:
    """`server_cpu` once the backends a run used have exited and been reaped (their times are
    counted only then), with a deadline."""
    deadline = time.monotonic() + 10
    while not cluster_children(pg) <= children:
        if time.monotonic() > deadline:
            print("  (a backend of the run had not exited after 10 s: server CPU undercounted)")
            break
        time.sleep(0.05)  # polling /proc for another process' exit, with a deadline
    return server_cpu(pg)


def run_psql(pg: LocalPostgres, db: str, command: str) -> float:
    env = dict(os.environ, PGPASSWORD=pg.password)
    started = time.perf_counter()
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(pg.port),
         "-U", "postgres", "-d", db, "-c", command],
        check=True, env=env, timeout=3600,
    )  # fmt: skip
    return time.perf_counter() - started


def fresh_database(pg: LocalPostgres, name: str) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {name}")
    pg.create_database(name)
    for sql in schema_files():
        pg.psql(sql.read_text(), dbname=name)


def agent_executable() -> str:
    return shutil.which("host-agent", path=str(ROOT / ".venv" / "bin")) or "host-agent"


def write_config(work: Path, db: Path, table: str, extra: str = "") -> Path:
    config = work / "config.yaml"
    other = "file_events_db" if table == "desktop_activity_sessions" else "desktop_activity_db"
    mine = "desktop_activity_db" if other == "file_events_db" else "file_events_db"
    config.write_text(
        f"host_identifier: {HOST}\n"
        "database:\n"
        f"  {mine}: {db}\n"
        f"  {other}: {work / 'other.db'}\n"
        "collectors:\n  desktop:\n    enabled: false\n  filesystem:\n    enabled: false\n"
        + extra
    )
    return config


def one_run(
    pg: LocalPostgres, work: Path, source: Path, table: str, csv_path: Path, names: list[str],
    rows: int, batch_size: int | None,
) -> dict[str, float]:
    for name in ("reference", "agent"):
        fresh_database(pg, name)
    children, before = cluster_children(pg), server_cpu(pg)
    reference_s = run_psql(
        pg, "reference", f"\\copy {table} ({', '.join(names)}) FROM '{csv_path}' CSV"
    )
    reference_server_cpu = settled_server_cpu(pg, children) - before
    db = work / "local.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(source, db)
    (work / "other.db").unlink(missing_ok=True)
    config = write_config(work, db, table)
    env = dict(os.environ, HOST_AGENT_DATABASE_POSTGRES_URL=pg.url("agent"))
    if batch_size:
        env["HOST_AGENT_DATA_SYNC_BATCH_SIZE"] = str(batch_size)
    prefix = os.environ.get("BENCH_AGENT_PREFIX", "").split()
    children, before = cluster_children(pg), server_cpu(pg)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*prefix, agent_executable(), "--config", str(config), "--log-level", "warning",
         "sync", "--once"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    agent_s = time.perf_counter() - started
    agent_server_cpu = settled_server_cpu(pg, children) - before
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the agent failed:\n{out}\n{err}")
    counts = [
        pg.psql(f"SELECT count(*) FROM {table}", dbname=name).strip()
        for name in ("reference", "agent")
    ]
    if counts != [str(rows)] * 2:
        raise SystemExit(f"row counts differ: reference, agent = {counts}")
    return {
        "reference_s": reference_s,
        "agent_s": agent_s,
        "ratio": reference_s / agent_s,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "server_cpu_ref": reference_server_cpu,
        "server_cpu_agent": agent_server_cpu,
        "rss_mb": usage.ru_maxrss / 1024,
    }


def throughput(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="host-agent-bench-", dir="/tmp"))
    work.chmod(0o755)
    pg = LocalPostgres(work / "pg")
    try:
        print(f"building {args.rows:,} {args.shape} rows of {args.table} ...", flush=True)
        source = work / "source.db"
        build_sqlite(source, args.table, args.rows, args.shape)
        pg.ensure_initialized()
        pg.start()
        # No autovacuum: its work on one side's fresh million rows would land in the other
        # side's server CPU.
        pg.psql("ALTER SYSTEM SET autovacuum = off; SELECT pg_reload_conf();")
        fresh_database(pg, "reference")
        csv_path = work / "rows.csv"
        names = export_csv(source, args.table, server_columns(pg, "reference", args.table),
                           csv_path)  # fmt: skip
        csv_path.chmod(0o644)
        batch = args.batch_size or "default"
        print(f"rows: {args.rows:,}  table: {args.table}  shape: {args.shape}  "
              f"batch_size: {batch}")  # fmt: skip
        print("run | (a) psql \\copy          | (b) host-agent sync --once | ratio | "
              "agent CPU | agent peak RSS | server CPU (a) (b)")  # fmt: skip
        ratios = []
        for run in range(1, args.runs + 1):
            r = one_run(pg, work, source, args.table, csv_path, names, args.rows,
                        args.batch_size)  # fmt: skip
            ratios.append(r["ratio"])
            print(
                f"{run:3} | {args.rows / r['reference_s']:9,.0f} rows/s "
                f"({r['reference_s']:5.2f} s) | {args.rows / r['agent_s']:9,.0f} rows/s "
                f"({r['agent_s']:5.2f} s)     | {r['ratio']:5.2f} | {r['cpu_s']:7.2f} s | "
                f"{r['rss_mb']:6.1f} MB      | {r['server_cpu_ref']:5.2f} s "
                f"{r['server_cpu_agent']:5.2f} s",
                flush=True,
            )
        print(f"median ratio (b)/(a): {statistics.median(ratios):.2f}  "
              f"min {min(ratios):.2f}  max {max(ratios):.2f}")  # fmt: skip
        return 0
    finally:
        stop_and_clean(pg, work, keep=args.keep)


# --- freshness -------------------------------------------------------------------------------


async def _freshness_run(
    pg: LocalPostgres, work: Path, wake_delay: float, seconds: float, rate: float
) -> list[float]:
    """Latencies (s) from hand-over to the store to visibility on the server."""
    import asyncpg

    from host_agent.config import load_config
    from host_agent.daemon.agent import Agent
    from host_agent.logging import configure_logging

    fresh_database(pg, "fresh")
    data = work / f"fresh-{wake_delay:g}"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    quiet = data / "watched"  # an empty directory: the file watcher runs (its queue is the
    quiet.mkdir()  # store's), but the rows come from this benchmark
    config_path = write_config(
        work, data / "file_changes.db", "file_change_events",
        "data_sync:\n  start_jitter_seconds: 0\n"
        f"  wake_delay_seconds: {wake_delay}\n",
    )  # fmt: skip
    text = config_path.read_text().replace(
        "  filesystem:\n    enabled: false\n",
        f"  filesystem:\n    enabled: true\n    roots: [{quiet}]\n",
    )
    config_path.write_text(text)
    os.environ["HOST_AGENT_DATABASE_POSTGRES_URL"] = pg.url("fresh")
    config = load_config(config_path)
    configure_logging("warning", "json")
    agent = Agent(config)
    stop = asyncio.Event()
    running = asyncio.ensure_future(agent.run(stop))
    await asyncio.wait_for(agent.started.wait(), 60)
    queue = agent.queues["file_change_events"]
    handed: dict[int, float] = {}
    seen: dict[int, float] = {}
    conn = await asyncpg.connect(pg.url("fresh"))
    rng = random.Random(3)
    rows = file_rows(int(seconds * rate) + 1, "wide", rng)

    async def write() -> None:
        began = time.monotonic()
        for n, row in enumerate(rows):
            due = began + n / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            row["event_time"] = row["created_at"] = int(time.time())
            ref = queue.insert(row)
            handed[n] = time.monotonic()
            del ref

    async def watch(total: int) -> None:
        last = 0
        deadline = time.monotonic() + seconds + 120
        while len(seen) < total and time.monotonic() < deadline:
            for r in await conn.fetch(
                "SELECT source_id FROM file_change_events WHERE source_id > $1", last
            ):
                sid = int(r["source_id"])
                seen.setdefault(sid, time.monotonic())
                last = max(last, sid)
            await asyncio.sleep(0.02)

    total = int(seconds * rate) + 1
    try:
        await asyncio.gather(write(), watch(total))
    finally:
        await conn.close()
        stop.set()
        await running
    # The queue assigns ids in hand-over order from 1: row n has id n + 1.
    return [seen[n + 1] - handed[n] for n in handed if n + 1 in seen]


def freshness(args: argparse.Namespace) -> int:
    from host_agent.config import DataSyncConfig

    work = Path(tempfile.mkdtemp(prefix="host-agent-fresh-", dir="/tmp"))
    work.chmod(0o755)
    pg = LocalPostgres(work / "pg")
    try:
        pg.ensure_initialized()
        pg.start()
        default = DataSyncConfig().wake_delay_seconds
        print(f"rows written at {args.rate:g}/s for {args.seconds:g} s; latency from hand-over "
              "to the store to visible on the server")  # fmt: skip
        for wake in (default, 1.0):
            latencies = asyncio.run(_freshness_run(pg, work, wake, args.seconds, args.rate))
            latencies.sort()
            expected = int(args.seconds * args.rate) + 1
            p50 = latencies[len(latencies) // 2]
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            print(
                f"wake_delay_seconds {wake:g}: {len(latencies)}/{expected} rows seen, "
                f"p50 {p50:.2f} s, p99 {p99:.2f} s, max {latencies[-1]:.2f} s",
                flush=True,
            )
        return 0
    finally:
        stop_and_clean(pg, work, keep=args.keep)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=1, help="measurements, each both sides")
    parser.add_argument("--table", choices=sorted(GENERATORS), default="file_change_events")
    parser.add_argument("--shape", choices=("wide", "narrow"), default="wide")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--freshness", action="store_true", help="measure freshness instead")
    parser.add_argument("--seconds", type=float, default=60.0, help="freshness: how long")
    parser.add_argument("--rate", type=float, default=50.0, help="freshness: rows a second")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    return freshness(args) if args.freshness else throughput(args)


if __name__ == "__main__":
    raise SystemExit(main())
