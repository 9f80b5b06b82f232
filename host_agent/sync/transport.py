"""Where a sync run sends rows: one interface, two implementations.

- `postgres.sink.PostgresSink`: straight into PostgreSQL (binary COPY, upserts).
- `gateway_client.GatewayTransport`: to `host-agent gateway` over HTTPS, as bundles, for hosts
  that must not hold database credentials or live outside the network.

The engine (`engine.py`) knows only this interface: the same batching, journal, backoff,
`status` and metrics whichever way the rows travel. A transport raises `SinkError`s
(`SinkUnavailable` when retrying can help).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from host_agent.sync.records import LocalRow, Rejection, RunRecord, Selection, WriteOutcome


class Route(Protocol):
    """How one table's rows go out: what to read of each local row (a `Selection`: the
    PostgreSQL sink has SQLite compute its wire values), and how a batch of them becomes what
    the transport sends (done while the previous batch is on the wire)."""

    @property
    def table(self) -> str: ...

    @property
    def selection(self) -> Selection: ...

    def prepare(self, rows: Sequence[LocalRow]) -> tuple[Any, list[Rejection]]:
        """(the payload for `Transport.write`, rows refused before sending)."""
        ...


class Transport(Protocol):
    # How many batches may be written at once (the engine reads `max_in_flight` when a
    # transport defines it; one when it does not).

    async def open(self, *, connect_timeout: float | None = None) -> None:
        """Be ready to write (connect, check the other end); a no-op when ready."""
        ...

    async def disconnect(self) -> None:
        """Hold nothing between runs; the next call is ready again."""
        ...

    async def close(self) -> None: ...

    async def route(
        self, table: str, store_id: str, local_columns: Mapping[str, str]
    ) -> Route:
        """How rows of `table` (from store `store_id`, holding `local_columns`: name ->
        declared type) go out."""
        ...

    async def write(
        self, route: Any, payload: Any, refused_before: Sequence[Rejection]
    ) -> WriteOutcome:
        """Write one prepared batch in one transaction at the other end."""
        ...

    async def write_sync_logs(self, runs: Sequence[RunRecord], store_id: str) -> None: ...
