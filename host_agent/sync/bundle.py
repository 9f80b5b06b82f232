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
import functools
import hashlib
import io
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import orjson
import zstandard

from host_agent import __version__
from host_agent.errors import BundleRefused

FORMAT = "host-agent-bundle"
VERSION = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_LINE_BYTES = 64 * 2**20


class BundleRow(NamedTuple):
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
    # orjson: the same compact UTF-8 JSON as the standard library's, several times faster
    # (bundles are the gateway's hot path).
    return orjson.dumps(obj) + b"\n"


def values_line(table: str, row_id: int, version: int, values: dict[str, Any]) -> bytes:
    if bytes in map(type, values.values()):  # rare (a non-UTF-8 path): only then rebuilt
        values = {k: _encode_value(v) for k, v in values.items()}
    return _line({"table": table, "id": row_id, "row_version": version, "values": values})


def _json_default(value: Any) -> Any:
    """What orjson calls for a value it has no JSON form for: bytes become {"base64": ...}."""
    if isinstance(value, bytes):
        return _encode_value(value)
    raise TypeError(f"no JSON form for {type(value).__name__}")


def values_lines(
    table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> list[bytes]:
    """`values_line` for rows as the store holds them, (id, row_version, *values of
    `columns`), a batch at once: one `orjson` call a row, bytes (a path that is not UTF-8)
    encoded by orjson's `default` hook as `values_line` encodes them."""
    end = 2 + len(columns)
    # `default` positional and no `option`: with keywords, orjson.dumps takes twice as long.
    return [
        orjson.dumps(
            {
                "table": table,
                "id": r[0],
                "row_version": r[1],
                "values": dict(zip(columns, r[2:end], strict=True)),
            },
            _json_default,
        )
        + b"\n"
        for r in rows
    ]


def row_line(row: BundleRow) -> bytes:
    return values_line(row.table, row.id, row.row_version, row.values)


class BundleWriter:
    """Writes one bundle to a binary stream: the header, rows as they come, the end line.
    `meta.tables` must already describe the rows that will be written."""

    def __init__(self, out: BinaryIO, meta: BundleMeta, *, compress: bool) -> None:
        self._digest = hashlib.sha256()
        self._compressor = (
            zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
            if compress
            else None
        )
        self._out: Any = self._compressor if self._compressor is not None else out
        self.rows = 0
        self._put(_line({"__meta__": meta.as_json()}))

    def _put(self, data: bytes) -> None:
        self._digest.update(data)
        self._out.write(data)

    def write(self, row: BundleRow) -> None:
        self._put(row_line(row))
        self.rows += 1

    def finish(self) -> str:
        """Write the end line; return the bundle's SHA-256."""
        sha256 = self._digest.hexdigest()
        self._out.write(_line({"__end__": {"rows": self.rows, "sha256": sha256}}))
        if self._compressor is not None:
            self._compressor.flush(zstandard.FLUSH_FRAME)
        return sha256


def summarize(meta: BundleMeta, rows: Iterable[BundleRow], stores: Mapping[str, str]) -> None:
    """Fill `meta.tables` from `rows` (`stores`: table -> its store's identity)."""
    for row in rows:
        summary = meta.tables.get(row.table)
        if summary is None:
            summary = meta.tables[row.table] = TableSummary(
                stores[row.table], sorted(row.values)
            )
        summary.add(row.id, row.row_version)


def encode_bundle(meta: BundleMeta, rows: Sequence[BundleRow], *, compress: bool) -> bytes:
    """A whole bundle in memory (the gateway's unit: one batch)."""
    return encode_lines(meta, [row_line(row) for row in rows], compress=compress)


def encode_lines(meta: BundleMeta, lines: Sequence[bytes], *, compress: bool) -> bytes:
    """A whole bundle from row lines already made (`values_line`)."""
    head = _line({"__meta__": meta.as_json()})
    body = b"".join(lines)
    digest = hashlib.sha256(head)
    digest.update(body)
    data = head + body + _line({"__end__": {"rows": len(lines), "sha256": digest.hexdigest()}})
    # One frame that states its size: a truncated one cannot decompress at all.
    return zstandard.ZstdCompressor(level=1).compress(data) if compress else data


# --- reading ------------------------------------------------------------------------------------


@dataclass
class BundleHead:
    """A bundle checked whole: its header and digest (rows are read again to apply them)."""

    meta: BundleMeta
    sha256: str


@dataclass
class Bundle(BundleHead):
    rows: list[BundleRow] = field(default_factory=list)


Source = bytes | Path


def _open(source: Source) -> BinaryIO:
    """The bundle's plain bytes as a stream, decompressing zstd on the fly."""
    try:
        raw: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as exc:
        raise BundleRefused(f"cannot read {source!s}: {exc.strerror or exc}") from None
    magic = raw.read(4)
    raw.seek(0)
    if magic != ZSTD_MAGIC:
        return raw
    if isinstance(source, bytes):
        try:
            # A frame that states its size (as the gateway's do) must be whole to decompress.
            return io.BytesIO(zstandard.ZstdDecompressor().decompress(source))
        except zstandard.ZstdError as exc:
            if "content size" not in str(exc):
                raise BundleRefused(
                    f"not a whole zstd stream ({exc}): truncated or damaged"
                ) from None
    reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return io.BufferedReader(reader)


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    while True:
        try:
            line = stream.readline(MAX_LINE_BYTES + 1)
        except zstandard.ZstdError as exc:
            raise BundleRefused(f"the zstd stream is damaged ({exc})") from None
        if not line:
            return
        if not line.endswith(b"\n"):
            if len(line) > MAX_LINE_BYTES:
                raise BundleRefused("a line is longer than any row can be")
            raise BundleRefused("the last line is cut short: the bundle is truncated")
        yield line


def _json(line: bytes, what: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(line)
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


def _row(obj: dict[str, Any], number: int) -> BundleRow:
    try:
        table, row_id, version = obj["table"], obj["id"], obj["row_version"]
        values = obj["values"]
    except KeyError as exc:
        raise BundleRefused(f"line {number} lacks {exc}") from None
    if (
        type(row_id) is not int  # exactly int: bool and float are not ids
        or type(version) is not int
        or type(values) is not dict
        or type(table) is not str
    ):
        raise BundleRefused(f"line {number} is not a row")
    kinds = set(map(type, values.values()))
    if dict in kinds or list in kinds:  # bytes (or something that is not a value)
        try:
            values = {k: _decode_value(v) for k, v in values.items()}
        except (ValueError, TypeError):
            raise BundleRefused(f"line {number} holds bytes that are not base64") from None
    return BundleRow(table, row_id, version, values)


PARSE_CHUNK = 2000
# A BundleRow from a 4-tuple in one C call (`BundleRow._make` is a Python function).
_new_row = functools.partial(tuple.__new__, BundleRow)


def _parse_rows(lines: list[bytes], first_number: int, joined: bytes) -> list[dict[str, Any]]:
    """Row lines (`joined`: them joined by commas) parsed in one call, as a JSON array, which
    costs a fraction of one call per line; the line at fault is found again one by one when
    it fails."""
    try:
        parsed = orjson.loads(b"[" + joined + b"]")
    except (ValueError, UnicodeDecodeError):
        for offset, line in enumerate(lines):
            _json(line, f"line {first_number + offset}")
        raise BundleRefused("the rows are not JSON: the bundle is damaged") from None
    if not isinstance(parsed, list):
        raise BundleRefused("the rows are not JSON objects")
    if len(parsed) != len(lines):  # a row split over lines, or lines holding several rows
        for offset, line in enumerate(lines):
            _json(line, f"line {first_number + offset}")
        raise BundleRefused("the rows are not one JSON object a line: the bundle is damaged")
    for offset, obj in enumerate(parsed):
        if not isinstance(obj, dict):
            raise BundleRefused(f"line {first_number + offset} is not a JSON object")
    return parsed


def _rows(lines: list[bytes], first: int) -> list[BundleRow]:
    """The rows of a chunk of row lines, checked as `_row` checks each one. A chunk in which
    no value can be a JSON object or list (no `{` beyond the two of each line, no `[`: a
    string holding one only sends the chunk the long way) is checked a field at a time, in C
    loops; any doubt and every line goes through `_row`, which names the line at fault."""
    joined = b",".join(lines)
    parsed = _parse_rows(lines, first, joined)
    plain = joined.count(b"{") == 2 * len(lines) and b"[" not in joined
    if plain:
        try:
            tables = [obj["table"] for obj in parsed]
            row_ids = [obj["id"] for obj in parsed]
            row_versions = [obj["row_version"] for obj in parsed]
            values = [obj["values"] for obj in parsed]
        except KeyError:
            plain = False
    if (
        plain
        and set(map(type, tables)) <= {str}
        and set(map(type, row_ids)) <= {int}  # exactly int: bool and float are not ids
        and set(map(type, row_versions)) <= {int}
        and set(map(type, values)) <= {dict}
    ):
        return list(map(_new_row, zip(tables, row_ids, row_versions, values, strict=True)))
    return [_row(obj, first + n) for n, obj in enumerate(parsed)]


def _walk(source: Source, keep: list[BundleRow] | None) -> BundleHead:
    """Read the whole bundle, checking everything; keep the rows in `keep` if given. The
    last line must be the end line; every line before it counts in the digest."""
    digest = hashlib.sha256()
    meta: BundleMeta | None = None
    count = 0
    chunk: list[bytes] = []
    chunk_start = 2
    last: bytes | None = None
    number = 0

    ids: dict[str, list[int]] = {}
    versions: dict[str, list[int]] = {}

    def take(lines: list[bytes], first: int) -> None:
        nonlocal count
        assert meta is not None
        rows = _rows(lines, first)
        names = {row.table for row in rows}
        for name in names:
            if name not in meta.tables:
                raise BundleRefused(f"a row of {name}, which the header does not list")
            if name not in ids:
                ids[name], versions[name] = [], []
        if len(names) == 1:  # the usual chunk: one table's rows
            [name] = names
            ids[name].extend([row.id for row in rows])
            versions[name].extend([row.row_version for row in rows])
        else:
            for row in rows:
                ids[row.table].append(row.id)
                versions[row.table].append(row.row_version)
        count += len(rows)
        if keep is not None:
            keep.extend(rows)

    with _open(source) as stream:
        for number, line in enumerate(_lines(stream), start=1):
            if last is None:
                last = line
                continue
            # `last` is not the final line: it is the header or a row.
            digest.update(last)
            if meta is None:
                obj = _json(last, "line 1")
                if "__end__" in obj:
                    raise BundleRefused(f"line {number} follows the end line: altered")
                meta = _meta(obj)
            else:
                chunk.append(last)
                if len(chunk) >= PARSE_CHUNK:
                    take(chunk, chunk_start)
                    chunk_start += len(chunk)
                    chunk = []
            last = line
    if last is None:
        raise BundleRefused("no header: the bundle is empty, truncated, or not a bundle")
    closing = _json(last, f"line {number}")
    if "__end__" not in closing:
        raise BundleRefused("the bundle has no end line: it is truncated")
    end = closing["__end__"] if isinstance(closing["__end__"], dict) else {}
    if chunk:
        take(chunk, chunk_start)
    if meta is None:
        raise BundleRefused("no header: the bundle is empty, truncated, or not a bundle")
    if end.get("sha256") != digest.hexdigest() or end.get("rows") != count:
        raise BundleRefused(
            "the SHA-256 or row count in the end line does not match the content: the bundle "
            "was altered, reordered or damaged"
        )
    for name, declared in meta.tables.items():
        actual = TableSummary(declared.store_id, declared.columns)
        if ids.get(name):
            actual.rows = len(ids[name])
            actual.first_id, actual.last_id = min(ids[name]), max(ids[name])
            actual.min_row_version = min(versions[name])
            actual.max_row_version = max(versions[name])
        if actual.as_json() != declared.as_json():
            raise BundleRefused(f"the rows of {name} do not match the header's counts and ranges")
    return BundleHead(meta, digest.hexdigest())


def check_bundle(source: Source) -> BundleHead:
    """Read a bundle whole and check it, keeping nothing but its header: raise
    `BundleRefused` saying what is wrong."""
    return _walk(source, None)


def read_bundle(source: Source) -> Bundle:
    """Read and check a bundle, keeping its rows (for a bundle that fits in memory)."""
    rows: list[BundleRow] = []
    head = _walk(source, rows)
    return Bundle(head.meta, head.sha256, rows)


def bundle_rows(source: Source) -> Iterator[BundleRow]:
    """The rows of a bundle `check_bundle` accepted, read again one by one."""
    with _open(source) as stream:
        for number, line in enumerate(_lines(stream), start=1):
            obj = _json(line, f"line {number}")
            if number == 1 or "__end__" in obj:
                continue
            yield _row(obj, number)
