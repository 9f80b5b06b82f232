#!/usr/bin/env python3
"""Benchmark: `host-agent sync --once` against `psql \\copy` of the same rows, in one run.

Builds a file_changes.db with N realistic file_change_events rows, starts a private PostgreSQL
cluster, then measures
  (a) psql \\copy of the same rows, from CSV, into an identical empty table (the reference);
  (b) `host-agent sync --once` from scratch into an empty database, default configuration
      (batch size overridable with --batch-size to explore).
Prints rows/s for both, the ratio (b)/(a), and the agent's peak RSS.

    .venv/bin/python scripts/bench_sync.py [--rows 1000000] [--batch-size N]

To profile the agent, set BENCH_AGENT_PREFIX to a command that wraps it, for example
`BENCH_AGENT_PREFIX="py-spy record --threads -f raw -o prof.txt --"`.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host_agent.embedded.cluster import LocalPostgres  # noqa: E402
from host_agent.store import FILE_CHANGES, connect, migrate  # noqa: E402
from host_agent.sync.postgres.schema import schema_files  # noqa: E402

HOST = "bench-host"
EXTENSIONS = [".py", ".md", ".ts", ".json", ".rs", ".go", ".txt", ".yaml", None]
PROJECTS = ["host-agent", "website", "infra", "notes", "ml-experiments"]
EVENTS = ["created", "modified", "modified", "modified", "deleted", "moved"]


def build_sqlite(path: Path, rows: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    conn = connect(path)
    migrate(conn, FILE_CHANGES)
    start = int(time.time()) - 30 * 86400
    columns = (
        "event_time, event_time_iso, event_type, file_path, file_path_relative, file_name, "
        "file_extension, file_size, is_symlink, monitored_root, project_name, created_at"
    )

    def generate() -> object:
        for i in range(rows):
            t = start + i // 20
            project = PROJECTS[i % len(PROJECTS)]
            ext = EXTENSIONS[rng.randrange(len(EXTENSIONS))]
            name = f"file_{rng.randrange(50_000)}{ext or ''}"
            rel = f"src/pkg{rng.randrange(40)}/{name}"
            root = f"/home/dev/{project}"
            yield (
                t,
                datetime.fromtimestamp(t, UTC).isoformat(),
                EVENTS[rng.randrange(len(EVENTS))],
                f"{root}/{rel}",
                rel,
                name,
                ext,
                rng.randrange(1, 2_000_000),
                0,
                root,
                project,
                t,
            )

    conn.execute("BEGIN")
    conn.executemany(
        f"INSERT INTO file_change_events ({columns}) VALUES ({', '.join('?' * 12)})", generate()
    )
    conn.execute("COMMIT")
    conn.close()


def export_csv(db: Path, out: Path) -> list[str]:
    """The rows as PostgreSQL will hold them, in the reference table's column order."""
    columns = [
        "host_identifier", "store_id", "source_id", "row_version", "event_time", "event_type",
        "file_path", "file_path_relative", "file_name", "file_extension", "file_size",
        "is_symlink", "monitored_root", "project_name", "created_at",
    ]  # fmt: skip
    conn = sqlite3.connect(db)
    [(store,)] = conn.execute("SELECT store_id FROM store_identity")
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        for r in conn.execute(
            "SELECT id, row_version, event_time, event_type, file_path, file_path_relative, "
            "file_name, file_extension, file_size, is_symlink, monitored_root, project_name, "
            "created_at FROM file_change_events ORDER BY id"
        ):
            writer.writerow(
                [
                    HOST, store, r[0], r[1], datetime.fromtimestamp(r[2], UTC).isoformat(), r[3],
                    r[4],
                    r[5], r[6], r[7], r[8], "t" if r[9] else "f", r[10], r[11],
                    datetime.fromtimestamp(r[12], UTC).isoformat(),
                ]
            )  # fmt: skip
    conn.close()
    return columns


def run_psql(pg: LocalPostgres, db: str, command: str) -> float:
    env = dict(os.environ, PGPASSWORD=pg.password)
    started = time.perf_counter()
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(pg.port),
         "-U", "postgres", "-d", db, "-c", command],
        check=True, env=env, timeout=3600,
    )  # fmt: skip
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="host-agent-bench-", dir="/tmp"))
    work.chmod(0o755)
    pg = LocalPostgres(work / "pg")
    try:
        print(f"building {args.rows:,} rows ...", flush=True)
        db = work / "file_changes.db"
        build_sqlite(db, args.rows)
        csv_path = work / "rows.csv"
        columns = export_csv(db, csv_path)
        csv_path.chmod(0o644)

        pg.ensure_initialized()
        pg.start()
        for name in ("reference", "agent"):
            pg.create_database(name)
            for sql in schema_files():
                pg.psql(sql.read_text(), dbname=name)

        reference_s = run_psql(
            pg,
            "reference",
            f"\\copy file_change_events ({', '.join(columns)}) FROM '{csv_path}' CSV",
        )

        config = work / "config.yaml"
        config.write_text(
            f"host_identifier: {HOST}\n"
            "database:\n"
            f"  desktop_activity_db: {work / 'desktop_activity.db'}\n"
            f"  file_events_db: {db}\n"
            "collectors:\n  desktop:\n    enabled: false\n"
        )
        env = dict(os.environ, HOST_AGENT_DATABASE_POSTGRES_URL=pg.url("agent"))
        if args.batch_size:
            env["HOST_AGENT_DATA_SYNC_BATCH_SIZE"] = str(args.batch_size)
        agent = shutil.which("host-agent", path=str(ROOT / ".venv" / "bin")) or "host-agent"
        prefix = os.environ.get("BENCH_AGENT_PREFIX", "").split()
        started = time.perf_counter()
        proc = subprocess.Popen(
            [*prefix, agent, "--config", str(config), "--log-level", "warning", "sync", "--once"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        agent_s = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out, err = proc.communicate()
        if proc.returncode != 0:
            print(out, err, file=sys.stderr)
            return 1
        peak_rss_mb = usage.ru_maxrss / 1024

        counts = [
            pg.psql("SELECT count(*) FROM file_change_events", dbname=name).strip()
            for name in ("reference", "agent")
        ]
        if counts != [str(args.rows)] * 2:
            print(f"row counts differ: reference, agent = {counts}", file=sys.stderr)
            return 1

        ref_rate = args.rows / reference_s
        agent_rate = args.rows / agent_s
        batch = args.batch_size or "default"
        print(f"rows:                      {args.rows:,}")
        print(f"(a) psql \\copy from CSV:   {reference_s:8.2f} s  {ref_rate:12,.0f} rows/s")
        print(f"(b) host-agent sync --once:{agent_s:8.2f} s  {agent_rate:12,.0f} rows/s"
              f"  (batch_size {batch})")  # fmt: skip
        print(f"ratio (b)/(a):             {agent_rate / ref_rate:8.2f}")
        print(f"agent peak RSS:            {peak_rss_mb:8.1f} MB")
        return 0
    finally:
        try:
            pg.stop()
        except Exception as exc:  # still clean up the directory
            print(f"stopping PostgreSQL: {exc}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
