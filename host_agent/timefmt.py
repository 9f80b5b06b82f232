"""UNIX epoch seconds as the ISO 8601 text stored beside them and shown to people (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


@overload
def iso(epoch: float) -> str: ...
@overload
def iso(epoch: None) -> None: ...
@overload
def iso(epoch: float | None) -> str | None: ...


def iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()
