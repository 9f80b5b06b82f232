"""Bundles: local rows as a self-checking file, the one format of the gateway and of USB sticks.

A bundle is JSON Lines (zstd-compressed when its name ends in `.zst`, or when sent to the
gateway; plain `.jsonl` is accepted everywhere). See docs/BUNDLE_FORMAT.md for the reference.

    {"__meta__": {"format": "host-agent-bundle", "version": 1, "bundle_id": "<uuid>", ...}}
    {"table": "file_change_events", "id": 17, "row_version": 0, "values": {...}}
    ...
    {"__end__": {"rows": 2, "sha256": "<hex digest of every byte before this line>"}}

Values are as the local store holds them: integers, reals, text, NULL, and bytes as
`{"base64": "..."}` (the only JSON object a value can be). `read_bundle` refuses, before anything
is applied, a file whose digest does not match (altered, reordered), that lacks its end line
(truncated), or whose rows disagree with its header (counts, id and version ranges, tables).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import zstandard

from host_agent import __version__
from host_agent.errors import BundleRefused

FORMAT = "host-agent-bundle"
VERSION = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_LINE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class BundleRow:
    table: str
    id: int
    row_version: int
    values: dict[str, Any]  # column -> value as the local store holds it (bytes as bytes)


@dataclass
class TableSummary:
    """What a bundle holds of one table (and which store's rows they are)."""

    store_id: str
    columns: list[str]
    rows: int = 0
    first_id: int | None = None
    last_id: int | None = None
    min_row_version: int | None = None
    max_row_version: int | None = None

    def add(self, row_id: int, version: int) -> None:
        self.rows += 1
        self.first_id = row_id if self.first_id is None else min(self.first_id, row_id)
        self.last_id = row_id if self.last_id is None else max(self.last_id, row_id)
        self.min_row_version = (
            version if self.min_row_version is None else min(self.min_row_version, version)
        )
        self.max_row_version = (
            version if self.max_row_version is None else max(self.max_row_version, version)
        )

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BundleMeta:
    bundle_id: str
    host_identifier: str
    created_at: str
    agent_version: str
    tables: dict[str, TableSummary] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "bundle_id": self.bundle_id,
            "host_identifier": self.host_identifier,
            "created_at": self.created_at,
            "agent_version": self.agent_version,
            "tables": {name: t.as_json() for name, t in self.tables.items()},
        }

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables.values())


def new_meta(host: str) -> BundleMeta:
    return BundleMeta(
        bundle_id=str(uuid.uuid4()),
        host_identifier=host,
        created_at=datetime.now(UTC).isoformat(),
        agent_version=__version__,
    )


def _encode_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) != {"base64"} or not isinstance(value["base64"], str):
            raise BundleRefused("a value is an object that is not {'base64': ...}")
        return base64.b64decode(value["base64"], validate=True)
    if isinstance(value, list):
        raise BundleRefused("a value is a list")
    return value


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def encode_bundle(
    meta: BundleMeta, rows: Iterable[BundleRow], *, compress: bool
) -> bytes:
    """The bundle's bytes. `meta.tables` must already describe `rows` (see `summarize`)."""
    digest = hashlib.sha256()
    out = io.BytesIO()

    def put(data: bytes) -> None:
        digest.update(data)
        out.write(data)

    put(_line({"__meta__": meta.as_json()}))
    count = 0
    for row in rows:
        put(
            _line(
                {
                    "table": row.table,
                    "id": row.id,
                    "row_version": row.row_version,
                    "values": {k: _encode_value(v) for k, v in row.values.items()},
                }
            )
        )
        count += 1
    out.write(_line({"__end__": {"rows": count, "sha256": digest.hexdigest()}}))
    data = out.getvalue()
    return zstandard.ZstdCompressor(level=3).compress(data) if compress else data


def summarize(meta: BundleMeta, rows: Sequence[BundleRow], stores: Mapping[str, str]) -> None:
    """Fill `meta.tables` from `rows` (`stores`: table -> its store's identity)."""
    for row in rows:
        summary = meta.tables.get(row.table)
        if summary is None:
            summary = meta.tables[row.table] = TableSummary(
                stores[row.table], sorted(row.values)
            )
        summary.add(row.id, row.row_version)


@dataclass
class Bundle:
    meta: BundleMeta
    rows: list[BundleRow]
    sha256: str


def _plain(data: bytes) -> bytes:
    if data[:4] != ZSTD_MAGIC:
        return data
    try:
        # A frame that states its size (as ours do) must be whole to decompress at all.
        plain: bytes = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as exc:
        if "content size" not in str(exc):
            raise BundleRefused(
                f"not a whole zstd stream ({exc}): truncated or damaged"
            ) from None
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            plain = reader.read()  # a stream without a stated size: the end line decides
    if not plain:
        raise BundleRefused("the zstd stream holds nothing: truncated or damaged")
    return plain


def _lines(data: bytes) -> Iterator[bytes]:
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            raise BundleRefused("the last line is cut short: the bundle is truncated")
        if end - start > MAX_LINE_BYTES:
            raise BundleRefused("a line is longer than any row can be")
        yield data[start : end + 1]
        start = end + 1


def _json(line: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise BundleRefused(f"{what} is not JSON: the bundle is damaged") from None
    if not isinstance(obj, dict):
        raise BundleRefused(f"{what} is not a JSON object")
    return obj


def _meta(obj: dict[str, Any]) -> BundleMeta:
    raw = obj.get("__meta__")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleRefused("the first line is not a host-agent bundle header")
    if raw.get("version") != VERSION:
        raise BundleRefused(
            f"bundle format version {raw.get('version')!r}; this host-agent reads version "
            f"{VERSION}: upgrade it"
        )
    try:
        tables = {
            name: TableSummary(**summary) for name, summary in dict(raw["tables"]).items()
        }
        meta = BundleMeta(
            bundle_id=str(uuid.UUID(raw["bundle_id"])),
            host_identifier=str(raw["host_identifier"]),
            created_at=str(raw["created_at"]),
            agent_version=str(raw["agent_version"]),
            tables=tables,
        )
        for summary in tables.values():
            summary.store_id = str(uuid.UUID(summary.store_id))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleRefused(f"the header is incomplete ({type(exc).__name__}: {exc})") from None
    return meta


def read_bundle(data: bytes) -> Bundle:
    """Parse and check a whole bundle; raise `BundleRefused` saying what is wrong."""
    plain = _plain(data)
    if not plain:
        raise BundleRefused("the bundle is empty")
    digest = hashlib.sha256()
    meta: BundleMeta | None = None
    rows: list[BundleRow] = []
    end: dict[str, Any] | None = None
    for number, line in enumerate(_lines(plain), start=1):
        if end is not None:
            raise BundleRefused(f"line {number} follows the end line: the bundle was altered")
        obj = _json(line, f"line {number}")
        if "__end__" in obj:
            end = obj["__end__"] if isinstance(obj["__end__"], dict) else {}
            continue
        digest.update(line)
        if meta is None:
            meta = _meta(obj)
            continue
        rows.append(_row(obj, number))
    if meta is None:
        raise BundleRefused("the bundle has no header")
    if end is None:
        raise BundleRefused("the bundle has no end line: it is truncated")
    if end.get("sha256") != digest.hexdigest() or end.get("rows") != len(rows):
        raise BundleRefused(
            "the SHA-256 or row count in the end line does not match the content: the bundle "
            "was altered, reordered or damaged"
        )
    _check_summary(meta, rows)
    return Bundle(meta, rows, digest.hexdigest())


def _row(obj: dict[str, Any], number: int) -> BundleRow:
    try:
        table, row_id, version = obj["table"], obj["id"], obj["row_version"]
        values = obj["values"]
    except KeyError as exc:
        raise BundleRefused(f"line {number} lacks {exc}") from None
    if (
        not isinstance(table, str)
        or not isinstance(row_id, int)
        or not isinstance(version, int)
        or not isinstance(values, dict)
    ):
        raise BundleRefused(f"line {number} is not a row")
    return BundleRow(table, row_id, version, {k: _decode_value(v) for k, v in values.items()})


def _check_summary(meta: BundleMeta, rows: Sequence[BundleRow]) -> None:
    seen: dict[str, TableSummary] = {}
    for row in rows:
        declared = meta.tables.get(row.table)
        if declared is None:
            raise BundleRefused(f"a row of {row.table}, which the header does not list")
        summary = seen.setdefault(row.table, TableSummary(declared.store_id, declared.columns))
        summary.add(row.id, row.row_version)
    for name, declared in meta.tables.items():
        actual = seen.get(name, TableSummary(declared.store_id, declared.columns))
        if actual.as_json() != declared.as_json():
            raise BundleRefused(f"the rows of {name} do not match the header's counts and ranges")
