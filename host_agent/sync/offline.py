"""The host's side of carrying rows by hand: `export` writes a bundle of what is unsynced,
`ack` settles it with the receipt the server's `import` wrote.

An export reads each table in one read transaction (a consistent snapshot while collectors go
on writing), records the bundle in the table's journal (`store.journal.record_export`: its id,
id range and change counter), and writes the file atomically. The ack marks synced exactly the
rows of that range the server took, at the versions exported (`journal.settle_export`, the same
guarded marking a direct sync uses), and quarantines the rows the server refused. A receipt of
another store, or of a bundle this store never exported, is refused before anything is marked.
Blocking: commands run these in a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host_agent.errors import BundleRefused
from host_agent.store import journal
from host_agent.store.connection import connect, decode_lossless, is_utf8
from host_agent.store.faults import store_errors
from host_agent.store.journal import NOT_QUARANTINED, BatchRange, Export, Rejection
from host_agent.store.tables import LocalTable
from host_agent.sync.bundle import BundleRow, BundleWriter, TableSummary, new_meta

BOOKKEEPING = frozenset({"id", "row_version", "synced_at"})
READ_CHUNK = 5000


@dataclass
class TableExport:
    table: str
    store_id: str
    rows: int
    span: BatchRange | None
    refused: list[Rejection] = field(default_factory=list)  # text that is not UTF-8


@dataclass
class ExportReport:
    path: Path | None  # None: nothing to export, no file written
    bundle_id: str
    tables: list[TableExport]

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


def data_columns(conn: sqlite3.Connection, table: LocalTable) -> list[str]:
    return [
        str(r[1]) for r in conn.execute(f"PRAGMA table_info({table.name})")
        if r[1] not in BOOKKEEPING
    ]  # fmt: skip


def _unsynced(
    conn: sqlite3.Connection, table: LocalTable, columns: Sequence[str]
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(id, row_version, values) of every unsynced, unquarantined row, in id order."""
    select = ", ".join(("t.id", "t.row_version", *(f"t.{c}" for c in columns)))
    sql = (
        f"SELECT {select} FROM {table.name} t INDEXED BY {table.synced_index} "
        f"WHERE t.synced_at IS NULL AND t.id > ? AND {NOT_QUARANTINED} ORDER BY t.id LIMIT ?"
    )
    after = 0
    while True:
        with contextlib.closing(conn.execute(sql, (after, READ_CHUNK))) as cursor:
            chunk = cursor.fetchall()
        if not chunk:
            return
        for row in chunk:
            yield int(row[0]), int(row[1]), dict(zip(columns, row[2:], strict=True))
        after = int(chunk[-1][0])


def _bad_text(values: dict[str, Any]) -> str | None:
    for name, value in values.items():
        if isinstance(value, str) and not is_utf8(value):
            return name
    return None


def export_bundle(
    host: str, stores: Sequence[tuple[LocalTable, Path]], out: Path
) -> ExportReport:
    """Write every unsynced row of `stores` to the bundle `out` (zstd when it ends in .zst)
    and record the export in each store's journal."""
    meta = new_meta(host)
    conns: list[tuple[LocalTable, Path, sqlite3.Connection]] = []
    report = ExportReport(None, meta.bundle_id, [])
    try:
        for table, path in stores:
            conn = connect(path)
            conn.text_factory = decode_lossless
            conns.append((table, path, conn))
            with store_errors(path):
                conn.execute("BEGIN")  # one snapshot for both passes
                snapshot = journal.counter(conn)
                columns = data_columns(conn, table)
                summary = TableSummary(journal.store_id(conn), columns)
                refused: list[Rejection] = []
                for row_id, version, values in _unsynced(conn, table, columns):
                    bad = _bad_text(values)
                    if bad is not None:
                        reason = f"column {bad}: text is not valid UTF-8"
                        refused.append(Rejection(row_id, version, reason))
                    else:
                        summary.add(row_id, version)
            span = None
            if summary.rows:
                assert summary.first_id is not None and summary.last_id is not None
                span = BatchRange(summary.first_id, summary.last_id, snapshot)
                meta.tables[table.name] = summary
            report.tables.append(
                TableExport(table.name, summary.store_id, summary.rows, span, refused)
            )
        sha256 = ""
        if meta.rows:
            report.path = out
            sha256 = _write(out, meta, conns)
        for (_table, path, conn), done in zip(conns, report.tables, strict=True):
            with store_errors(path):
                conn.execute("COMMIT")
                if done.refused:
                    journal.quarantine(conn, done.refused, int(time.time()))
                if done.span is not None:
                    journal.record_export(
                        conn,
                        Export(meta.bundle_id, done.span, done.rows, sha256, str(out),
                               int(time.time()), None),
                    )  # fmt: skip
        return report
    finally:
        for _, _, conn in conns:
            conn.close()


def _write(
    out: Path, meta: Any, conns: list[tuple[LocalTable, Path, sqlite3.Connection]]
) -> str:
    """Write the bundle beside `out` and move it into place once whole and on disk."""
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as handle:
        writer = BundleWriter(handle, meta, compress=out.suffix == ".zst")
        for table, path, conn in conns:
            if table.name not in meta.tables:
                continue
            columns = meta.tables[table.name].columns
            with store_errors(path):
                for row_id, version, values in _unsynced(conn, table, columns):
                    if _bad_text(values) is None:
                        writer.write(BundleRow(table.name, row_id, version, values))
        sha256 = writer.finish()
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, out)
    return sha256


# --- ack ---------------------------------------------------------------------------------------


@dataclass
class TableAck:
    table: str
    marked: int
    rejected: int


def read_receipt(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        receipt = data["receipt"]
        if not isinstance(receipt, dict) or not isinstance(receipt.get("tables"), dict):
            raise TypeError("no tables")
        return receipt
    except FileNotFoundError:
        raise BundleRefused(f"no receipt at {path}") from None
    except (ValueError, KeyError, TypeError):
        raise BundleRefused(f"{path} is not a host-agent receipt") from None


def ack_receipt(receipt: dict[str, Any], stores: Sequence[tuple[LocalTable, Path]]) -> list[
    TableAck
]:
    """Settle an export with its receipt; refuse, marking nothing, a receipt that is not for
    these stores or a bundle they never exported."""
    bundle_id = str(receipt.get("bundle_id"))
    by_name = {table.name: (table, path) for table, path in stores}
    plans: list[tuple[LocalTable, Path, Export, list[Rejection]]] = []
    for name, part in receipt["tables"].items():
        if name not in by_name:
            raise BundleRefused(f"the receipt names a table this host does not keep: {name}")
        table, path = by_name[name]
        conn = connect(path)
        try:
            with store_errors(path):
                own = journal.store_id(conn)
                export = journal.find_export(conn, bundle_id)
        finally:
            conn.close()
        if part.get("store_id") != own:
            raise BundleRefused(
                f"the receipt is for store {part.get('store_id')} of {name}; this host's store "
                f"is {own}: nothing marked"
            )
        if export is None:
            raise BundleRefused(
                f"this store never exported bundle {bundle_id} (of {name}): nothing marked"
            )
        rejected = [
            Rejection(int(r["id"]), int(r["row_version"]), str(r["reason"]))
            for r in part.get("rejected", [])
        ]
        plans.append((table, path, export, rejected))
    done: list[TableAck] = []
    for table, path, export, rejected in plans:
        conn = connect(path)
        try:
            with store_errors(path):
                marked = journal.settle_export(conn, table, export, rejected, int(time.time()))
        finally:
            conn.close()
        done.append(TableAck(table.name, marked, len(rejected)))
    return done
