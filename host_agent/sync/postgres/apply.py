"""Applying a bundle to the server: what `host-agent import` and the gateway both do.

One bundle, one transaction: its rows go through the same write path as a direct sync
(`writes.write_batch`: newest wins, refused rows isolated and reported), a `sync_logs` row is
written per table, and the bundle is recorded in `imported_bundles` with its receipt. A bundle
recorded there already changes nothing: the answer is the receipt it got the first time,
marked "already imported". Two appliers of the same bundle at once are serialised by an
advisory lock on its id.
"""

from __future__ import annotations

import json
import operator
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg

from host_agent.errors import BundleRefused, SchemaMismatch
from host_agent.sync.bundle import BundleHead, BundleRow
from host_agent.sync.postgres.codecs import pg_time
from host_agent.sync.postgres.plan import TablePlan, build_plan
from host_agent.sync.postgres.schema import read_table
from host_agent.sync.postgres.writes import Progress, write_batch, write_sync_logs
from host_agent.sync.records import Rejection, RunRecord

APPLY_BATCH_ROWS = 5000
RECEIPT_VERSION = 1


@dataclass
class TableReceipt:
    store_id: str
    rows: int
    written: int = 0
    rejected: list[Rejection] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "store_id": self.store_id,
            "rows": self.rows,
            "written": self.written,
            "rejected": [
                {"id": r.row_id, "row_version": r.row_version, "reason": r.reason}
                for r in self.rejected
            ],
        }


@dataclass
class Receipt:
    bundle_id: str
    host_identifier: str
    sha256: str
    imported_at: str
    tables: dict[str, TableReceipt]
    already_imported: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "receipt": {
                "version": RECEIPT_VERSION,
                "bundle_id": self.bundle_id,
                "host_identifier": self.host_identifier,
                "sha256": self.sha256,
                "imported_at": self.imported_at,
                "already_imported": self.already_imported,
                "tables": {name: t.as_json() for name, t in self.tables.items()},
            }
        }

    @property
    def written(self) -> int:
        return sum(t.written for t in self.tables.values())

    @property
    def rejected(self) -> int:
        return sum(len(t.rejected) for t in self.tables.values())


def receipt_from_json(data: dict[str, Any]) -> Receipt:
    raw = data["receipt"]
    return Receipt(
        bundle_id=raw["bundle_id"],
        host_identifier=raw["host_identifier"],
        sha256=raw["sha256"],
        imported_at=raw["imported_at"],
        already_imported=bool(raw.get("already_imported")),
        tables={
            name: TableReceipt(
                store_id=t["store_id"],
                rows=int(t["rows"]),
                written=int(t["written"]),
                rejected=[
                    Rejection(int(r["id"]), int(r["row_version"]), str(r["reason"]))
                    for r in t["rejected"]
                ],
            )
            for name, t in raw["tables"].items()
        },
    )


async def _plans(conn: asyncpg.Connection, head: BundleHead) -> dict[str, TablePlan]:
    plans = {}
    for name, summary in head.meta.tables.items():
        shape = await read_table(conn, name)
        if not shape.columns:
            raise SchemaMismatch(
                f"the bundle holds rows of {name}, which this server does not have: run "
                "`host-agent init-db`"
            )
        plans[name] = build_plan(
            name, head.meta.host_identifier, summary.store_id, shape, summary.columns
        )
    return plans


def _values_getter(plan: TablePlan) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """The plan's local columns out of a row's values, in one C call per row."""
    columns = plan.local_columns
    if not columns:
        return lambda _values: ()
    if len(columns) == 1:
        return lambda values: (values[columns[0]],)
    # The itemgetter itself, not a function around it: one C call a row.
    return cast(Callable[[dict[str, Any]], tuple[Any, ...]], operator.itemgetter(*columns))


async def apply_bundle(
    conn: asyncpg.Connection,
    head: BundleHead,
    rows: Iterable[BundleRow],
    *,
    via: str,
    command_timeout: float,
) -> Receipt:
    """Apply a checked bundle (`bundle.check_bundle` / `read_bundle`) in one transaction and
    return its receipt; a bundle applied before changes nothing."""
    meta = head.meta
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", meta.bundle_id
        )
        stored = await conn.fetchval(
            "SELECT receipt FROM imported_bundles WHERE host_identifier = $1 AND bundle_id = $2",
            meta.host_identifier,
            uuid.UUID(meta.bundle_id),
        )
        if stored is not None:
            receipt = receipt_from_json(json.loads(stored))
            if receipt.sha256 != head.sha256:
                raise BundleRefused(
                    f"bundle {meta.bundle_id} was imported before with other contents "
                    "(another SHA-256): refused"
                )
            receipt.already_imported = True
            return receipt
        started = time.time()
        plans = await _plans(conn, head)
        receipt = Receipt(
            meta.bundle_id,
            meta.host_identifier,
            head.sha256,
            datetime.now(UTC).isoformat(),
            {name: TableReceipt(s.store_id, s.rows) for name, s in meta.tables.items()},
        )
        pending: dict[str, list[BundleRow]] = {name: [] for name in plans}
        for row in rows:
            batch = pending[row.table]
            batch.append(row)
            if len(batch) >= APPLY_BATCH_ROWS:
                await _write(conn, plans[row.table], batch, receipt, command_timeout)
                batch.clear()
        for name, batch in pending.items():
            if batch:
                await _write(conn, plans[name], batch, receipt, command_timeout)
        finished = time.time()
        for name, part in receipt.tables.items():
            failed = len(part.rejected)
            run = RunRecord(
                table_name=name,
                started_at=started,
                completed_at=finished,
                records_synced=part.written,
                records_failed=failed,
                status="partial_success" if failed else "success",
                error_message=(
                    f"{failed} row(s) of bundle {meta.bundle_id} refused" if failed else None
                ),
            )
            await write_sync_logs(
                conn, meta.host_identifier, part.store_id, [run], command_timeout=command_timeout
            )
        await conn.execute(
            "INSERT INTO imported_bundles (host_identifier, bundle_id, rows, sha256, receipt, "
            "created_at, via) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            meta.host_identifier,
            uuid.UUID(meta.bundle_id),
            meta.rows,
            head.sha256,
            json.dumps(receipt.as_json()),
            pg_time(datetime.fromisoformat(meta.created_at)),
            via,
        )
    return receipt


async def _write(
    conn: asyncpg.Connection,
    plan: TablePlan,
    batch: list[BundleRow],
    receipt: Receipt,
    command_timeout: float,
) -> None:
    part = receipt.tables[plan.table]
    values = _values_getter(plan)
    try:
        local = [(row.id, row.row_version, *values(row.values)) for row in batch]
    except KeyError as exc:
        raise BundleRefused(f"a row of {plan.table} lacks the column {exc}") from None
    records, refused = plan.prepare_raw(local)
    part.rejected.extend(refused)
    if records:
        written, bad = await write_batch(
            conn, plan, records, Progress(), command_timeout=command_timeout
        )
        part.written += written
        sid, ver = plan.source_id_index, plan.version_index
        part.rejected.extend(Rejection(r[sid], r[ver], reason) for r, reason in bad)
