"""`host-agent verify [--table T] [--repair]`: does the server hold what this host shipped?"""

from __future__ import annotations

import asyncio

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import make_range_reader, prepare_stores, table_path
from host_agent.errors import ConfigError
from host_agent.store.tables import TABLES, LocalTable
from host_agent.sync.verify import Difference, LocalRanges, TableVerify, verify_table

LISTED = 20  # ids shown per kind of difference


def chosen_tables(table: str | None) -> list[LocalTable]:
    chosen = [t for t in TABLES if table is None or t.name == table]
    if not chosen:
        names = ", ".join(t.name for t in TABLES)
        raise ConfigError("--table", f"no such table: {table} (one of {names})")
    return chosen


async def verify(config: AgentConfig, table: str | None, *, repair: bool) -> list[TableVerify]:
    """Compare each chosen local store with the server's copy (`host_agent.sync.verify`);
    with `repair`, re-queue what the server lacks. Safe while the agent runs."""
    chosen = chosen_tables(table)
    await asyncio.to_thread(prepare_stores, config)
    reader = make_range_reader(config)
    results: list[TableVerify] = []
    try:
        await reader.open()
        for local_table in chosen:
            local = LocalRanges(table_path(config, local_table), local_table)
            try:
                await local.open()
                results.append(await verify_table(local, reader, repair=repair))
            finally:
                await local.close()
    finally:
        await reader.close()
    return results


def _ids(found: list[int]) -> str:
    shown = ", ".join(str(i) for i in found[:LISTED])
    return f" (ids {shown}{', ...' if len(found) > LISTED else ''})" if found else ""


def _versions(found: list[Difference]) -> str:
    shown = ", ".join(
        f"{d.row_id} v{d.server_version}<>v{d.local_version}" for d in found[:LISTED]
    )
    return f" ({shown}{', ...' if len(found) > LISTED else ''})" if found else ""


def render(result: TableVerify) -> list[str]:
    """The report of one table, for a person."""
    r = result
    lines = [
        f"{r.table} (store {r.store_id}): {r.compared:,} synced row(s) compared, "
        f"{r.pending:,} not yet shipped (not compared)"
    ]
    if not r.differences and not r.counter_behind:
        lines.append("  the server holds every synced row at its version")
    lines += [
        f"  missing on the server:      {len(r.missing):,}{_ids([d.row_id for d in r.missing])}",
        f"  older on the server:        {len(r.older):,}{_versions(r.older)}",
        f"  newer on the server:        {len(r.newer):,}{_versions(r.newer)}"
        + (" (left as they are)" if r.newer else ""),
        f"  on the server only:         {len(r.server_only) + r.server_only_below:,} "
        "(removed here by retention or the size cap; never repaired)"
        + _ids(r.server_only),
    ]
    if r.beyond:
        lines.append(
            f"  beyond this store's last id {r.local_last_id}: {r.beyond:,} row(s) on the "
            f"server, up to id {r.beyond_last_id} (was this store restored from a backup?)"
        )
    if r.counter_behind:
        lines.append(
            f"  the server holds versions up to {r.server_max_version}, this store's change "
            f"counter is at {r.local_counter}"
        )
    if r.changed_meanwhile:
        lines.append(
            f"  changed while verify looked: {r.changed_meanwhile:,} (judged by the next verify)"
        )
    x = r.exchange
    lines.append(
        f"  exchanged: {x.round_trips} round trip(s), {x.digests:,} range digest(s), "
        f"{x.pairs:,} (id, version) pair(s)"
        + (f", {x.bytes:,} bytes of request and answer bodies" if x.bytes is not None else "")
    )
    if r.repaired:
        lines.append(
            f"  repaired: {r.requeued:,} row(s) marked unsynced: the next sync ships them"
        )
        if r.advanced_id:
            lines.append(f"  repaired: new rows get ids after {r.beyond_last_id}")
        if r.advanced_counter:
            lines.append(
                f"  repaired: new versions start after {r.server_max_version}"
            )
    return lines
