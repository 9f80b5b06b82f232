"""The sync engine's records, one type per concept, shared by its SQLite and server sides.

`Rejection` and `RunRecord` belong to the local journal (`host_agent.store.journal`) and are
re-exported here, so a rejection has one shape wherever it travels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from host_agent.store.journal import BatchRange, Rejection, RunRecord

LocalRow = tuple[Any, ...]  # (id, row_version, *local values in the plan's column order)


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


__all__ = ["BatchRange", "LocalRow", "ReadBatch", "Rejection", "RunRecord", "WriteOutcome"]
