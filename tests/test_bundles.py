"""Carrying rows by hand: export -> import -> ack, through the real CLI, a real PostgreSQL and
real files; damaged bundles and foreign receipts are refused before anything changes."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from support.agent_process import agent_env, run_agent, write_config
from support.data import (
    file_event,
    insert_file_events,
    insert_sessions,
    local_query,
    pg_fetch_sync,
    session,
)


def unsynced(db: Path, table: str) -> int:
    return int(local_query(db, f"SELECT count(*) FROM {table} WHERE synced_at IS NULL")[0][0])


def server_rows(url: str, table: str) -> list[tuple[int, int]]:
    rows = pg_fetch_sync(url, f"SELECT source_id, row_version FROM {table} ORDER BY source_id")
    return [(r["source_id"], r["row_version"]) for r in rows]


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path]:
    """(config of a host with no server, its data directory), holding rows of both tables."""
    data = tmp_path / "host"
    insert_file_events(data / "file_changes.db", [file_event(i) for i in range(40)])
    insert_sessions(data / "desktop_activity.db", [session(i) for i in range(6)])
    config = write_config(tmp_path / "host.yaml", url=None, data_dir=data, host="air-gapped")
    return config, data


def test_export_import_ack_round_trip_ships_every_row_once(
    tmp_path: Path, schema_url: str, host: tuple[Path, Path]
) -> None:
    config, data = host
    files, desktop = data / "file_changes.db", data / "desktop_activity.db"
    bundle = tmp_path / "stick" / "rows.jsonl.zst"
    bundle.parent.mkdir()
    exported = run_agent(config, "export", "--out", str(bundle), env=agent_env(), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "file_change_events: 40 row(s)" in exported.stdout
    assert "desktop_activity_sessions: 6 row(s)" in exported.stdout
    assert bundle.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd
    assert unsynced(files, "file_change_events") == 40  # exported is not shipped
    # A row changed after the export: its new version was not carried.
    with sqlite3.connect(files) as conn:
        conn.execute("UPDATE file_change_events SET file_size = 7 WHERE id = 3")

    importer = write_config(tmp_path / "server.yaml", url=schema_url, data_dir=tmp_path / "srv")
    imported = run_agent(importer, "import", str(bundle), env=agent_env(), cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert "imported (bundle" in imported.stdout and "46 row(s) written" in imported.stdout
    receipt = bundle.with_name(bundle.name + ".receipt.json")
    assert json.loads(receipt.read_text())["receipt"]["tables"]["file_change_events"]["rows"] == 40
    assert len(server_rows(schema_url, "file_change_events")) == 40
    assert len(server_rows(schema_url, "desktop_activity_sessions")) == 6
    logs = pg_fetch_sync(schema_url, "SELECT table_name, records_synced FROM sync_logs")
    assert {(r["table_name"], r["records_synced"]) for r in logs} == {
        ("file_change_events", 40), ("desktop_activity_sessions", 6)
    }

    again = run_agent(importer, "import", str(bundle), env=agent_env(), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already imported" in again.stdout
    assert len(server_rows(schema_url, "file_change_events")) == 40
    assert len(pg_fetch_sync(schema_url, "SELECT 1 FROM sync_logs")) == 2

    acked = run_agent(config, "ack", str(receipt), env=agent_env(), cwd=tmp_path)
    assert acked.returncode == 0, acked.stderr
    assert "file_change_events: 39 row(s) marked synced" in acked.stdout
    assert unsynced(files, "file_change_events") == 1  # the row changed after the export
    assert unsynced(desktop, "desktop_activity_sessions") == 0
    acked_again = run_agent(config, "ack", str(receipt), env=agent_env(), cwd=tmp_path)
    assert "file_change_events: 0 row(s) marked synced" in acked_again.stdout

    # The changed row goes by the next export (or a direct sync), newest wins.
    second = tmp_path / "stick" / "more.jsonl"
    assert run_agent(config, "export", "--out", str(second), env=agent_env(),
                     cwd=tmp_path).returncode == 0  # fmt: skip
    assert run_agent(importer, "import", str(second), env=agent_env(),
                     cwd=tmp_path).returncode == 0  # fmt: skip
    version = dict(server_rows(schema_url, "file_change_events"))[3]
    assert version > 0
    assert len(server_rows(schema_url, "file_change_events")) == 40


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda ls: [ls[0], ls[1], ls[2].replace(b'"row_version":0', b'"row_version":1'),
                     *ls[3:]],
         "SHA-256 or row count in the end line does not match"),
        (lambda ls: ls[:-1], "no end line: it is truncated"),
        (lambda ls: [*ls[:-1], ls[-1][:-9]], "cut short: the bundle is truncated"),
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "altered, reordered or damaged"),
    ],
    ids=["flipped-byte", "truncated-end", "truncated-mid-line", "reordered"],
)
def test_a_damaged_bundle_is_refused_and_nothing_is_written(
    tmp_path: Path, schema_url: str, host: tuple[Path, Path], damage: object, says: str
) -> None:
    config, _ = host
    bundle = tmp_path / "rows.jsonl"
    assert run_agent(config, "export", "--out", str(bundle), env=agent_env(),
                     cwd=tmp_path).returncode == 0  # fmt: skip
    bundle.write_bytes(b"".join(damage(_lines(bundle))))  # type: ignore[operator]
    importer = write_config(tmp_path / "server.yaml", url=schema_url, data_dir=tmp_path / "srv")
    result = run_agent(importer, "import", str(bundle), env=agent_env(), cwd=tmp_path)
    assert result.returncode == 12, result.stderr
    assert says in result.stderr and str(bundle) in result.stderr
    assert server_rows(schema_url, "file_change_events") == []
    assert pg_fetch_sync(schema_url, "SELECT 1 FROM imported_bundles") == []
    assert not bundle.with_name(bundle.name + ".receipt.json").exists()


def test_a_receipt_of_another_store_or_an_unknown_bundle_marks_nothing(
    tmp_path: Path, schema_url: str, host: tuple[Path, Path]
) -> None:
    config, data = host
    other_data = tmp_path / "other"
    insert_file_events(other_data / "file_changes.db", [file_event(i) for i in range(5)])
    other = write_config(tmp_path / "other.yaml", url=None, data_dir=other_data, host="air-gapped")
    bundle = tmp_path / "other.jsonl"
    assert run_agent(other, "export", "--out", str(bundle), "--table", "file_change_events",
                     env=agent_env(), cwd=tmp_path).returncode == 0  # fmt: skip
    importer = write_config(tmp_path / "server.yaml", url=schema_url, data_dir=tmp_path / "srv")
    assert run_agent(importer, "import", str(bundle), env=agent_env(),
                     cwd=tmp_path).returncode == 0  # fmt: skip
    receipt = bundle.with_name(bundle.name + ".receipt.json")

    # Another store's receipt (same host_identifier, other local files).
    foreign = run_agent(config, "ack", str(receipt), env=agent_env(), cwd=tmp_path)
    assert foreign.returncode == 12, foreign.stderr
    assert "this host's store is" in foreign.stderr
    # A receipt made to look like this store's, for a bundle it never exported.
    [(own_store,)] = local_query(data / "file_changes.db", "SELECT store_id FROM store_identity")
    forged = json.loads(receipt.read_text())
    forged["receipt"]["tables"]["file_change_events"]["store_id"] = own_store
    receipt.write_text(json.dumps(forged))
    unknown = run_agent(config, "ack", str(receipt), env=agent_env(), cwd=tmp_path)
    assert unknown.returncode == 12, unknown.stderr
    assert "never exported bundle" in unknown.stderr
    assert unsynced(data / "file_changes.db", "file_change_events") == 40
