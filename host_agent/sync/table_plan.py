"""What to ship for one table, derived from the live PostgreSQL columns and the local ones.

Every PostgreSQL column is filled from the local column of the same name, except three:
`host_identifier` (this host), `source_id` (the local row id) and `synced_at` (the server's
receive time, left to its default). Values are converted by the PostgreSQL type; a value that
cannot be converted rejects its row (with the column named) before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from host_agent.errors import SchemaMismatch
from host_agent.sync.pg_schema import PgColumn

Converter = Callable[[Any], Any]
LocalRow = tuple[Any, ...]  # (id, row_version, *local values in TablePlan.local_columns order)

SERVER_SIDE = frozenset({"synced_at"})
_INT_RANGES = {"int2": 2**15, "int4": 2**31, "int8": 2**63}


class RowValueError(ValueError):
    """A local value that cannot become its PostgreSQL column's value."""


def _timestamptz(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowValueError(f"expected UNIX epoch seconds, got {type(value).__name__}")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise RowValueError(f"epoch seconds out of range: {value}") from None


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
    pg_columns: tuple[str, ...]  # COPY column order
    local_columns: tuple[str, ...]  # SELECT order after id, row_version
    _sources: tuple[int, ...]  # per pg column: -1 host, else index into LocalRow
    _converters: tuple[Converter | None, ...]

    def to_record(self, row: LocalRow) -> tuple[Any, ...]:
        """The PostgreSQL record for `row`; raises RowValueError naming the bad column."""
        out: list[Any] = []
        for name, source, convert in zip(
            self.pg_columns, self._sources, self._converters, strict=True
        ):
            value = self.host if source < 0 else row[source]
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


def build_plan(
    table: str, host: str, pg_columns: Sequence[PgColumn], local_columns: Sequence[str]
) -> TablePlan:
    """Match PostgreSQL columns to local ones; raise SchemaMismatch for what cannot be filled."""
    if not pg_columns:
        raise SchemaMismatch(
            f"table {table} does not exist in PostgreSQL: run `host-agent init-db`"
        )
    local = [c for c in local_columns if c not in ("id", "row_version")]
    names = {c.name for c in pg_columns}
    for required in ("host_identifier", "source_id", "row_version"):
        if required not in names:
            raise SchemaMismatch(
                f"{table}.{required} is missing in PostgreSQL: run `host-agent init-db`"
            )
    shipped: list[str] = []
    selected: list[str] = []
    sources: list[int] = []
    converters: list[Converter | None] = []
    for column in pg_columns:
        if column.name in SERVER_SIDE:
            continue
        if column.name == "host_identifier":
            source = -1
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
        sources.append(source)
        converters.append(converter_for(column.type_name))
    return TablePlan(
        table=table,
        host=host,
        pg_columns=tuple(shipped),
        local_columns=tuple(selected),
        _sources=tuple(sources),
        _converters=tuple(converters),
    )
