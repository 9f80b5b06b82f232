#!/usr/bin/env python3
"""Replay a watched root's file history and compare it with the disk.

The rows of `file_change_events` for one root (`monitored_root`), from the agent's local SQLite
file or from PostgreSQL, are replayed in the order they were written into the set of paths that
should exist (the rule: host_agent/collectors/filesystem/replay.py), and compared with what is
below the root now, skipping the names the watcher ignores (its defaults, the config's
`collectors.filesystem.ignore` with --config, or --ignore). Symlinks are entries, never
followed.

    .venv/bin/python scripts/replay_check.py ~/projects --sqlite data/file_changes.db
    .venv/bin/python scripts/replay_check.py ~/projects --postgres "$URL" --host my-host
    .venv/bin/python scripts/replay_check.py ~/projects --config config/config.yaml

Prints how many paths each side has, the phantoms (the rows say they exist; the disk does not
have them) and the missing (on disk; no row says so), a few of each (--show N), or everything
as JSON (--json). Exit 0 when both agree, 1 when they differ, 2 for a usage error.

Replaying from SQLite sees only the rows still in the local file: once `retention_days` prunes
shipped rows, replay from PostgreSQL. A file changed while the check runs may show as a
difference; run it when the root is quiet, after the agent has written what it saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host_agent.collectors.filesystem.replay import Change, replay
from host_agent.collectors.filesystem.snapshot import ignore_matcher
from host_agent.config import DEFAULT_IGNORE

COLUMNS = ("event_type", "file_path", "file_path_raw", "previous_path", "previous_path_raw")


def as_bytes(text: str | None, raw: bytes | None) -> bytes | None:
    """A path as the agent saw it: the raw bytes when it kept them, else the UTF-8 text."""
    if raw is not None:
        return bytes(raw)
    return None if text is None else text.encode("utf-8")


def changes(rows: Iterator[tuple[object, ...]]) -> Iterator[Change]:
    for event_type, path, path_raw, previous, previous_raw in rows:
        target = as_bytes(str(path), path_raw)  # type: ignore[arg-type]
        assert target is not None
        yield Change(
            str(event_type),
            target,
            as_bytes(previous, previous_raw),  # type: ignore[arg-type]
        )


def sqlite_rows(db: Path, root: str) -> Iterator[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db.absolute()}?mode=ro", uri=True)
    try:
        present = {r[1] for r in conn.execute("PRAGMA table_info(file_change_events)")}
        if not present:
            raise SystemExit(f"{db}: no file_change_events table")
        # A file written before sources were kept has no previous_path: NULL then.
        select = ", ".join(c if c in present else "NULL" for c in COLUMNS)
        yield from conn.execute(
            f"SELECT {select} FROM file_change_events WHERE monitored_root = ? ORDER BY id",
            (root,),
        )
    finally:
        conn.close()


async def _postgres_rows(
    url: str, root: str, host: str, store: str | None
) -> list[tuple[object, ...]]:
    import asyncpg

    conn = await asyncpg.connect(url, statement_cache_size=0)
    try:
        present = {
            r[0]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'file_change_events'"
            )
        }
        select = ", ".join(c if c in present else "NULL" for c in COLUMNS)
        # One store's rows in their local order; several stores (a reinstalled host) in the
        # order they started writing.
        rows = await conn.fetch(
            f"SELECT {select} FROM file_change_events "
            "WHERE host_identifier = $1 AND monitored_root = $2 "
            "AND ($3::uuid IS NULL OR store_id = $3::uuid) "
            "ORDER BY min(created_at) OVER (PARTITION BY store_id), store_id, source_id",
            host,
            root,
            store,
        )
    finally:
        await conn.close()
    return [tuple(r) for r in rows]


def disk_paths(root: bytes, ignore: list[str]) -> set[bytes]:
    """Every entry below `root` whose name no pattern ignores; symlinks not followed."""
    matcher = ignore_matcher(ignore)
    found: set[bytes] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as listing:
                for item in listing:
                    if matcher is not None and matcher.match(os.fsdecode(item.name)):
                        continue
                    found.add(item.path)
                    if item.is_dir(follow_symlinks=False):
                        stack.append(item.path)
        except OSError as exc:
            print(f"cannot list {os.fsdecode(directory)}: {exc}", file=sys.stderr)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the watched root, as configured")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sqlite", type=Path, help="the agent's file_changes.db")
    source.add_argument("--postgres", metavar="URL", help="the central PostgreSQL")
    parser.add_argument("--host", help="host_identifier of the rows (with --postgres)")
    parser.add_argument("--store", help="only this store_id (with --postgres)")
    parser.add_argument(
        "--config", type=Path, help="the agent's config: its file or server and ignore list"
    )
    parser.add_argument(
        "--ignore", action="append", help="a name pattern the watcher ignores (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    parser.add_argument("--show", type=int, default=20, help="differences listed per kind")
    args = parser.parse_args(argv)

    ignore = list(DEFAULT_IGNORE)
    host = args.host
    sqlite_file, url = args.sqlite, args.postgres
    if args.config is not None:
        from host_agent.config import load_config

        config = load_config(args.config)
        ignore = list(config.collectors.filesystem.ignore)
        host = host or config.host
        if sqlite_file is None and url is None:
            sqlite_file = config.database.file_events_db
    if args.ignore is not None:
        ignore = args.ignore
    if sqlite_file is None and url is None:
        parser.error("say where the rows are: --sqlite FILE, --postgres URL or --config FILE")
    if url is not None and not host:
        parser.error("--postgres needs --host (or --config)")

    root_text = os.path.abspath(os.path.expanduser(args.root))
    root = os.fsencode(root_text)
    if sqlite_file is not None:
        rows = list(sqlite_rows(Path(sqlite_file), root_text))
    else:
        rows = asyncio.run(_postgres_rows(url, root_text, host, args.store))
    replayed = replay(changes(iter(rows)))
    on_disk = disk_paths(root, ignore)
    phantom = sorted(replayed - on_disk)
    missing = sorted(on_disk - replayed)

    def shown(paths: list[bytes]) -> list[str]:
        return [os.fsdecode(p) for p in paths]

    if args.json:
        print(
            json.dumps(
                {
                    "root": root_text,
                    "rows": len(rows),
                    "replayed": len(replayed),
                    "on_disk": len(on_disk),
                    "phantom": shown(phantom),
                    "missing": shown(missing),
                },
                ensure_ascii=False,
            )
        )
    else:
        print(
            f"{root_text}: {len(rows)} rows replay to {len(replayed)} paths; "
            f"{len(on_disk)} on disk; {len(phantom)} phantom, {len(missing)} missing"
        )
        for title, paths in (("phantom (rows say present, disk has not)", phantom),
                             ("missing (on disk, no row says so)", missing)):
            if paths:
                print(f"{title}:")
                for path in shown(paths)[: args.show]:
                    print(f"  {path}")
                if len(paths) > args.show:
                    print(f"  ... and {len(paths) - args.show} more")
    return 1 if phantom or missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
