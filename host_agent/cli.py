"""The command line: parse, load the configuration, call one library function, map errors.

Exit codes (documented in the README):
  0  done (for `sync --once`: every row is synced or quarantined)
  1  unexpected error
  2  bad configuration or usage
  3  PostgreSQL unreachable (retrying later can help)
  4  PostgreSQL refused the credentials or permissions
  5  PostgreSQL schema mismatch (run `host-agent init-db`)
  6  another agent is already running on this data directory
  7  trigger-sync: no agent is running
  8  trigger-sync: the agent belongs to another user
  9  trigger-sync: the triggered sync did not finish in time
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import structlog

from host_agent import __version__, commands
from host_agent.config import AgentConfig, load_config
from host_agent.errors import ConfigError, HostAgentError
from host_agent.logging import configure_logging, redact, register_url
from host_agent.status import collect_status, render_status
from host_agent.sync.engine import SyncReport


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
    trigger = sub.add_parser(
        "trigger-sync", help="ask the running agent to sync now and wait for the result"
    )
    trigger.add_argument(
        "--wait", type=float, default=120.0, metavar="SECONDS", help="how long to wait"
    )
    status = sub.add_parser("status", help="local view: backlog, quarantine, last sync, backoff")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    run = sub.add_parser("run", help="run the agent (collectors and the sync loop) until stopped")
    run.add_argument(
        "--local-postgres",
        metavar="DIR",
        help="when database.postgres_url is unset, start a PostgreSQL cluster in DIR "
        "(created on first use) and run against it",
    )
    return parser


def _fail(message: str, code: int) -> int:
    print(f"host-agent: {redact(message)}", file=sys.stderr)
    return code


def _print_sync_report(report: SyncReport) -> None:
    for table in report.tables:
        line = f"{table.table}: {table.status}, {table.synced} synced, {table.failed} rejected"
        if table.error is not None:
            line += f" ({redact(str(table.error))})"
        print(line)


def _dispatch(args: argparse.Namespace, config: AgentConfig) -> int:
    if args.command == "init-db":
        files = asyncio.run(commands.init_db(config))
        print(f"schema applied: {', '.join(files)}")
        return 0
    if args.command == "sync":
        report = asyncio.run(commands.sync_once(config, retry_rejected=args.retry_rejected))
        _print_sync_report(report)
        error = report.first_error
        if error is not None:
            return _fail(str(error), error.exit_code)
        return 0
    if args.command == "trigger-sync":
        from host_agent.control import trigger_sync

        triggered = trigger_sync(config, args.wait)
        for table, (state, problem) in triggered.statuses.items():
            print(f"{table}: {state}" + (f" ({problem})" if problem else ""))
        print(f"agent pid {triggered.pid}: sync {'done' if triggered.ok else 'failed'}")
        return 0 if triggered.ok else 3
    if args.command == "status":
        data = collect_status(config)
        print(json.dumps(data, indent=2) if args.json else render_status(data))
        return 0
    if args.command == "run":
        from host_agent.agent import run_agent

        if config.postgres_url is None and args.local_postgres:
            from host_agent.embedded import run_with_local_postgres

            asyncio.run(run_with_local_postgres(config, args.local_postgres))
        else:
            asyncio.run(run_agent(config))
        return 0
    raise AssertionError(args.command)  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level or "info", args.log_format or "console")
    try:
        config = load_config(args.config)
        register_url(config.postgres_url)
        configure_logging(
            args.log_level or config.logging.level, args.log_format or config.logging.format
        )
        return _dispatch(args, config)
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    except HostAgentError as exc:
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        structlog.get_logger("host_agent").error("unexpected error", exc_info=True)
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}", 1)


if __name__ == "__main__":
    raise SystemExit(main())
