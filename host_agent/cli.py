"""The command line: parse the arguments, load the configuration, dispatch to `commands/`.

Everything a command does lives in its module under `host_agent/commands/`; this module only
parses, sets up logging, and turns a `HostAgentError` into one line on stderr and the exit code
the error's class carries (see `host_agent.errors`; the README lists them).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from host_agent import __version__
from host_agent.commands import stats as stats_command
from host_agent.config import AgentConfig, load_config
from host_agent.errors import (
    EXIT_TRIGGERED_SYNC_FAILED,
    EXIT_UNEXPECTED,
    ConfigError,
    HostAgentError,
    VerifyMismatch,
)
from host_agent.logging import configure_logging, redact, register_secret, register_url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="host-agent",
        description="Record workstation activity locally and ship it to PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"host-agent {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $HOST_AGENT_CONFIG, then config/config.yaml)",
    )
    parser.add_argument("--log-format", choices=("console", "json"), help="log output format")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("init-db", help="apply the PostgreSQL schema and create the local SQLite files")
    sync = sub.add_parser("sync", help="ship unsynced rows now and exit")
    mode = sync.add_mutually_exclusive_group(required=True)
    mode.add_argument("--once", action="store_true", help="ship everything unsynced, then exit")
    mode.add_argument(
        "--retry-rejected",
        action="store_true",
        help="release quarantined rows, then ship everything unsynced and exit",
    )
    sync.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress line (it shows only when stderr is a terminal)",
    )
    trigger = sub.add_parser(
        "trigger-sync", help="ask the running agent to sync now and wait for the result"
    )
    trigger.add_argument(
        "--wait", type=float, default=120.0, metavar="SECONDS", help="how long to wait"
    )
    status = sub.add_parser("status", help="local view: backlog, quarantine, last sync, backoff")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    stats = sub.add_parser(
        "stats",
        help="sync statistics from the central sync_logs: latest runs, per table, per host, stale",
        description=stats_command.HELP_DESCRIPTION,
        epilog=stats_command.HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stats.add_argument(
        "--url",
        help="PostgreSQL URL (postgresql://user:password@host:port/db); visible in the "
        "process list: prefer the configuration or HOST_AGENT_DATABASE_POSTGRES_URL",
    )
    stats.add_argument(
        "--limit",
        type=stats_command.parse_limit,
        default=stats_command.DEFAULT_LIMIT,
        metavar="N",
        help=f"runs shown in section 1 (default: {stats_command.DEFAULT_LIMIT})",
    )
    stats.add_argument("--host", metavar="NAME", help="only this host_identifier, in every section")
    stats.add_argument(
        "--stale-after",
        default=stats_command.DEFAULT_STALE_AFTER,
        metavar="INTERVAL",
        help="a PostgreSQL interval, e.g. '1 hour', '30 min', '2 days' "
        f"(default: {stats_command.DEFAULT_STALE_AFTER})",
    )
    stats.add_argument(
        "--format",
        choices=stats_command.FORMATS,
        default="aligned",
        help="aligned (default, for people), plain ('|'-separated, no padding) or csv; "
        "every format has the same '== title ==' lines",
    )
    run = sub.add_parser("run", help="run the agent (collectors and the sync loop) until stopped")
    run.add_argument(
        "--local-postgres",
        metavar="DIR",
        help="when database.postgres_url is unset, start a PostgreSQL cluster in DIR "
        "(created on first use) and run against it",
    )
    export = sub.add_parser(
        "export", help="write the unsynced rows to a bundle file, to carry to the server"
    )
    export.add_argument(
        "--out", required=True, type=Path, metavar="FILE",
        help="the bundle to write (zstd when it ends in .zst, else JSON Lines)",
    )  # fmt: skip
    export.add_argument("--table", metavar="TABLE", help="only this table")
    import_ = sub.add_parser(
        "import", help="apply bundles to PostgreSQL and write a receipt next to each"
    )
    import_.add_argument("files", nargs="+", type=Path, metavar="FILE")
    ack = sub.add_parser("ack", help="mark synced what a bundle's receipt says the server took")
    ack.add_argument("receipt", type=Path, metavar="RECEIPT")
    verify = sub.add_parser(
        "verify",
        help="compare the synced rows with the server's copy by range hashes (no rows shipped)",
    )
    verify.add_argument("--table", metavar="TABLE", help="only this table")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="mark the rows the server lacks or holds older unsynced, so the next sync "
        "ships them",
    )
    backup = sub.add_parser(
        "backup", help="a consistent copy of every local store, with a manifest (safe while "
        "the agent runs)"
    )
    backup.add_argument(
        "--out", required=True, type=Path, metavar="DIR",
        help="a new or empty directory for the copies and manifest.json",
    )  # fmt: skip
    sub.add_parser(
        "gateway", help="serve the HTTPS ingest API for hosts without database credentials"
    )
    admin = sub.add_parser(
        "admin", help="server administration: per-host logins, partitions (administrator URL)"
    )
    admin.add_argument(
        "--admin-url",
        metavar="URL",
        help="an administrator's PostgreSQL URL (default: database.admin_url, then "
        "database.postgres_url); visible in the process list: prefer the config",
    )
    actions = admin.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    add_host = actions.add_parser(
        "add-host", help="create a login for one host that may write only its own rows"
    )
    add_host.add_argument("name", help="the host's host_identifier")
    add_host.add_argument(
        "--token", action="store_true", help="also make a token for the gateway (shown once)"
    )
    remove_host = actions.add_parser("remove-host", help="revoke a host's login and token now")
    remove_host.add_argument("name", help="the host's host_identifier")
    maintain = actions.add_parser(
        "maintain",
        help="create the coming months' partitions, empty the default partition, drop "
        "partitions older than database.server_retention_days",
    )
    maintain.add_argument(
        "--months-ahead", type=int, default=2, metavar="N", help="months to create ahead (2)"
    )
    local = sub.add_parser(
        "local-postgres", help="start, stop or inspect the embedded PostgreSQL cluster"
    )
    local.add_argument(
        "action",
        choices=("start", "stop", "status", "url"),
        help="url prints a connection URL including the password: for scripts only",
    )
    local.add_argument(
        "--dir", type=Path, default=Path("data/postgres"), help="cluster directory "
        "(default: data/postgres, as scripts/run.sh uses)"
    )
    local.add_argument("--port", type=int, help="TCP port for start (default: a free one, kept)")
    local.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    local.add_argument(
        "--db", default="host_agent", help="database name for url (default: host_agent)"
    )
    return parser


def _init_db(args: argparse.Namespace, config: AgentConfig) -> int:
    import asyncio

    from host_agent.commands.init_db import init_db

    files = asyncio.run(init_db(config))
    print(f"schema applied: {', '.join(files)}")
    return 0


def _sync(args: argparse.Namespace, config: AgentConfig) -> int:
    import asyncio

    from host_agent.commands.sync import sync_once

    progress = not args.no_progress and sys.stderr.isatty()
    report = asyncio.run(
        sync_once(config, retry_rejected=args.retry_rejected, progress=progress)
    )
    for table in report.tables:
        line = f"{table.table}: {table.status}, {table.synced} synced, {table.failed} rejected"
        if table.error is not None:
            line += f" ({redact(str(table.error))})"
        print(line)
    error = report.first_error
    if error is not None:
        raise error
    return 0


def _trigger(args: argparse.Namespace, config: AgentConfig) -> int:
    from host_agent.commands.trigger import trigger_sync

    triggered = trigger_sync(config, args.wait)
    for table, (state, problem) in triggered.statuses.items():
        print(f"{table}: {state}" + (f" ({problem})" if problem else ""))
    print(f"agent pid {triggered.pid}: sync {'done' if triggered.ok else 'failed'}")
    return 0 if triggered.ok else EXIT_TRIGGERED_SYNC_FAILED


def _status(args: argparse.Namespace, config: AgentConfig) -> int:
    import json

    from host_agent.commands.status import collect_status, render_status

    data = collect_status(config)
    print(json.dumps(data, indent=2) if args.json else render_status(data))
    return 0


def _stats(args: argparse.Namespace, config: AgentConfig) -> int:
    import asyncio

    query = stats_command.StatsQuery(limit=args.limit, host=args.host, stale_after=args.stale_after)
    report = asyncio.run(stats_command.collect_stats(config, query, url=args.url))
    sys.stdout.write(stats_command.render_report(report, args.format))
    return 0


def _run(args: argparse.Namespace, config: AgentConfig) -> int:
    from host_agent.commands.run import main as run_main

    return run_main(config, args.local_postgres)


def _export(args: argparse.Namespace, config: AgentConfig) -> int:
    from host_agent.commands.export import export

    report = export(config, args.out, args.table)
    if report.path is None:
        print("nothing to export: every row is synced (or quarantined)")
    for table in report.tables:
        if table.rows and table.span is not None:
            print(
                f"{table.table}: {table.rows} row(s), ids {table.span.first_id}.."
                f"{table.span.last_id}, store {table.store_id}"
            )
        if table.refused:
            print(f"{table.table}: {len(table.refused)} row(s) quarantined (text not UTF-8)")
    if report.path is not None:
        print(f"wrote bundle {report.bundle_id} to {report.path}")
    return 0


def _import(args: argparse.Namespace, config: AgentConfig) -> int:
    import asyncio

    from host_agent.commands.import_bundles import import_bundles

    for done in asyncio.run(import_bundles(config, args.files)):
        receipt = done.receipt
        state = "already imported" if receipt.already_imported else "imported"
        print(
            f"{done.path}: {state} (bundle {receipt.bundle_id}, host "
            f"{receipt.host_identifier}): {receipt.written} row(s) written, "
            f"{receipt.rejected} refused; receipt {done.receipt_path}"
        )
    return 0


def _ack(args: argparse.Namespace, config: AgentConfig) -> int:
    from host_agent.commands.ack import ack

    for table in ack(config, args.receipt):
        print(f"{table.table}: {table.marked} row(s) marked synced, {table.rejected} quarantined")
    return 0


def _verify(args: argparse.Namespace, config: AgentConfig) -> int:
    import asyncio

    from host_agent.commands.verify import render, verify

    results = asyncio.run(verify(config, args.table, repair=args.repair))
    for result in results:
        for line in render(result):
            print(line)
    unrepaired = [r for r in results if r.needs_repair and not r.repaired]
    if unrepaired:
        raise VerifyMismatch(
            f"{sum(r.differences for r in unrepaired):,} row(s) differ from the server's copy "
            f"in {', '.join(r.table for r in unrepaired)}: `host-agent verify --repair` "
            "marks them for the next sync"
        )
    return 0


def _backup(args: argparse.Namespace, config: AgentConfig) -> int:
    from host_agent.commands.backup import backup

    done = backup(config, args.out)
    for store in done.stores:
        print(
            f"{store.table}: {store.file} ({store.size:,} bytes, {store.rows:,} row(s), "
            f"{store.unsynced:,} unsynced), store {store.store_id}"
        )
    print(f"wrote {done.manifest}")
    return 0


def _gateway(args: argparse.Namespace, config: AgentConfig) -> int:
    from host_agent.commands.gateway import main as gateway_main

    return gateway_main(config)


def _admin(args: argparse.Namespace, config: AgentConfig) -> int:
    import asyncio

    from host_agent.commands import admin

    if args.admin_action == "add-host":
        new = asyncio.run(
            admin.add_host(config, args.name, explicit_url=args.admin_url, with_token=args.token)
        )
        print(f"host {new.host_identifier}: login {new.role_name} created.")
        print("Its database.postgres_url (shown once, keep it secret):")
        print(f"  {new.url}")
        if new.token is not None:
            print("Its gateway.token (shown once, keep it secret):")
            print(f"  {new.token}")
        return 0
    if args.admin_action == "remove-host":
        removed = asyncio.run(admin.remove_host(config, args.name, explicit_url=args.admin_url))
        print(
            f"host {args.name}: login and token revoked; its rows are kept"
            if removed
            else f"host {args.name}: not registered (nothing to revoke)"
        )
        return 0
    done = asyncio.run(
        admin.maintain(config, explicit_url=args.admin_url, months_ahead=args.months_ahead)
    )
    for line in done.lines():
        print(line)
    return 0


def _local_postgres(args: argparse.Namespace, config: AgentConfig) -> int:
    from host_agent.commands.local_postgres import main as local_main

    return local_main(args.action, args.dir, port=args.port, timeout=args.timeout, db=args.db)


COMMANDS: dict[str, Callable[[argparse.Namespace, AgentConfig], int]] = {
    "init-db": _init_db,
    "sync": _sync,
    "trigger-sync": _trigger,
    "status": _status,
    "stats": _stats,
    "run": _run,
    "export": _export,
    "import": _import,
    "ack": _ack,
    "verify": _verify,
    "backup": _backup,
    "gateway": _gateway,
    "admin": _admin,
    "local-postgres": _local_postgres,
}


def _fail(message: str, code: int) -> int:
    print(f"host-agent: {redact(message)}", file=sys.stderr)
    return code


def _quiet_broken_pipe() -> int:
    """The reader closed the pipe early (`status --json | head -1`): its choice, not an error.
    Point stdout at /dev/null so the interpreter's final flush does not complain again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level or "info", args.log_format or "console")
    try:
        config = load_config(args.config)
        register_url(config.postgres_url)
        register_url(config.admin_url)
        register_secret(config.gateway_token)
        configure_logging(
            args.log_level or config.logging.level, args.log_format or config.logging.format
        )
        code = COMMANDS[args.command](args, config)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except ConfigError as exc:
        return _fail(f"config error: {exc}", exc.exit_code)
    except HostAgentError as exc:
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        structlog.get_logger("host_agent").error("unexpected error", exc_info=True)
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}", EXIT_UNEXPECTED)


if __name__ == "__main__":
    raise SystemExit(main())
