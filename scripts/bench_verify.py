#!/usr/bin/env python3
"""Benchmark: what `host-agent verify` exchanges and how long it takes, against shipping the
whole table again; and the acceptance scenario (1,000 rows deleted on the server and 100 rolled
back to an older version: exactly those reported, repaired, clean afterwards).

Builds a file_changes.db with N realistic rows (scripts/bench_sync.py's build_sqlite), starts a
private PostgreSQL, and ships them with `host-agent sync --once` through a TCP relay that counts
the bytes both ways: the full re-ship's wire bytes. 2,000 rows are then changed locally and
shipped again, so some rows have versions above 0. Then, for each number of differences D, it
damages the server (D - D/10 rows deleted, D/10 rolled back to an older version), runs verify
(in this process, through the relay), checks it reports exactly the damaged rows, and prints
its wire bytes and seconds; `--repair` and a sync restore the rows before the next D. Last, the
acceptance scenario, with a second verify that must be clean.

With `--via gateway` the same runs go through `host-agent gateway` (a process of its own; the
relay sits between the agent and the gateway, and the transport also counts the request and
answer bodies); the full re-ship is then the bundles' bytes.

    .venv/bin/python scripts/bench_verify.py [--rows 1000000] [--via direct|gateway|both]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_sync import build_sqlite, stop_and_clean  # noqa: E402

from host_agent.embedded.cluster import LocalPostgres, free_port  # noqa: E402
from host_agent.store.tables import FILE_CHANGES  # noqa: E402
from host_agent.sync.gateway_client import GatewayTransport  # noqa: E402
from host_agent.sync.postgres.schema import schema_files  # noqa: E402
from host_agent.sync.postgres.sink import PostgresSink  # noqa: E402
from host_agent.sync.verify import LocalRanges, RangeReader, TableVerify, verify_table  # noqa: E402

HOST = "bench-host"
TABLE = "file_change_events"
CHANGED = 2000


class CountingRelay:
    """A TCP relay on 127.0.0.1 counting the bytes each way, in a thread of its own."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool
                       ) -> None:  # fmt: skip
            try:
                while data := await reader.read(65536):
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target)
            await asyncio.gather(
                pipe(reader, server_writer, True), pipe(server_reader, writer, False)
            )

        async def serve() -> None:
            await asyncio.start_server(handle, "127.0.0.1", self.port)
            ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    @property
    def total(self) -> int:
        return self.up + self.down

    def reset(self) -> None:
        self.up = self.down = 0


def host_agent(config: Path, *args: str, env: dict[str, str]) -> str:
    agent = shutil.which("host-agent", path=str(ROOT / ".venv" / "bin")) or "host-agent"
    done = subprocess.run(
        [agent, "--config", str(config), "--log-level", "warning", *args],
        env=env, capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"host-agent {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def write_config(path: Path, work: Path, url: str | None, gateway: dict[str, object] | None
                 ) -> Path:  # fmt: skip
    text = (
        f"host_identifier: {HOST}\n"
        "database:\n"
        f"  desktop_activity_db: {work / 'desktop_activity.db'}\n"
        f"  file_events_db: {work / 'file_changes.db'}\n"
        + (f"  postgres_url: '{url}'\n" if url else "")
        + "collectors:\n  desktop:\n    enabled: false\n"
    )
    if gateway:
        text += "gateway:\n" + "".join(f"  {k}: {v}\n" for k, v in gateway.items())
    path.write_text(text)
    return path


def start_gateway(work: Path, url: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = write_config(work / "gateway.yaml", work / "gw", url, {
        "listen_address": "127.0.0.1", "listen_port": port, "pool_size": 2,
    })  # fmt: skip
    agent = shutil.which("host-agent", path=str(ROOT / ".venv" / "bin")) or "host-agent"
    proc = subprocess.Popen(
        [agent, "--config", str(config), "--log-level", "warning", "gateway"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the gateway did not start") from None
            time.sleep(0.1)  # polling a port another process opens


async def run_verify(db: Path, reader: RangeReader, *, repair: bool = False) -> TableVerify:
    local = LocalRanges(db, FILE_CHANGES)
    await local.open()
    try:
        await reader.open()
        return await verify_table(local, reader, repair=repair)
    finally:
        await reader.close()
        await local.close()


def damage(pg: LocalPostgres, store: str, deleted: Sequence[int], rolled: Sequence[int]) -> None:
    def ids(values: Sequence[int]) -> str:
        return ",".join(str(i) for i in values) or "0"

    pg.psql(
        f"DELETE FROM {TABLE} WHERE store_id = '{store}' AND source_id IN ({ids(deleted)}); "
        f"UPDATE {TABLE} SET row_version = row_version - 1 "
        f"WHERE store_id = '{store}' AND source_id IN ({ids(rolled)})",
        dbname="bench",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--differences", default="0,10,1000")
    parser.add_argument("--via", choices=("direct", "gateway", "both"), default="both")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    counts = [int(d) for d in args.differences.split(",")]
    ways = ["direct", "gateway"] if args.via == "both" else [args.via]

    work = Path(tempfile.mkdtemp(prefix="host-agent-bench-verify-", dir="/tmp"))
    work.chmod(0o755)
    pg = LocalPostgres(work / "pg")
    gateway: subprocess.Popen[bytes] | None = None
    try:
        pg.ensure_initialized()
        pg.start()
        pg.create_database("bench")
        for sql in schema_files():
            pg.psql(sql.read_text(), dbname="bench")
        owner = pg.url("bench")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOST_AGENT_")}
        for way in ways:
            result = bench(way, work / way, pg, owner, env, args.rows, counts)
            gateway = result or gateway
        return 0
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        stop_and_clean(pg, work, keep=args.keep)


def bench(way: str, work: Path, pg: LocalPostgres, owner: str, env: dict[str, str], rows: int,
          counts: list[int]) -> subprocess.Popen[bytes] | None:  # fmt: skip
    work.mkdir(parents=True)
    db = work / "file_changes.db"
    print(f"\n== {way}: building {rows:,} rows ...", flush=True)
    build_sqlite(db, "file_change_events", rows, "wide")
    gateway = None
    if way == "direct":
        relay = CountingRelay(pg.port)
        url = owner.replace(f":{pg.port}/", f":{relay.port}/")
        config = write_config(work / "agent.yaml", work, url, None)

        def reader() -> RangeReader:
            return PostgresSink(url, HOST)
    else:
        admin = write_config(work / "admin.yaml", work / "adm", owner, None)
        out = host_agent(admin, "admin", "add-host", HOST, "--token", env=env)
        lines = out.splitlines()
        token = lines[lines.index("Its gateway.token (shown once, keep it secret):") + 1].strip()
        gateway, port = start_gateway(work, owner, env)
        relay = CountingRelay(port)
        gateway_url = f"http://127.0.0.1:{relay.port}"
        config = write_config(work / "agent.yaml", work, None,
                              {"url": gateway_url, "token": token})  # fmt: skip

        def reader() -> RangeReader:
            return GatewayTransport(gateway_url, token, HOST)

    store = str(sqlite3.connect(db).execute("SELECT store_id FROM store_identity").fetchone()[0])
    relay.reset()
    started = time.perf_counter()
    host_agent(config, "sync", "--once", env=env)
    full_seconds = time.perf_counter() - started
    full_bytes = relay.total
    print(f"full ship of {rows:,} rows: {full_bytes:,} bytes on the wire, {full_seconds:.1f} s")

    rng = random.Random(17)
    changed = rng.sample(range(1, rows + 1), CHANGED)
    conn = sqlite3.connect(db)
    conn.execute(f"UPDATE {TABLE} SET file_size = file_size + 1 WHERE id IN "
                 f"({','.join(map(str, changed))})")  # fmt: skip
    conn.commit()
    conn.close()
    host_agent(config, "sync", "--once", env=env)

    print("| differences | verify wire bytes | of a full ship | bodies | round trips | seconds |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    scenarios = [(d - d // 10, d // 10) for d in counts] + [(1000, 100)]
    for n, (deleted_n, rolled_n) in enumerate(scenarios):
        rolled = sorted(rng.sample(changed, rolled_n))
        deleted = sorted(rng.sample(sorted(set(range(1, rows + 1)) - set(rolled)), deleted_n))
        damage(pg, store, deleted, rolled)
        relay.reset()
        started = time.perf_counter()
        found = asyncio.run(run_verify(db, reader()))
        seconds = time.perf_counter() - started
        if [d.row_id for d in found.missing] != deleted or [
            d.row_id for d in found.older
        ] != rolled or found.newer or found.server_only or found.beyond:
            print(f"verify did not report exactly the damage: {found}", file=sys.stderr)
            raise SystemExit(1)
        label = f"{deleted_n + rolled_n:,}"
        if n == len(scenarios) - 1:
            label += " (acceptance: 1,000 deleted + 100 rolled back)"
        bodies = f"{found.exchange.bytes:,}" if found.exchange.bytes is not None else "-"
        print(f"| {label} | {relay.total:,} | {100 * relay.total / full_bytes:.4f} % | {bodies} "
              f"| {found.exchange.round_trips} | {seconds:.2f} |", flush=True)  # fmt: skip
        if deleted or rolled:
            repaired = asyncio.run(run_verify(db, reader(), repair=True))
            assert repaired.requeued == deleted_n + rolled_n, repaired
            host_agent(config, "sync", "--once", env=env)
            clean = asyncio.run(run_verify(db, reader()))
            if clean.differences or clean.needs_repair:
                print(f"not clean after --repair and a sync: {clean}", file=sys.stderr)
                raise SystemExit(1)
    print(f"after --repair and a sync, verify was clean each time ({way})")
    return gateway


if __name__ == "__main__":
    raise SystemExit(main())
