#!/usr/bin/env python3
"""Benchmark: a fleet of agents against one PostgreSQL with far fewer connections than agents.

Starts a private PostgreSQL whose fleet login may hold `--max-connections` connections, then
for each path (direct, and through PgBouncer in transaction pooling mode):
  (a) catch-up: N agent processes (`host-agent run`, default configuration, each its own store
      and host_identifier, each starting with `--rows` unsynced rows) until every row has
      arrived: the time, the aggregate rows/s, and the peak server connections they used;
      against one `psql \\copy` of all N x rows rows into an identical empty table (the
      reference measured in the same run);
  (b) freshness: with the agents running idle, files are created in their watched folders at
      a steady rate; "event written locally -> row visible on the server" per file, p50/p99,
      with `wake_delay_seconds` at its default (10 s).

    .venv/bin/python scripts/bench_fleet.py [--agents 100] [--rows 2000] [--max-connections 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import asyncpg  # noqa: E402
from bench_sync import build_sqlite, export_csv, server_columns, stop_and_clean  # noqa: E402
from support.pgbouncer import PgBouncer  # noqa: E402

from host_agent.embedded.cluster import LocalPostgres  # noqa: E402
from host_agent.scram import scram_verifier  # noqa: E402
from host_agent.sync.postgres.schema import schema_files  # noqa: E402

FLEET_PASSWORD = "bench-fleet-pw"


def agent_binary() -> str:
    return shutil.which("host-agent", path=str(ROOT / ".venv" / "bin")) or "host-agent"


class Server:
    """The cluster, its fleet login (limited connections), and a superuser to watch with."""

    def __init__(self, work: Path, max_connections: int) -> None:
        self.pg = LocalPostgres(work / "pg")
        self.pg.ensure_initialized()
        self.pg.start()
        self.pg.psql(
            f"ALTER SYSTEM SET max_connections = {max_connections + 5}; "
            "ALTER SYSTEM SET superuser_reserved_connections = 5; "
            # Every connection's start and end, to count how many the fleet held at once.
            "ALTER SYSTEM SET log_connections = on; "
            "ALTER SYSTEM SET log_disconnections = on;"
        )
        self.pg.stop()
        self.pg.start()
        self.pg.psql(f"CREATE ROLE fleet LOGIN PASSWORD '{scram_verifier(FLEET_PASSWORD)}' "
                     f"CONNECTION LIMIT {max_connections}")  # fmt: skip

    def database(self, name: str) -> str:
        self.pg.psql(f"CREATE DATABASE {name} OWNER fleet")
        for sql in schema_files():
            self.pg.psql(sql.read_text(), dbname=name)
        self.pg.psql("GRANT ALL ON ALL TABLES IN SCHEMA public TO fleet; "
                     "ALTER TABLE file_change_events OWNER TO fleet; "
                     "ALTER TABLE desktop_activity_sessions OWNER TO fleet; "
                     "ALTER TABLE sync_logs OWNER TO fleet;", dbname=name)  # fmt: skip
        return f"postgresql://fleet:{quote(FLEET_PASSWORD)}@127.0.0.1:{self.pg.port}/{name}"

    def fetchval(self, sql: str, dbname: str) -> int:
        return int(self.pg.psql(sql, dbname=dbname).strip() or 0)

    def log_offset(self) -> int:
        return self.pg.log_file.stat().st_size

    def peak_connections(self, dbname: str, since: int) -> int:
        """The most connections of the fleet's login to `dbname` open at once, from the
        server's own log of connections and disconnections since the offset `since`."""
        with self.pg.log_file.open("rb") as handle:
            handle.seek(since)
            text = handle.read().decode("utf-8", "replace")
        open_now = peak = 0
        for line in text.splitlines():
            if f"user=fleet database={dbname}" not in line:
                continue
            if "connection authorized" in line:
                open_now += 1
                peak = max(peak, open_now)
            elif "disconnection:" in line:
                open_now -= 1
        return peak


def start_agents(
    work: Path, url: str, agents: int, rows: int, tag: str
) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    procs: list[subprocess.Popen[bytes]] = []
    watched: list[Path] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOST_AGENT_")}
    env["HOST_AGENT_DATABASE_POSTGRES_URL"] = url
    env["HOST_AGENT_COLLECTORS_DESKTOP_ENABLED"] = "false"
    env["HOST_AGENT_COLLECTORS_FILESYSTEM_ENABLED"] = "true"
    for n in range(agents):
        home = work / f"{tag}-{n:03}"
        (home / "watched").mkdir(parents=True)
        build_sqlite(home / "file_changes.db", "file_change_events", rows, "wide", seed=n)
        config = home / "config.yaml"
        config.write_text(
            f"host_identifier: {tag}-host-{n:03}\n"
            "database:\n"
            f"  desktop_activity_db: {home / 'desktop_activity.db'}\n"
            f"  file_events_db: {home / 'file_changes.db'}\n"
            f"collectors:\n  filesystem:\n    roots: [{home / 'watched'}]\n"
        )
        with open(home / "agent.log", "wb") as log:
            procs.append(subprocess.Popen(
                [agent_binary(), "--config", str(config), "--log-level", "warning", "run"],
                env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            ))  # fmt: skip
        watched.append(home / "watched")
    return procs, watched


def stop_agents(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def catch_up(server: Server, db: str, procs: list[subprocess.Popen[bytes]], total: int,
             started: float) -> float:  # fmt: skip
    """Seconds until `total` rows are on the server."""
    while True:
        if server.fetchval("SELECT count(*) FROM file_change_events", db) >= total:
            return time.perf_counter() - started
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{len(dead)} agent(s) exited early")
        time.sleep(0.25)  # polling the server for the benchmark's own measurement


async def freshness(url: str, watched: list[Path], rate: float, seconds: float) -> list[float]:
    """Create files at `rate` per second for `seconds`; the delay of each to the server."""
    conn = await asyncpg.connect(url, statement_cache_size=0)
    created: dict[str, float] = {}
    seen: dict[str, float] = {}
    try:
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < seconds:
            name = f"fresh-{n:06}.txt"
            (watched[n % len(watched)] / name).write_text("x")
            created[name] = time.perf_counter()
            n += 1
            for row in await conn.fetch(
                "SELECT file_name FROM file_change_events WHERE file_name LIKE 'fresh-%'"
            ):
                seen.setdefault(row["file_name"], time.perf_counter())
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        deadline = time.perf_counter() + 120
        while len(seen) < len(created) and time.perf_counter() < deadline:
            for row in await conn.fetch(
                "SELECT file_name FROM file_change_events WHERE file_name LIKE 'fresh-%'"
            ):
                seen.setdefault(row["file_name"], time.perf_counter())
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    return [seen[name] - created[name] for name in created if name in seen]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--rows", type=int, default=2000, help="unsynced rows per agent")
    parser.add_argument("--max-connections", type=int, default=20)
    parser.add_argument("--fresh-rate", type=float, default=20.0, help="files per second")
    parser.add_argument("--fresh-seconds", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="host-agent-fleet-", dir="/tmp"))
    work.chmod(0o755)
    server = Server(work, args.max_connections)
    bouncer: PgBouncer | None = None
    total = args.agents * args.rows
    try:
        # The reference: every row of the fleet by one \copy.
        reference_db = work / "reference.db"
        build_sqlite(reference_db, "file_change_events", total, "wide")
        server.database("reference")
        csv_path = work / "rows.csv"
        table_columns = server_columns(server.pg, "reference", "file_change_events")
        columns = export_csv(reference_db, "file_change_events", table_columns, csv_path)
        csv_path.chmod(0o644)
        env = dict(os.environ, PGPASSWORD=server.pg.password)
        started = time.perf_counter()
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
             "-p", str(server.pg.port), "-U", "postgres", "-d", "reference", "-c",
             f"\\copy file_change_events ({', '.join(columns)}) FROM '{csv_path}' CSV"],
            check=True, env=env, timeout=3600,
        )  # fmt: skip
        reference_s = time.perf_counter() - started
        print(f"fleet: {args.agents} agents x {args.rows:,} rows = {total:,} rows; server "
              f"connections for the fleet: {args.max_connections}")  # fmt: skip
        print(f"reference psql \\copy of all rows: {reference_s:7.2f} s "
              f"{total / reference_s:10,.0f} rows/s")  # fmt: skip

        bouncer = PgBouncer(
            server.pg, pool_size=args.max_connections, users={"fleet": FLEET_PASSWORD}
        )
        bouncer.start()
        for path in ("direct", "pgbouncer"):
            db = f"fleet_{path}"
            url = server.database(db)
            if path == "pgbouncer":
                url = url.replace(f":{server.pg.port}/", f":{bouncer.port}/")
            offset = server.log_offset()
            started = time.perf_counter()
            procs, watched = start_agents(work, url, args.agents, args.rows, path)
            try:
                seconds = catch_up(server, db, procs, total, started)
                peak = server.peak_connections(db, offset)
                print(f"[{path}] catch-up: every row in {seconds:7.2f} s "
                      f"({total / seconds:10,.0f} rows/s, {reference_s / seconds:.2f} x \\copy); "
                      f"peak server connections of the fleet: {peak}")  # fmt: skip
                delays = asyncio.run(
                    freshness(url, watched, args.fresh_rate, args.fresh_seconds)
                )
                print(f"[{path}] freshness over {len(delays)} files: p50 "
                      f"{percentile(delays, 50):5.1f} s, p99 {percentile(delays, 99):5.1f} s "
                      "(wake_delay_seconds 10, the default)")  # fmt: skip
            finally:
                stop_agents(procs)
        return 0
    finally:
        if bouncer is not None:
            bouncer.stop()
        stop_and_clean(server.pg, work, keep=args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
