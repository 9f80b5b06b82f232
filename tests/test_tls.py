"""TLS to PostgreSQL through the real CLI: `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in
`database.postgres_url` are honoured; every certificate problem is exit 4 with a message naming
it; and a server without TLS under `sslmode=verify-full` is exit 4 with nothing sent in plain
text, never a quiet fallback.

The server is a cluster of the tests' own with `ssl = on`, a certificate made here by a test
CA, and a pg_hba.conf that refuses every TCP connection without TLS, so a sync that works
proved TLS was used; its log (`log_connections`) says so for each of the agent's connections.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from support.agent_process import Finished, agent_env, run_agent, write_config
from support.data import file_event, insert_file_events, insert_sessions, local_query, session
from support.pg import temporary_cluster, unique_db_name
from support.tcp_proxy import TcpProxy
from support.tls import KeyPair, issue, make_ca, serve_tls

from host_agent.embedded.cluster import LocalPostgres

CERT_DB = "certdb"  # connections to it need a client certificate (clientcert=verify-full)
SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # the client's "may we speak TLS?" packet
FILE_ROWS = 12
SESSION_ROWS = 3


@dataclass(frozen=True)
class TlsServer:
    pg: LocalPostgres
    ca: KeyPair  # signed the server's certificate (and the client's)
    other_ca: KeyPair  # unrelated
    client: KeyPair  # CN=postgres, for CERT_DB

    def url(self, db: str, host: str = "localhost", **params: str) -> str:
        query = urlencode(params, safe="/")
        return (
            f"postgresql://postgres:{quote(self.pg.password, safe='')}@{host}:{self.pg.port}"
            f"/{db}" + (f"?{query}" if query else "")
        )

    def count(self, db: str, table: str) -> int:
        return int(self.pg.psql(f"SELECT count(*) FROM {table};", db).strip())


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory, "test-ca")
    return {
        "ca": ca,
        "other_ca": make_ca(directory, "unrelated-ca"),
        "server": issue(
            directory, "server", ca, common_name="localhost",
            alt_names=("DNS:localhost", "IP:127.0.0.1"),
        ),
        "elsewhere": issue(
            directory, "elsewhere", ca, common_name="db.example.test",
            alt_names=("DNS:db.example.test",),
        ),
        "client": issue(directory, "client", ca, common_name="postgres", client=True),
    }


@pytest.fixture(scope="module")
def tls_server(
    pg_template: LocalPostgres, certificates: dict[str, KeyPair]
) -> Iterator[TlsServer]:
    """A cluster of this module's own (private_pg, for the module): TLS only over TCP."""
    with temporary_cluster(pg_template) as pg:
        pg.psql(f"CREATE DATABASE {CERT_DB};")
        serve_tls(
            pg, certificates["server"], client_ca=certificates["ca"],
            client_cert_databases=(CERT_DB,),
        )
        yield TlsServer(pg, certificates["ca"], certificates["other_ca"], certificates["client"])


@pytest.fixture
def tls_db(tls_server: TlsServer) -> Iterator[str]:
    name = unique_db_name("tls")
    tls_server.pg.psql(f"CREATE DATABASE {name};")
    try:
        yield name
    finally:
        tls_server.pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


def agent(tmp_path: Path, url: str, *args: str) -> Finished:
    """`host-agent <args>` with `url` as database.postgres_url and local files in tmp_path."""
    config = write_config(tmp_path / "config.yaml", url=url, data_dir=tmp_path / "data")
    return run_agent(config, *args, env=agent_env(), cwd=tmp_path, timeout=60)


def local_rows(tmp_path: Path) -> None:
    insert_file_events(tmp_path / "data" / "file_changes.db",
                       [file_event(i) for i in range(FILE_ROWS)])
    insert_sessions(tmp_path / "data" / "desktop_activity.db",
                    [session(i) for i in range(SESSION_ROWS)])


def unsynced(tmp_path: Path) -> int:
    [(count,)] = local_query(
        tmp_path / "data" / "file_changes.db",
        "SELECT count(*) FROM file_change_events WHERE synced_at IS NULL",
    )
    return int(count)


def one_line_error(result: Finished) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("host-agent: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def log_since(pg: LocalPostgres, offset: int) -> str:
    with pg.log_file.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode("utf-8", "replace")


# --- the right certificate ------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_verify_full_with_the_right_ca_ships_rows_over_tls(
    tls_server: TlsServer, tls_db: str, tmp_path: Path, host: str
) -> None:
    url = tls_server.url(tls_db, host, sslmode="verify-full",
                         sslrootcert=str(tls_server.ca.cert))
    local_rows(tmp_path)
    log_offset = tls_server.pg.log_file.stat().st_size

    init = agent(tmp_path, url, "init-db")
    assert init.returncode == 0, init.stderr
    synced = agent(tmp_path, url, "sync", "--once")
    assert synced.returncode == 0, synced.stderr

    assert tls_server.count(tls_db, "file_change_events") == FILE_ROWS
    assert tls_server.count(tls_db, "desktop_activity_sessions") == SESSION_ROWS
    assert unsynced(tmp_path) == 0
    # Every connection the agent opened was a TLS one (the server logs each); the test's own
    # psql comes over the unix socket.
    authorized = [
        line for line in log_since(tls_server.pg, log_offset).splitlines()
        if "connection authorized" in line and "application_name=host-agent" in line
    ]
    assert len(authorized) >= 2, "init-db and sync each connect"
    assert all(f"database={tls_db}" in line for line in authorized), authorized
    assert all("SSL enabled (protocol=TLSv1" in line for line in authorized), authorized


def test_the_server_refuses_a_plain_text_connection(
    tls_server: TlsServer, tls_db: str, tmp_path: Path
) -> None:
    """The control for the test above: this server lets nothing in without TLS."""
    result = agent(tmp_path, tls_server.url(tls_db, sslmode="disable"), "init-db")
    assert result.returncode == 4, result.stderr
    assert "no encryption" in one_line_error(result)


# --- certificate problems: exit 4, naming the problem ----------------------------------------


def test_a_certificate_from_an_unknown_ca_is_exit_4_naming_it(
    tls_server: TlsServer, tls_db: str, tmp_path: Path
) -> None:
    good = tls_server.url(tls_db, sslmode="verify-full", sslrootcert=str(tls_server.ca.cert))
    assert agent(tmp_path, good, "init-db").returncode == 0
    local_rows(tmp_path)
    wrong = tls_server.url(
        tls_db, sslmode="verify-full", sslrootcert=str(tls_server.other_ca.cert)
    )

    result = agent(tmp_path, wrong, "sync", "--once")

    assert result.returncode == 4, result.stdout + result.stderr
    line = one_line_error(result)
    assert "TLS certificate was not accepted" in line
    assert "certificate in certificate chain" in line  # OpenSSL's reason, as it says it
    assert "sslrootcert" in line
    assert tls_server.count(tls_db, "file_change_events") == 0
    assert unsynced(tmp_path) == FILE_ROWS


def test_a_certificate_for_another_host_name_is_exit_4_naming_the_mismatch(
    private_pg: LocalPostgres, certificates: dict[str, KeyPair], tmp_path: Path
) -> None:
    """The server presents a certificate of the right CA, but for db.example.test."""
    name = unique_db_name("tls")
    private_pg.psql(f"CREATE DATABASE {name};")
    serve_tls(private_pg, certificates["elsewhere"])
    server = TlsServer(private_pg, certificates["ca"], certificates["other_ca"],
                       certificates["client"])
    root = str(certificates["ca"].cert)

    by_name = agent(tmp_path, server.url(name, "localhost", sslmode="verify-full",
                                         sslrootcert=root), "init-db")
    by_address = agent(tmp_path, server.url(name, "127.0.0.1", sslmode="verify-full",
                                            sslrootcert=root), "init-db")

    assert by_name.returncode == 4, by_name.stderr
    assert "Hostname mismatch, certificate is not valid for 'localhost'" in one_line_error(
        by_name
    )
    assert by_address.returncode == 4, by_address.stderr
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in one_line_error(
        by_address
    )
    assert private_pg.psql("SELECT to_regclass('schema_version') IS NULL;", name).strip() == "t"
    # The chain itself is good: without the host name check the same server is accepted.
    chain_only = agent(tmp_path, server.url(name, "localhost", sslmode="verify-ca",
                                            sslrootcert=root), "init-db")
    assert chain_only.returncode == 0, chain_only.stderr


# --- a server without TLS ---------------------------------------------------------------------


def test_verify_full_against_a_server_without_tls_is_exit_4_and_sends_nothing_in_plain_text(
    pg_server: LocalPostgres, pg_database: str, certificates: dict[str, KeyPair],
    tmp_path: Path,
) -> None:
    assert pg_server.psql("SHOW ssl;").strip() == "off"
    db = pg_database.rsplit("/", 1)[1]
    server = TlsServer(pg_server, certificates["ca"], certificates["other_ca"],
                       certificates["client"])
    root = str(certificates["ca"].cert)
    local_rows(tmp_path)

    def through(proxy: TcpProxy, **params: str) -> str:
        return server.url(db, "127.0.0.1", **params).replace(
            f":{pg_server.port}/", f":{proxy.port}/"
        )

    # A recording proxy sees every byte the agent sends toward the server.
    with TcpProxy("127.0.0.1", pg_server.port, record=True) as proxy:
        init = agent(tmp_path, through(proxy, sslmode="verify-full", sslrootcert=root),
                     "init-db")
        assert init.returncode == 4, init.stdout + init.stderr
        line = one_line_error(init)
        assert "does not offer TLS" in line and "nothing was sent in plain text" in line
        assert proxy.accepted_count >= 1
        # Only "may we speak TLS?" went out, once per connection attempt: no startup packet
        # (user, database), no password exchange, no SQL.
        assert proxy.client_stream == SSL_REQUEST * proxy.accepted_count
    assert pg_server.psql("SELECT to_regclass('schema_version') IS NULL;", db).strip() == "t"

    # The control: with sslmode=prefer the same agent falls back to plain text, and the
    # proxy sees the startup packet; so the silence above was the agent's doing.
    with TcpProxy("127.0.0.1", pg_server.port, record=True) as proxy:
        assert agent(tmp_path, through(proxy, sslmode="prefer"), "init-db").returncode == 0
        assert b"user\x00postgres\x00" in proxy.client_stream

    # With the schema there, a sync under verify-full refuses just the same; rows stay local.
    with TcpProxy("127.0.0.1", pg_server.port, record=True) as proxy:
        result = agent(tmp_path, through(proxy, sslmode="verify-full", sslrootcert=root),
                       "sync", "--once")
        assert result.returncode == 4, result.stdout + result.stderr
        assert "does not offer TLS" in one_line_error(result)
        assert proxy.client_stream == SSL_REQUEST * proxy.accepted_count
    assert pg_server.psql("SELECT count(*) FROM file_change_events;", db).strip() == "0"
    assert unsynced(tmp_path) == FILE_ROWS


# --- client certificates -------------------------------------------------------------------


def test_client_certificate_from_the_url_is_presented(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    root = str(tls_server.ca.cert)
    with_cert = tls_server.url(
        CERT_DB, sslmode="verify-full", sslrootcert=root,
        sslcert=str(tls_server.client.cert), sslkey=str(tls_server.client.key),
    )
    without = tls_server.url(CERT_DB, sslmode="verify-full", sslrootcert=root)
    local_rows(tmp_path)

    refused = agent(tmp_path, without, "init-db")
    assert refused.returncode == 4, refused.stderr
    assert "requires a valid client certificate" in one_line_error(refused)

    assert agent(tmp_path, with_cert, "init-db").returncode == 0
    synced = agent(tmp_path, with_cert, "sync", "--once")
    assert synced.returncode == 0, synced.stderr
    assert tls_server.count(CERT_DB, "file_change_events") == FILE_ROWS
