"""The schema stays Citus-compatible, read from the live catalog after `host-agent init-db`:
every unique key and primary key of the distributed tables (and of each of their partitions)
includes the distribution column `host_identifier`, the partition key of each event table is
part of its identity key, and docs/SCALING.md says how to distribute exactly these tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent_process import agent_env, run_agent, write_config
from support.data import pg_fetch_sync
from support.pg import unique_db_name

from host_agent.embedded.cluster import LocalPostgres

DISTRIBUTION_COLUMN = "host_identifier"
DISTRIBUTED = (
    "desktop_activity_sessions",
    "file_change_events",
    "sync_logs",
    "imported_bundles",
    "schema_changes",
)
EVENT_TABLES = ("desktop_activity_sessions", "file_change_events")
SCALING = Path(__file__).resolve().parents[1] / "docs" / "SCALING.md"
CITUS_HEADING = "## Past one server: Citus"


@pytest.fixture(scope="module")
def initialized(
    pg_server: LocalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A database after `host-agent init-db` (read-only for the tests here)."""
    tmp = tmp_path_factory.mktemp("citus")
    name = unique_db_name("citus")
    url = pg_server.create_database(name)
    try:
        config = write_config(tmp / "config.yaml", url=url, data_dir=tmp / "data")
        result = run_agent(config, "init-db", env=agent_env(), cwd=tmp)
        assert result.returncode == 0, result.stderr
        yield url
    finally:
        pg_server.drop_database(name)


def unique_keys(url: str, table: str) -> list[tuple[str, str, list[str]]]:
    """(relation, index, columns) of every unique index (primary keys included) on `table`
    and on every partition under it."""
    rows = pg_fetch_sync(
        url,
        """
        WITH rels AS (
            SELECT relid FROM pg_partition_tree($1::regclass)
            UNION SELECT $1::regclass
        )
        SELECT i.indrelid::regclass::text AS rel, i.indexrelid::regclass::text AS idx,
               array_agg(coalesce(a.attname::text, '<expression>') ORDER BY k.ord) AS cols
          FROM pg_index i
          JOIN rels ON rels.relid = i.indrelid
         CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indisunique OR i.indisprimary
         GROUP BY 1, 2
        """,
        table,
    )
    return [(r["rel"], r["idx"], list(r["cols"])) for r in rows]


@pytest.mark.parametrize("table", DISTRIBUTED)
def test_every_unique_key_of_a_distributed_table_includes_the_distribution_column(
    initialized: str, table: str
) -> None:
    keys = unique_keys(initialized, table)
    assert any(rel == table for rel, _, _ in keys), f"{table} has no unique key at all"
    lacking = [(rel, idx, cols) for rel, idx, cols in keys if DISTRIBUTION_COLUMN not in cols]
    assert lacking == []
    constraints = pg_fetch_sync(
        initialized,
        """
        SELECT c.conrelid::regclass::text AS rel, c.conname::text AS name, c.contype::text AS t,
               array(SELECT a.attname::text FROM unnest(c.conkey) AS k(n)
                       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n)
                   AS cols,
               c.confrelid::regclass::text AS refers
          FROM pg_constraint c
         WHERE c.conrelid IN (SELECT relid FROM pg_partition_tree($1::regclass)
                              UNION SELECT $1::regclass)
           AND c.contype IN ('p', 'u', 'x', 'f')
        """,
        table,
    )
    for row in constraints:
        if row["t"] == "f" and row["refers"] in ("schema_version", "host_agent_hosts"):
            continue  # a reference table: any key will do
        assert DISTRIBUTION_COLUMN in row["cols"], dict(row)


@pytest.mark.parametrize("table", EVENT_TABLES)
def test_the_partition_key_of_an_event_table_is_part_of_its_identity_key(
    initialized: str, table: str
) -> None:
    [part] = pg_fetch_sync(
        initialized,
        "SELECT array(SELECT a.attname::text FROM unnest(p.partattrs::int2[]) AS k(n) "
        "JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = k.n) AS cols "
        "FROM pg_partitioned_table p WHERE p.partrelid = $1::regclass",
        table,
    )
    [partition_key] = part["cols"]
    identity = [
        cols for rel, _, cols in unique_keys(initialized, table)
        if rel == table and {"host_identifier", "store_id", "source_id"} <= set(cols)
    ]
    assert identity == [["host_identifier", "store_id", "source_id", partition_key]]


def citus_section() -> str:
    assert SCALING.is_file(), "docs/SCALING.md is missing"
    text = SCALING.read_text(encoding="utf-8")
    assert CITUS_HEADING in text.splitlines(), f"docs/SCALING.md lacks '{CITUS_HEADING}'"
    section = text.split(CITUS_HEADING + "\n", 1)[1]
    return re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]


def test_scaling_doc_names_host_identifier_and_places_every_table(initialized: str) -> None:
    section = citus_section()
    assert f"distribution column is **`{DISTRIBUTION_COLUMN}`**" in section
    distributed = dict(
        re.findall(r"create_distributed_table\('(\w+)', '(\w+)'\)", section)
    )
    assert distributed == dict.fromkeys(DISTRIBUTED, DISTRIBUTION_COLUMN)
    reference = set(re.findall(r"create_reference_table\('(\w+)'\)", section))
    # Every table init-db makes (partitions aside) is either distributed or a reference table.
    tables = pg_fetch_sync(
        initialized,
        "SELECT c.relname::text AS name FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
    )
    assert {r["name"] for r in tables} == set(distributed) | reference
    assert set(distributed).isdisjoint(reference)
    for table in reference:  # a reference table needs no distribution column
        assert table not in DISTRIBUTED
    for caveat in ("Citus 11", "coordinator"):
        assert caveat in section, caveat
