#!/usr/bin/env python3
"""Benchmark: shipping through `host-agent gateway` against shipping straight to PostgreSQL.

Starts a private PostgreSQL and a gateway process in front of it, then measures, in one run:
  (a) `host-agent sync --once` of `--rows` file_change_events rows straight into PostgreSQL
      (the reference), and of the same rows through the gateway (the agent's GatewayTransport,
      default batching); prints both rates and the ratio (gateway / direct);
  (b) `--clients` agents posting at once: as many concurrent clients in one process, each with
      its own host, token and store, each shipping `--client-rows` rows through the agent's own
      GatewayTransport; the time until every row is in, and the most PostgreSQL connections
      the gateway held at once (from the server's connection log), against its pool size.

    .venv/bin/python scripts/bench_gateway.py [--rows 200000] [--clients 200] [--pool-size 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_fleet import Server, agent_binary  # noqa: E402
from bench_sync import build_sqlite, server_cpu, stop_and_clean  # noqa: E402

from host_agent.embedded.cluster import free_port  # noqa: E402
from host_agent.sync.gateway_client import GatewayTransport  # noqa: E402
from host_agent.sync.records import LocalRow  # noqa: E402

COLUMNS = (
    "event_time", "event_time_iso", "event_type", "file_path", "file_path_relative", "file_name",
    "file_extension", "file_size", "is_symlink", "monitored_root", "project_name", "created_at",
)  # fmt: skip


def config_file(path: Path, host: str, db: Path, **extra: str) -> Path:
    lines = [
        f"host_identifier: {host}",
        "database:",
        f"  desktop_activity_db: {db.parent / 'desktop_activity.db'}",
        f"  file_events_db: {db}",
        "collectors:\n  desktop:\n    enabled: false",
    ]
    for key, value in extra.items():
        lines.append(f"{key}: {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_sync(config: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, the agent's CPU seconds) of one `sync --once`."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [agent_binary(), "--config", str(config), "--log-level", "warning", "sync", "--once"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err)
    return seconds, usage.ru_utime + usage.ru_stime


def add_token(url: str, host: str, work: Path) -> str:
    config = config_file(work / f"admin-{host}.yaml", "admin", work / "admin.db")
    env = dict(os.environ, HOST_AGENT_DATABASE_POSTGRES_URL=url)
    out = subprocess.run(
        [agent_binary(), "--config", str(config), "admin", "add-host", host, "--token"],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    ).stdout.splitlines()  # fmt: skip
    return out[out.index("Its gateway.token (shown once, keep it secret):") + 1].strip()


async def client(url: str, host: str, token: str, rows: int, batch: int) -> None:
    """One agent's shipping through its own GatewayTransport."""
    transport = GatewayTransport(url, token, host)
    store = str(uuid.uuid4())
    now = int(time.time())
    try:
        await transport.open()
        route = await transport.route("file_change_events", store, COLUMNS)
        for start in range(1, rows + 1, batch):
            local: list[LocalRow] = [
                (i, 0, now, "2026-01-01T00:00:00+00:00", "created", f"/h/{host}/f{i}", f"f{i}",
                 f"f{i}", None, 1, 0, f"/h/{host}", "bench", now)
                for i in range(start, min(start + batch, rows + 1))
            ]  # fmt: skip
            payload, _ = route.prepare(local)
            for attempt in range(100):
                try:
                    await transport.write(route, payload, [])
                    break
                except Exception as exc:  # a 503 under load: come back as an agent would
                    wait = getattr(exc, "retry_after", None) or 1.0
                    if attempt == 99:
                        raise
                    await asyncio.sleep(wait)
    finally:
        await transport.close()


async def many_clients(url: str, tokens: dict[str, str], rows: int) -> None:
    await asyncio.gather(*(client(url, host, token, rows, 500) for host, token in tokens.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--client-rows", type=int, default=1000)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="host-agent-gw-bench-", dir="/tmp"))
    work.chmod(0o755)
    server = Server(work, max_connections=args.pool_size + 20)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        direct_url = server.database("direct")
        gateway_url_db = server.database("through_gateway")
        port = free_port()
        gw_config = config_file(
            work / "gateway.yaml", "the-gateway", work / "gw" / "file_changes.db",
            gateway=f"{{listen_port: {port}, pool_size: {args.pool_size}}}",
        )  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOST_AGENT_")}
        with open(work / "gateway.log", "wb") as log:
            gateway = subprocess.Popen(
                [agent_binary(), "--config", str(gw_config), "--log-level", "warning", "gateway"],
                env=dict(env, HOST_AGENT_DATABASE_POSTGRES_URL=gateway_url_db),
                stdout=log, stderr=log,
            )  # fmt: skip
        gateway_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not healthy(gateway_url):
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise RuntimeError((work / "gateway.log").read_text())
            time.sleep(0.1)  # polling a port another process opens

        # (a) the same rows, straight and through the gateway.
        build_sqlite(work / "direct" / "file_changes.db", "file_change_events", args.rows, "wide")
        shutil.copytree(work / "direct", work / "via")
        server_before = server_cpu(server.pg)
        direct_s, direct_cpu = timed_sync(
            config_file(work / "direct.yaml", "bench-host", work / "direct" / "file_changes.db"),
            dict(env, HOST_AGENT_DATABASE_POSTGRES_URL=direct_url),
        )
        direct_server = server_cpu(server.pg) - server_before
        admin_url = server.pg.url("through_gateway")
        token = add_token(admin_url, "bench-host", work)
        gateway_before, server_before = process_cpu(gateway.pid), server_cpu(server.pg)
        via_s, via_cpu = timed_sync(
            config_file(work / "via.yaml", "bench-host", work / "via" / "file_changes.db",
                        gateway=f"{{url: '{gateway_url}', token: '{token}'}}"),
            env,
        )  # fmt: skip
        gateway_cpu = process_cpu(gateway.pid) - gateway_before
        via_server = server_cpu(server.pg) - server_before
        for name, db in (("direct", "direct"), ("gateway", "through_gateway")):
            count = server.fetchval("SELECT count(*) FROM file_change_events", db)
            if count != args.rows:
                raise RuntimeError(f"{name}: {count} rows arrived of {args.rows}")
        print(f"rows: {args.rows:,}")
        print(f"(a) direct sync --once:           {direct_s:7.2f} s "
              f"{args.rows / direct_s:10,.0f} rows/s")  # fmt: skip
        print(f"    through the gateway:           {via_s:7.2f} s "
              f"{args.rows / via_s:10,.0f} rows/s")  # fmt: skip
        print(f"    ratio gateway / direct:        {direct_s / via_s:7.2f}")
        print(f"    CPU seconds, direct: agent {direct_cpu:.2f}, server {direct_server:.2f}; "
              f"through the gateway: agent {via_cpu:.2f}, gateway {gateway_cpu:.2f}, "
              f"server {via_server:.2f}")  # fmt: skip

        # (b) many agents at once, on a small pool.
        tokens = {f"client-{n:03}": add_token(admin_url, f"client-{n:03}", work)
                  for n in range(args.clients)}  # fmt: skip
        offset = server.log_offset()
        started = time.perf_counter()
        asyncio.run(many_clients(gateway_url, tokens, args.client_rows))
        seconds = time.perf_counter() - started
        total = args.clients * args.client_rows
        arrived = server.fetchval(
            "SELECT count(*) FROM file_change_events WHERE host_identifier LIKE 'client-%'",
            "through_gateway",
        )
        peak = server.peak_connections("through_gateway", offset)
        print(f"(b) {args.clients} agents x {args.client_rows:,} rows at once: {arrived:,} of "
              f"{total:,} rows in {seconds:6.2f} s ({arrived / seconds:10,.0f} rows/s); "
              f"peak PostgreSQL connections of the gateway: {peak} (pool_size "
              f"{args.pool_size})")  # fmt: skip
        return 0 if arrived == total and peak <= args.pool_size else 1
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=60)
        stop_and_clean(server.pg, work, keep=args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
