"""GatewayTransport: a sync run's rows to `host-agent gateway` over HTTPS, as bundles.

Each batch travels as one zstd-compressed bundle (`sync/bundle.py`, the same format as
`host-agent export`) in a `POST /v1/bundles` with the host's token; the answer is the receipt:
rows written and rows refused, which the engine marks and quarantines exactly as after a direct
write. A batch sent again after a lost answer is harmless (rows are upserted by version; a
bundle the gateway applied already answers with its first receipt). Runs for `sync_logs` go by
`POST /v1/runs`; `host-agent verify`'s range digests by `POST /v1/verify/ranges`.

What the gateway says, and what the engine makes of it:
  200 receipt                        written and refused rows
  401, 403 (unknown token, a token   SinkAuthFailed: exit 4, not retried
           of another host)
  413 (a body over its limit)        SinkError naming data_sync.batch_max_bytes
  422 (its database lacks a table)   SchemaMismatch: exit 5
  503 + Retry-After, 5xx, no answer  SinkUnavailable(retry_after): backoff, never sooner than asked
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from host_agent.errors import (
    HostAgentError,
    SchemaMismatch,
    SinkAuthFailed,
    SinkError,
    SinkUnavailable,
)
from host_agent.store.digests import Probe
from host_agent.sync.bundle import TableSummary, encode_lines, new_meta, values_lines
from host_agent.sync.records import LocalRow, Rejection, RunRecord, Selection, WriteOutcome
from host_agent.sync.verify import RangeAnswer, decode_answer, encode_request

BUNDLE_TYPE = "application/vnd.host-agent.bundle+zstd"
BOOKKEEPING = frozenset({"id", "row_version", "synced_at"})


@dataclass(frozen=True)
class GatewayRoute:
    """A table's rows as bundles: every local data column goes; the gateway maps them onto
    the server's columns with the same rules as a direct sync."""

    table: str
    local_columns: tuple[str, ...]
    host: str
    store_id: str

    @property
    def selection(self) -> Selection:
        return Selection.plain(self.local_columns)

    def prepare(self, rows: Sequence[LocalRow]) -> tuple[bytes, list[Rejection]]:
        meta = new_meta(self.host)
        columns, table = self.local_columns, self.table
        lines = values_lines(table, columns, rows)
        if rows:
            ids = [r[0] for r in rows]
            versions = [r[1] for r in rows]
            meta.tables[table] = TableSummary(
                self.store_id, list(columns), len(rows), min(ids), max(ids),
                min(versions), max(versions),
            )  # fmt: skip
        return encode_lines(meta, lines, compress=True), []


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    text = response.headers.get("Retry-After")
    try:
        return max(0.0, float(text)) if text is not None else None
    except ValueError:
        return None


class GatewayTransport:
    """Lifecycle as the sink's: `open()` -> writes -> `close()`; `disconnect()` drops the HTTP
    session between runs. The token is sent only as an Authorization header and never shown.
    Two batches may be on the wire at once: the gateway parses one while the database writes
    the other."""

    max_in_flight = 2

    def __init__(
        self,
        url: str,
        token: str,
        host: str,
        *,
        ca_file: str | None = None,
        connect_timeout: float = 10.0,
        command_timeout: float = 120.0,
    ) -> None:
        self._url = url.rstrip("/")
        self._token = token
        self.host = host
        self._ca_file = ca_file
        self.connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._session: aiohttp.ClientSession | None = None
        self._checked = False  # the gateway answered /v1/hello for this token
        self._closed = False
        self.exchanged_bytes = 0  # request and answer bodies of verify's calls

    def __repr__(self) -> str:  # never the token
        return f"GatewayTransport(url={self._url!r}, host={self.host!r})"

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self._url.startswith("https://"):
            return False
        return ssl.create_default_context(cafile=self._ca_file)

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise SinkError("GatewayTransport is closed")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.connect_timeout, sock_read=self._command_timeout
                ),
                connector=aiohttp.TCPConnector(ssl=self._ssl()),
            )
        return self._session

    async def _call(
        self, method: str, path: str, *, data: bytes | None = None, json_body: Any = None,
        content_type: str | None = None, connect_timeout: float | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        body = await self._call_raw(method, path, data=data, json_body=json_body,
                                    content_type=content_type, connect_timeout=connect_timeout)
        try:
            answer: dict[str, Any] = json.loads(body)
        except ValueError as exc:
            self._checked = False
            raise SinkUnavailable(f"gateway unreachable: {type(exc).__name__}: {exc}") from None
        return answer

    async def _call_raw(
        self, method: str, path: str, *, data: bytes | None = None, json_body: Any = None,
        content_type: str | None = None, connect_timeout: float | None = None,
    ) -> bytes:  # fmt: skip
        """The answer's body when the status is 200; else the error the status means."""
        headers = {"Content-Type": content_type} if content_type else {}
        timeout = None
        if connect_timeout is not None:
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=max(0.1, min(self.connect_timeout, connect_timeout)),
                sock_read=self._command_timeout,
            )
        try:
            async with self._client().request(
                method, self._url + path, data=data, json=json_body, headers=headers,
                timeout=timeout,
            ) as response:  # fmt: skip
                body = await response.read()
                if response.status == 200:
                    return body
                raise self._refusal(response, body.decode("utf-8", "replace"))
        except HostAgentError:
            raise
        except aiohttp.ClientConnectorCertificateError as exc:
            cause = exc.certificate_error
            reason = getattr(cause, "verify_message", None) or str(cause)
            raise SinkAuthFailed(
                f"the gateway's TLS certificate was not accepted: {reason} "
                "(check gateway.ca_file and the host name in gateway.url)"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            self._checked = False
            raise SinkUnavailable(
                f"gateway unreachable: {type(exc).__name__}: {exc}".rstrip(": ")
            ) from None

    def _refusal(self, response: aiohttp.ClientResponse, text: str) -> SinkError:
        try:
            reason = str(json.loads(text).get("error", text))
        except (ValueError, AttributeError):
            reason = text.strip()[:200]
        status = response.status
        if status in (401, 403):
            return SinkAuthFailed(f"the gateway refused this host's token ({status}): {reason}")
        if status == 413:
            return SinkError(
                f"the gateway refused a batch as too large (413): {reason}; lower "
                "data_sync.batch_max_bytes below its limit"
            )
        if status == 422:
            return SchemaMismatch(f"the gateway's database cannot take the rows: {reason}")
        if status >= 500:
            return SinkUnavailable(
                f"the gateway is unavailable ({status}): {reason}",
                retry_after=_retry_after(response),
            )
        return SinkError(f"the gateway refused the request ({status}): {reason}")

    # --- Transport ------------------------------------------------------------------------------

    async def open(self, *, connect_timeout: float | None = None) -> None:
        """Check (once per run) that the gateway answers and knows this host's token."""
        if self._checked:
            return
        answer = await self._call("GET", "/v1/hello", connect_timeout=connect_timeout)
        if answer.get("host_identifier") != self.host:
            raise SinkAuthFailed(
                f"this token belongs to host {answer.get('host_identifier')!r}, and this "
                f"agent's host_identifier is {self.host!r}"
            )
        self._checked = True

    async def disconnect(self) -> None:
        self._checked = False
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def close(self) -> None:
        self._closed = True
        await self.disconnect()

    async def route(
        self, table: str, store_id: str, local_columns: Mapping[str, str]
    ) -> GatewayRoute:
        columns = tuple(c for c in local_columns if c not in BOOKKEEPING)
        return GatewayRoute(table, columns, self.host, store_id)

    async def write(
        self, route: GatewayRoute, payload: bytes, refused_before: Sequence[Rejection]
    ) -> WriteOutcome:
        answer = await self._call("POST", "/v1/bundles", data=payload, content_type=BUNDLE_TYPE)
        part = answer["receipt"]["tables"].get(route.table, {})
        rejected = [
            Rejection(int(r["id"]), int(r["row_version"]), str(r["reason"]))
            for r in part.get("rejected", [])
        ]
        return WriteOutcome(
            written=int(part.get("written", 0)), rejected=[*refused_before, *rejected]
        )

    async def write_sync_logs(self, runs: Sequence[RunRecord], store_id: str) -> None:
        if runs:
            await self._call(
                "POST",
                "/v1/runs",
                json_body={"store_id": store_id, "runs": [run.__dict__ for run in runs]},
            )

    async def verify_ranges(
        self,
        table: str,
        store_id: str,
        probes: Sequence[Probe],
        ranges: Sequence[tuple[int, int]],
    ) -> RangeAnswer:
        """`host-agent verify`'s call: `POST /v1/verify/ranges` (the host is the token's)."""
        body = encode_request(table, store_id, probes, ranges)
        answer = await self._call_raw("POST", "/v1/verify/ranges", data=body,
                                      content_type="application/json")  # fmt: skip
        self.exchanged_bytes += len(body) + len(answer)
        try:
            return decode_answer(answer, probes, ranges)
        except (ValueError, KeyError, TypeError) as exc:
            raise SinkError(f"the gateway's verify answer is not understood: {exc}") from None
