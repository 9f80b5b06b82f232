"""A bundle's row lines are checked one by one, whatever way they are read: an id or version
that is not exactly an integer, values that are not an object, a value that is a list or an
object other than {"base64": ...}, a line without its fields: the bundle is refused naming
what is wrong. Bytes come back as bytes, and text holding braces or brackets is text.
(Real bundle bytes in memory, read by the same `read_bundle` the gateway and `import` use.)"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import orjson
import pytest

from host_agent.errors import BundleRefused
from host_agent.sync.bundle import (
    PARSE_CHUNK,
    TableSummary,
    encode_lines,
    new_meta,
    read_bundle,
    values_line,
    values_lines,
)

TABLE = "file_change_events"
COLUMNS = ["file_path", "file_size"]


def bundle(lines: list[dict[str, Any]], *, compress: bool = False) -> bytes:
    meta = new_meta("host-a")
    summary = TableSummary(str(uuid.uuid4()), COLUMNS)
    for line in lines:
        if isinstance(line.get("id"), int) and isinstance(line.get("row_version"), int):
            summary.add(line["id"], line["row_version"])
    meta.tables[TABLE] = summary
    return encode_lines(meta, [orjson.dumps(line) + b"\n" for line in lines], compress=compress)


def row(i: int, **values: Any) -> dict[str, Any]:
    return {
        "table": TABLE,
        "id": i,
        "row_version": 0,
        "values": values or {"file_path": f"/p/{i}", "file_size": i},
    }


def many(n: int) -> list[dict[str, Any]]:
    return [row(i) for i in range(1, n + 1)]


def test_plain_rows_come_back_as_written_across_chunks() -> None:
    lines = many(PARSE_CHUNK * 2 + 7)
    got = read_bundle(bundle(lines, compress=True)).rows
    assert [(r.table, r.id, r.row_version, r.values) for r in got] == [
        (line["table"], line["id"], line["row_version"], line["values"]) for line in lines
    ]


def test_bytes_come_back_as_bytes_and_braces_in_text_stay_text() -> None:
    lines = many(50)
    lines[10]["values"] = {"file_path": {"base64": "/y94"}, "file_size": 1}
    lines[20]["values"] = {"file_path": "/p/{odd}[name]", "file_size": 2}
    got = read_bundle(bundle(lines)).rows
    assert got[10].values["file_path"] == b"\xff/x"
    assert got[20].values["file_path"] == "/p/{odd}[name]"
    assert got[0].values == {"file_path": "/p/1", "file_size": 1}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("id", True, "is not a row"),
        ("id", 1.0, "is not a row"),
        ("row_version", "0", "is not a row"),
        ("row_version", False, "is not a row"),
        ("table", 7, "is not a row"),
        ("values", [1, 2], "is not a row"),
        ("values", "x", "is not a row"),
    ],
)
def test_a_field_of_the_wrong_type_refuses_the_bundle(field: str, value: Any, message: str) -> None:
    lines = many(100)
    lines[42][field] = value
    with pytest.raises(BundleRefused, match=message):
        read_bundle(bundle(lines))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2], "a list"),
        ({"other": "x"}, "base64"),
        ({"base64": "not base64!"}, "not base64"),
    ],
)
def test_a_value_that_is_not_a_value_refuses_the_bundle(value: Any, message: str) -> None:
    lines = many(100)
    lines[42]["values"] = {"file_path": value, "file_size": 1}
    with pytest.raises(BundleRefused, match=message):
        read_bundle(bundle(lines))


def test_a_line_without_its_values_refuses_the_bundle_naming_the_field() -> None:
    lines = many(100)
    del lines[42]["values"]
    with pytest.raises(BundleRefused, match="lacks 'values'"):
        read_bundle(bundle(lines))


def test_a_value_object_and_a_line_without_values_together_are_still_refused() -> None:
    """Braces counted over a chunk balance out here (one line has one too few, another one
    too many): the check must still see both lines."""
    lines = many(100)
    lines[10]["values"] = 5  # one brace fewer than a row
    lines[20]["values"] = {"file_path": {"nested": "x"}, "file_size": 1}  # one more
    with pytest.raises(BundleRefused):
        read_bundle(bundle(lines))


def test_rows_encoded_a_batch_at_once_equal_rows_encoded_one_by_one() -> None:
    rows = [(1, 0, "/p/1", 10), (2, 5, b"\xff/x", None), (3, 1, "/{a}[b]", 0)]
    assert values_lines(TABLE, COLUMNS, rows) == [
        values_line(TABLE, r[0], r[1], dict(zip(COLUMNS, r[2:], strict=True))) for r in rows
    ]


def raw_bundle(lines: list[bytes], rows: int) -> bytes:
    """A bundle of these exact lines whose header and end line are right for `rows` rows
    (ids 1 and 2, version 1), so only the lines themselves can be at fault."""
    meta = new_meta("host-a")
    summary = TableSummary(str(uuid.uuid4()), COLUMNS)
    summary.add(1, 1)
    summary.add(2, 1)
    meta.tables[TABLE] = summary
    head = orjson.dumps({"__meta__": meta.as_json()}) + b"\n"
    body = b"".join(lines)
    digest = hashlib.sha256(head + body).hexdigest()
    return head + body + orjson.dumps({"__end__": {"rows": rows, "sha256": digest}}) + b"\n"


def test_a_row_split_over_two_lines_is_refused_even_when_braces_balance() -> None:
    """Parsed as one JSON array, a row cut in two at a field reads as one object: one row a
    line is checked, so its spare braces cannot hide a bad value on another line."""
    lines = [
        b'{"table":"file_change_events","id":1\n',
        b'"row_version":1,"values":{"file_path":"{"}}\n',
        b'{"table":"file_change_events","id":2,"row_version":1,'
        b'"values":{"file_path":{"base64":"!!not b64","x":1}}}\n',
    ]
    with pytest.raises(BundleRefused, match=r"line 2 is not JSON"):
        read_bundle(raw_bundle(lines, rows=2))


def test_two_rows_on_one_line_are_refused() -> None:
    one = orjson.dumps(row(1))
    two = orjson.dumps(row(2))
    with pytest.raises(BundleRefused, match=r"not one JSON object a line|is not JSON"):
        read_bundle(raw_bundle([one + b"," + two + b"\n"], rows=2))
