"""The sync engine's records, one type per concept, shared by its SQLite and server sides.

`Rejection` and `RunRecord` belong to the local journal (`host_agent.store.journal`) and are
re-exported here, so a rejection has one shape wherever it travels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from host_agent.store.journal import BatchRange, Rejection, RunRecord

# A row as a read returns it: the values its `Selection` lays out, then the size of its
# values in bytes (which bounds a batch's memory).
LocalRow = tuple[Any, ...]


@dataclass(frozen=True)
class Selection:
    """What a read of a local table returns for each row, decided by the route that ships it:
    `expressions` (SQL over the table, alias `t`; `?` placeholders take `params`, bound before
    the keyset parameters), named by `names` for messages. `row[id_at]` is the row's id,
    `row[version_at]` its row_version; the values of `sized` columns count towards a batch's
    byte budget, and their size is appended to every row."""

    expressions: tuple[str, ...]
    names: tuple[str, ...]
    sized: tuple[str, ...]
    params: tuple[Any, ...] = ()
    id_at: int = 0
    version_at: int = 1

    @classmethod
    def plain(cls, local_columns: tuple[str, ...]) -> Selection:
        """(id, row_version, *local_columns) as they are stored."""
        return cls(
            expressions=("t.id", "t.row_version", *(f"t.{c}" for c in local_columns)),
            names=("id", "row_version", *local_columns),
            sized=local_columns,
        )


@dataclass(frozen=True)
class ReadBatch:
    """Rows read from a local table for one server transaction."""

    rows: list[LocalRow]
    span: BatchRange  # what marking covers once the server committed
    undecodable: list[Rejection]  # rows whose text is not UTF-8, refused before sending


@dataclass
class WriteOutcome:
    """What the server did with a batch: rows written now, and rows refused."""

    written: int = 0
    rejected: list[Rejection] = field(default_factory=list)


__all__ = [
    "BatchRange",
    "LocalRow",
    "ReadBatch",
    "Rejection",
    "RunRecord",
    "Selection",
    "WriteOutcome",
]
