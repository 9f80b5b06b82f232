"""What to ship for one table, derived from the live PostgreSQL columns and the local ones.

Every PostgreSQL column is filled from the local column of the same name, except four:
`host_identifier` (this host), `store_id` (this store's identity), `source_id` (the local row
id) and `synced_at` (the server's receive time, left to its default). Values are converted
by the PostgreSQL type.

Times travel as microseconds since 2000-01-01 UTC and booleans as 0/1 (`codecs.py`). Three
ways to convert, because this is the sync's hottest loop:
- `selection` + `prepare` (a direct sync): SQLite computes the wire values while it reads
  (epoch seconds to microseconds, in the valid range), and a flag per row says whether every
  checked value was valid; a record is (host, store) followed by the row as read, with no
  Python work per value.
  A flagged row (a time out of range or not an integer, a boolean not 0/1) goes through
  `to_record` from its stored values, which come along at the end of the row.
- `convert_batch` (rows from a bundle, `prepare_raw`): one list comprehension compiled per
  table, converting only what the codecs cannot take as it is.
- `to_record`: per row and per column, with checks that name the column; used for a batch
  whose fast conversion failed, so one bad value rejects only its own row.
Text and integers go to asyncpg's binary encoder unchecked; a value it refuses is found by the
sink's bisection and explained by `diagnose`.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from asyncpg.pgproto.pgproto import UUID as PgUUID

from host_agent.errors import ColumnsMissing, SchemaMismatch
from host_agent.store.tables import TABLES_BY_NAME
from host_agent.sync.postgres.codecs import PG_EPOCH_UNIX, pg_time
from host_agent.sync.postgres.schema import TableShape
from host_agent.sync.records import LocalRow, Rejection, Selection

Converter = Callable[[Any], Any]

SERVER_SIDE = frozenset({"synced_at"})
# The columns that make a row's identity on the server (its unique key holds them, and the
# partition column too); HOST and STORE mark the two the sink fills itself.
IDENTITY_COLUMNS = ("host_identifier", "store_id", "source_id")
HOST, STORE = -1, -2
_INT_RANGES = {"int2": 2**15, "int4": 2**31, "int8": 2**63}


class RowValueError(ValueError):
    """A local value that cannot become its PostgreSQL column's value."""


# asyncpg sends the smallest and largest datetimes as -infinity and infinity: a value that
# lands on either would arrive changed, so it is refused like one out of range.
_EPOCH_LOW = datetime.min.replace(tzinfo=UTC).timestamp()  # 0001-01-01T00:00:00Z
_EPOCH_HIGH = datetime.max.replace(tzinfo=UTC).timestamp()
# The same range in whole seconds, for the check SQLite makes.
_SECONDS_LOW = int(_EPOCH_LOW) + 1
_SECONDS_HIGH = int(_EPOCH_HIGH) - 1


def _timestamptz(value: Any) -> int | None:
    """Epoch seconds as the wire's microseconds since 2000 (`codecs.pg_time`)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowValueError(f"expected UNIX epoch seconds, got {type(value).__name__}")
    try:
        converted = datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise RowValueError(f"epoch seconds out of range: {value}") from None
    if not _EPOCH_LOW < value < _EPOCH_HIGH:
        raise RowValueError(
            f"epoch seconds {value} ({converted.isoformat()}) would be stored as "
            f"{'-' if value <= _EPOCH_LOW else ''}infinity"
        )
    return pg_time(value if isinstance(value, int) else converted)


def _boolean(value: Any) -> bool | None:
    if value is None:
        return None
    if value in (0, 1):
        return bool(value)
    raise RowValueError(f"expected 0 or 1, got {value!r}"[:120])


def _integer(bits_limit: int) -> Converter:
    def convert(value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise RowValueError(f"expected an integer, got {type(value).__name__}")
        if not -bits_limit <= value < bits_limit:
            raise RowValueError(f"integer out of range: {value}")
        return value

    return convert


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    raise RowValueError(f"expected text, got {type(value).__name__}")


def _bytea(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise RowValueError(f"expected bytes, got {type(value).__name__}")


def converter_for(type_name: str) -> Converter | None:
    if type_name == "timestamptz":
        return _timestamptz
    if type_name == "bool":
        return _boolean
    if type_name in _INT_RANGES:
        return _integer(_INT_RANGES[type_name])
    if type_name in ("text", "varchar"):
        return _text
    if type_name == "bytea":
        return _bytea
    return None


@dataclass(frozen=True)
class TablePlan:
    table: str
    host: str
    store_id: uuid.UUID
    identity: tuple[str, ...]  # the unique key an upsert's ON CONFLICT names
    copy_allowed: bool  # False under row level security: COPY FROM is refused there
    pg_columns: tuple[str, ...]  # COPY column order
    local_columns: tuple[str, ...]  # SELECT order after id, row_version
    _sources: tuple[int, ...]  # per pg column: HOST, STORE, else index into LocalRow
    _converters: tuple[Converter | None, ...]
    _types: tuple[str, ...]  # per pg column: its pg_catalog type name

    # -- rows read through `selection` (a direct sync) ------------------------------------------

    @functools.cached_property
    def selection(self) -> Selection:
        """What SQLite reads for each row: the record's values after host and store (which
        `prepare` puts in front), in COPY order, times as the wire's microseconds where valid;
        then the stored values of the checked columns (times, booleans), then a flag: 1 when
        one of those is not valid on the wire, so the row takes `to_record`. asyncpg reads
        only the first `len(pg_columns)` values of a record."""
        expressions: list[str] = []
        names: list[str] = []
        conditions: list[str] = []
        checked: list[str] = []
        for name, source, convert in zip(
            self.pg_columns[2:], self._sources[2:], self._converters[2:], strict=True
        ):
            names.append(name)
            column = "t.id" if source == 0 else f"t.{self.local_columns[source - 2]}" if (
                source >= 2
            ) else "t.row_version"
            if convert is _timestamptz:
                valid = (
                    f"typeof({column}) = 'integer' "
                    f"AND {column} BETWEEN {_SECONDS_LOW} AND {_SECONDS_HIGH}"
                )
                expressions.append(
                    f"CASE WHEN {valid} THEN ({column} - {PG_EPOCH_UNIX}) * 1000000 END"
                )
                conditions.append(f"({column} IS NULL OR {valid})")
                checked.append(column)
            elif convert is _boolean:
                expressions.append(column)
                conditions.append(f"({column} IS NULL OR {column} IN (0, 1))")
                checked.append(column)
            else:
                expressions.append(column)
        for column in checked:
            expressions.append(column)
            names.append(column.removeprefix("t."))
        expressions.append(
            f"CASE WHEN {' AND '.join(conditions)} THEN 0 ELSE 1 END" if conditions else "0"
        )
        names.append("(checked)")
        return Selection(
            expressions=tuple(expressions),
            names=tuple(names),
            sized=self.local_columns,
            id_at=self.source_id_index - 2,
            version_at=self.version_index - 2,
        )

    @functools.cached_property
    def _stored_at(self) -> tuple[int, ...]:
        """Where a row read through `selection` holds (id, row_version, *local_columns) as
        stored."""
        sources = self._sources[2:]
        checked = [
            s for s, c in zip(sources, self._converters[2:], strict=True)
            if s >= 2 and (c is _timestamptz or c is _boolean)
        ]  # fmt: skip
        tail = {source: len(sources) + i for i, source in enumerate(checked)}
        where = {source: i for i, source in enumerate(sources)}
        return tuple(tail.get(s, where.get(s, -1)) for s in range(2 + len(self.local_columns)))

    def prepare(self, rows: Sequence[LocalRow]) -> tuple[list[tuple[Any, ...]], list[Rejection]]:
        """Records for rows read through `selection`, and the rows refused before sending."""
        flag = len(self.selection.expressions) - 1
        head = (self.host, self.store_id)
        if not any([r[flag] for r in rows]):
            return [head + r for r in rows], []
        records: list[tuple[Any, ...]] = []
        refused: list[Rejection] = []
        stored_at = self._stored_at
        for row in rows:
            if not row[flag]:
                records.append(head + row)
                continue
            stored = tuple(row[i] for i in stored_at)
            try:
                records.append(self.to_record(stored))
            except RowValueError as exc:
                refused.append(Rejection(int(stored[0]), int(stored[1]), str(exc)))
        return records, refused

    # -- rows as stored: (id, row_version, *local_columns) (a bundle's rows) ---------------------

    def prepare_raw(
        self, rows: Sequence[LocalRow]
    ) -> tuple[list[tuple[Any, ...]], list[Rejection]]:
        """Records for rows as stored, and the rows refused before sending."""
        try:
            return self.convert_batch(rows), []
        except (TypeError, ValueError, KeyError, OverflowError, OSError):
            pass
        records: list[tuple[Any, ...]] = []
        refused: list[Rejection] = []
        for row in rows:
            try:
                records.append(self.to_record(row))
            except RowValueError as exc:
                refused.append(Rejection(int(row[0]), int(row[1]), str(exc)))
        return records, refused

    def convert_batch(self, rows: Sequence[LocalRow]) -> list[tuple[Any, ...]]:
        """All rows converted, or an exception if any value does not convert."""
        return _batch_converter(self._sources, self._converters)(self.host, self.store_id, rows)

    def diagnose(self, record: Sequence[Any]) -> str | None:
        """Why asyncpg's encoder would refuse `record`, naming the column; None if unknown."""
        values = record[: len(self.pg_columns)]
        for name, value, expected in zip(self.pg_columns, values, self._expected, strict=True):
            if value is None or expected is None:
                continue
            kind, limit = expected
            value = cast(Any, value)
            if kind is bool:
                if value not in (0, 1):
                    return f"column {name}: expected 0 or 1, got {value!r}"[:120]
                continue
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                return f"column {name}: expected {kind.__name__}, got {type(value).__name__}"
            if limit and not -limit <= value < limit:
                return f"column {name}: integer out of range: {value}"
            if kind is str:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return f"column {name}: text is not valid UTF-8"
        return None

    @property
    def _expected(self) -> tuple[tuple[type[Any], int] | None, ...]:
        return tuple(_PY_TYPES.get(t) for t in self._types)

    def to_record(self, row: LocalRow) -> tuple[Any, ...]:
        """The PostgreSQL record for `row`; raises RowValueError naming the bad column."""
        out: list[Any] = []
        for name, source, convert in zip(
            self.pg_columns, self._sources, self._converters, strict=True
        ):
            value = self.host if source == HOST else self.store_id if source == STORE else (
                row[source]
            )
            if convert is not None:
                try:
                    value = convert(value)
                except RowValueError as exc:
                    raise RowValueError(f"column {name}: {exc}") from None
            out.append(value)
        return tuple(out)

    @property
    def version_index(self) -> int:
        return self.pg_columns.index("row_version")

    @property
    def source_id_index(self) -> int:
        return self.pg_columns.index("source_id")


BOOKKEEPING = frozenset({"id", "row_version", "synced_at"})


def missing_columns(table: str, shape: TableShape, local_columns: Sequence[str]) -> list[str]:
    """Local data columns the server's table lacks (the local-only ISO texts aside): their
    values would silently not arrive, so a run refuses to ship instead."""
    known = TABLES_BY_NAME.get(table)
    local_only = known.local_only if known is not None else frozenset()
    names = {c.name for c in shape.columns}
    return [
        c for c in local_columns if c not in BOOKKEEPING and c not in local_only and c not in names
    ]


def build_plan(
    table: str,
    host: str,
    store_id: str,
    shape: TableShape,
    local_columns: Sequence[str],
) -> TablePlan:
    """Match PostgreSQL columns to local ones; raise SchemaMismatch for what cannot be filled."""
    pg_columns = shape.columns
    if not pg_columns:
        raise SchemaMismatch(
            f"table {table} does not exist in PostgreSQL: run `host-agent init-db`"
        )
    local = [c for c in local_columns if c not in ("id", "row_version")]
    names = {c.name for c in pg_columns}
    for required in (*IDENTITY_COLUMNS, "row_version"):
        if required not in names:
            raise SchemaMismatch(
                f"{table}.{required} is missing in PostgreSQL: run `host-agent init-db`"
            )
    identity = shape.identity_key(IDENTITY_COLUMNS)
    if identity is None:
        raise SchemaMismatch(
            f"{table} has no unique key on ({', '.join(IDENTITY_COLUMNS)}, ...) in PostgreSQL, "
            "so a re-sent row would be stored twice: run `host-agent init-db`"
        )
    missing = missing_columns(table, shape, local_columns)
    if missing:
        raise ColumnsMissing(table, missing)
    shipped: list[str] = []
    types: list[str] = []
    selected: list[str] = []
    sources: list[int] = []
    converters: list[Converter | None] = []
    for column in pg_columns:
        if column.name in SERVER_SIDE:
            continue
        if column.name == "host_identifier":
            source = HOST
        elif column.name == "store_id":
            source = STORE
        elif column.name == "source_id":
            source = 0
        elif column.name == "row_version":
            source = 1
        elif column.name in local:
            selected.append(column.name)
            source = 1 + len(selected)
        elif column.not_null and not column.has_default:
            raise SchemaMismatch(
                f"{table}.{column.name} is required in PostgreSQL but has no local column"
            )
        else:
            continue  # a newer server column this agent does not fill: left to its default
        shipped.append(column.name)
        types.append(column.type_name)
        sources.append(source)
        converters.append(converter_for(column.type_name))
    # Host and store first: they are the same in every record, which `prepare` puts in front
    # of the values SQLite read.
    first = {HOST: 0, STORE: 1}  # in this order, whatever the server table's column order
    order = sorted(range(len(shipped)), key=lambda i: (first.get(sources[i], 2), i))
    shipped = [shipped[i] for i in order]
    types = [types[i] for i in order]
    sources = [sources[i] for i in order]
    converters = [converters[i] for i in order]
    return TablePlan(
        table=table,
        host=host,
        store_id=PgUUID(str(uuid.UUID(store_id))),  # asyncpg's own: encoded by a copy
        identity=identity,
        copy_allowed=not shape.row_security,
        pg_columns=tuple(shipped),
        local_columns=tuple(selected),
        _sources=tuple(sources),
        _converters=tuple(converters),
        _types=tuple(types),
    )


_PY_TYPES: dict[str, tuple[type[Any], int]] = {
    "int2": (int, 2**15),
    "int4": (int, 2**31),
    "int8": (int, 2**63),
    "text": (str, 0),
    "varchar": (str, 0),
    "bool": (bool, 0),
    "timestamptz": (int, 2**63),  # microseconds since 2000 (codecs.py)
    "bytea": (bytes, 0),
    "uuid": (uuid.UUID, 0),
}
_BOOLEANS: dict[Any, bool | None] = {0: False, 1: True, None: None}


@functools.lru_cache(maxsize=32)
def _batch_converter(
    sources: tuple[int, ...], converters: tuple[Converter | None, ...]
) -> Callable[[str, uuid.UUID, Sequence[LocalRow]], list[tuple[Any, ...]]]:
    """Compile `[(host, store, r[0], r[1], ts(r[2]), ...) for r in rows]` for one layout.

    Generated code, because a Python call per value was most of the sync's CPU time. Only
    constant indexes and fixed helper names are interpolated, never data."""
    parts = []
    for source, convert in zip(sources, converters, strict=True):
        value = "host" if source == HOST else "store" if source == STORE else f"r[{int(source)}]"
        if convert is _timestamptz:
            value = (
                f"(None if {value} is None else ({value} - epoch) * 1000000 "
                f"if {value}.__class__ is int and low < {value} < high else slow({value}))"
            )
        elif convert is _boolean:
            value = f"booleans[{value}]"
        parts.append(value)
    source_code = f"lambda host, store, rows: [({', '.join(parts)},) for r in rows]"
    namespace = {
        "epoch": PG_EPOCH_UNIX,
        "booleans": _BOOLEANS,
        "low": _EPOCH_LOW,
        "high": _EPOCH_HIGH,
        "slow": _timestamptz,
    }
    converter: Callable[[str, uuid.UUID, Sequence[LocalRow]], list[tuple[Any, ...]]] = eval(
        compile(source_code, "<host_agent batch converter>", "eval"), namespace
    )
    return converter
