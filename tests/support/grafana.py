"""Grafana's expansion of a PostgreSQL panel query, so tests can run dashboard SQL for real.

Grafana turns a panel's `rawSql` into the statement PostgreSQL runs in two steps, and so does
`expand` here:

1. The browser replaces template variables (`TemplateSrv.replace` with the SQL data source's
   `interpolateVariable`, packages/grafana-sql/src/datasource/SqlDatasource.ts): a variable
   that is multi-value or has "All" becomes quoted literals joined by commas (`'a','b'`), so
   SQL writes `host_identifier IN ($host)`; "All" without a custom all value is every option;
   a custom all value is inserted as it is. `${name:sqlstring}` quotes the same way. Names
   that are not variables (`$__timeFilter`) are left alone.
2. The server replaces the data source's macros (pkg/tsdb/grafana-postgresql-datasource/
   macros.go): `\\$(\\w+)\\(([^)]*)\\)`, arguments split on commas and trimmed; an unknown
   macro is an error. Implemented: `$__time`, `$__timeEpoch`, `$__timeFilter`, `$__timeFrom`,
   `$__timeTo`, `$__timeGroup` (with the pre-5.3 rule: followed by a comma it means
   `$__timeGroupAlias`), `$__timeGroupAlias`, `$__unixEpochFilter`, `$__unixEpochFrom`,
   `$__unixEpochTo` (as the data source has them without TimescaleDB). Not implemented, and
   refused rather than guessed: fill values (a third `$__timeGroup` argument), month and year
   intervals, `$__interval` (it depends on the panel's width), other variable formats.

Anything still looking like a variable or macro afterwards is an error, and so is a `$` in a
`--` comment (newer Grafana versions strip comments before expanding, older ones do not: a
query keeps the same meaning under both only without one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ALL = "$__all"  # the value Grafana stores for "All"

# public/app/features/variables/utils.ts: variableRegex
_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}", re.ASCII
)
# macros.go: sExpr
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")
_LEFTOVER = re.compile(r"\$\w|\[\[\w")
_INTERVAL = re.compile(r"^(\d+)(ms|s|m|h|d|w)$")
_INTERVAL_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ExpansionError(ValueError):
    """The query uses something Grafana would refuse, or that this expander does not do."""


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Variable:
    """A dashboard template variable, as far as interpolating it goes."""

    name: str
    query: str
    include_all: bool
    multi: bool
    all_value: str | None
    options: list[str] = field(default_factory=list)  # filled by running `query`


# --- dashboards -----------------------------------------------------------------------------


def load_dashboard(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves left out."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def variables(dashboard: Mapping[str, Any]) -> dict[str, Variable]:
    found: dict[str, Variable] = {}
    for item in dashboard.get("templating", {}).get("list", []):
        if item.get("type") != "query":
            raise ExpansionError(f"variable {item.get('name')}: only query variables are handled")
        query = item["query"]
        raw = query["rawSql"] if isinstance(query, dict) else query
        found[item["name"]] = Variable(
            name=item["name"],
            query=raw,
            include_all=bool(item.get("includeAll")),
            multi=bool(item.get("multi")),
            all_value=item.get("allValue") or None,
        )
    return found


def default_time_range(dashboard: Mapping[str, Any], now: datetime) -> TimeRange:
    """The dashboard's saved time range (`now-24h` to `now`) as absolute times."""
    time = dashboard["time"]
    return TimeRange(relative_time(time["from"], now), relative_time(time["to"], now))


def relative_time(text: str, now: datetime) -> datetime:
    """Grafana's `now` and `now-<n><unit>` (s, m, h, d, w); rounding (`now/d`) is not handled."""
    if text == "now":
        return now
    match = re.fullmatch(r"now-(\d+)([smhdw])", text)
    if not match:
        raise ExpansionError(f"time {text!r} is not expanded here")
    return now - timedelta(seconds=int(match.group(1)) * _INTERVAL_SECONDS[match.group(2)])


# --- step 1: template variables (the browser) -------------------------------------------------


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _format(value: str | list[str], fmt: str | None, variable: Variable) -> str:
    if fmt == "sqlstring":
        values = value if isinstance(value, list) else [value]
        return ",".join(_quote_literal(v) for v in values)
    if fmt is not None:
        raise ExpansionError(f"${{{variable.name}:{fmt}}}: format not expanded here")
    # SqlDatasource.interpolateVariable
    if isinstance(value, list):
        return ",".join(_quote_literal(v) for v in value)
    if variable.multi or variable.include_all:
        return _quote_literal(value)
    return value.replace("'", "''")


def interpolate_variables(
    sql: str, known: Mapping[str, Variable], selected: Mapping[str, str | list[str]]
) -> str:
    """Replace `$name`, `${name}`, `${name:fmt}` and `[[name]]` of the variables in `known`,
    with the value `selected` for each (ALL for "All"; a repeated panel's own value is a
    plain selection too)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        if match.group(5):
            raise ExpansionError(f"{match.group(0)}: field paths are not expanded here")
        variable = known.get(name)
        if variable is None:
            return match.group(0)  # a macro, or not a variable: Grafana leaves it
        value = selected[name]
        if value == ALL or (isinstance(value, list) and value[:1] == [ALL]):
            if not variable.include_all:
                raise ExpansionError(f"${name} has no All option")
            if variable.all_value is not None:
                # TemplateSrv: a custom all value is inserted unformatted.
                return interpolate_variables(variable.all_value, known, selected)
            value = list(variable.options)
        return _format(value, fmt, variable)

    return _VARIABLE.sub(replace, sql)


# --- step 2: macros (the server) --------------------------------------------------------------


def _rfc3339_nano(moment: datetime) -> str:
    """Go's time.RFC3339Nano of a UTC time: fractional seconds without trailing zeros."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def _go_float(value: float) -> str:
    """Go's %v of a float64, for the values an interval can take."""
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return repr(value)


def _interval_seconds(arg: str) -> float:
    text = arg.strip("'")
    match = _INTERVAL.match(text)
    if not match:
        raise ExpansionError(f"interval {arg!r} is not expanded here")
    return float(int(match.group(1)) * _INTERVAL_SECONDS[match.group(2)])


def _need_column(name: str, args: Sequence[str]) -> str:
    if not args or not args[0]:
        raise ExpansionError(f"missing time column argument for macro {name}")
    return args[0]


def _evaluate(name: str, args: list[str], time_range: TimeRange) -> str:
    start, end = time_range.start, time_range.end
    if name == "__time":
        return f'{_need_column(name, args)} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {_need_column(name, args)}) as "time"'
    if name == "__timeFilter":
        column = _need_column(name, args)
        return f"{column} BETWEEN '{_rfc3339_nano(start)}' AND '{_rfc3339_nano(end)}'"
    if name == "__timeFrom":
        return f"'{_rfc3339_nano(start)}'"
    if name == "__timeTo":
        return f"'{_rfc3339_nano(end)}'"
    if name == "__timeGroup":
        if len(args) < 2:
            raise ExpansionError(f"macro {name} needs time column and interval")
        if len(args) > 2:
            raise ExpansionError(f"macro {name}: fill values are not expanded here")
        seconds = _go_float(_interval_seconds(args[1]))
        return f"floor(extract(epoch from {args[0]})/{seconds})*{seconds}"
    if name == "__timeGroupAlias":
        return _evaluate("__timeGroup", args, time_range) + ' AS "time"'
    if name == "__unixEpochFilter":
        column = _need_column(name, args)
        return f"{column} >= {int(start.timestamp())} AND {column} <= {int(end.timestamp())}"
    if name == "__unixEpochFrom":
        return str(int(start.timestamp()))
    if name == "__unixEpochTo":
        return str(int(end.timestamp()))
    raise ExpansionError(f"unknown macro {name!r} (or not expanded here)")


def expand_macros(sql: str, time_range: TimeRange) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "__timeGroup":
            # macros.go: "pre 5.3 compatibility", judged at the first occurrence in the query.
            index = sql.find(match.group(0)) + len(match.group(0))
            if sql[index : index + 1] == ",":
                name = "__timeGroupAlias"
        args = [arg.strip(" ") for arg in match.group(2).split(",")]
        return _evaluate(name, args, time_range)

    return _MACRO.sub(replace, sql)


# --- both ------------------------------------------------------------------------------------


def check_comments(sql: str) -> None:
    for line in sql.splitlines():
        comment = line.partition("--")[2]
        if "$" in comment:
            raise ExpansionError(f"a $ in a comment expands differently across Grafana "
                                 f"versions: {line.strip()!r}")


def expand(
    sql: str,
    time_range: TimeRange,
    known: Mapping[str, Variable],
    selected: Mapping[str, str | list[str]],
) -> str:
    """The statement Grafana would send to PostgreSQL for `sql`."""
    check_comments(sql)
    statement = expand_macros(interpolate_variables(sql, known, selected), time_range)
    leftover = _LEFTOVER.search(statement)
    if leftover:
        rest = statement[leftover.start() : leftover.start() + 40]
        raise ExpansionError(f"not expanded: {rest!r}")
    return statement
