"""Test certificates made with the `openssl` command line, and a PostgreSQL cluster given them.

Everything here is blocking. Keys are EC P-256 (fast to make); certificates live two days.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from host_agent.embedded.cluster import LocalPostgres
from support.ci import unavailable

SERVER_USER = "postgres"  # the user LocalPostgres runs the server as when we are root


def require_openssl() -> str:
    found = shutil.which("openssl") or shutil.which("openssl", path="/usr/bin")
    if found is None:
        unavailable("TLS tests need the openssl command line (apt-get install openssl)")
    return found


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        [require_openssl(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class KeyPair:
    key: Path
    cert: Path


def make_ca(directory: Path, name: str) -> KeyPair:
    """A self-signed certificate authority `name` (its files are `<name>.key`, `<name>.crt`)."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.key", directory / f"{name}.crt")
    _openssl(
        "req", "-x509", "-new",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "2",
        "-subj", f"/CN=host-agent test CA {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    return pair


def issue(
    directory: Path,
    name: str,
    ca: KeyPair,
    *,
    common_name: str,
    alt_names: tuple[str, ...] = (),
    client: bool = False,
) -> KeyPair:
    """A certificate `name` signed by `ca` for `common_name`, with subjectAltName entries such
    as "DNS:localhost" or "IP:127.0.0.1"; a client certificate when `client`."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.key", directory / f"{name}.crt")
    csr = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ]
    if alt_names:
        lines.append("subjectAltName=" + ",".join(alt_names))
    extensions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _openssl(
        "req", "-new",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={common_name}",
        cwd=directory,
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(pair.cert), "-days", "2",
        "-extfile", str(extensions),
        cwd=directory,
    )
    pair.key.chmod(0o600)
    return pair


def _give_to_server(pg: LocalPostgres, path: Path, mode: int) -> None:
    """`path` readable by the server: as root the server runs as `postgres` (LocalPostgres
    hands it the data directory), and it refuses a key that others may read."""
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(mode)


HBA_TLS_ONLY = """\
# Written by tests/support/tls.py: over TCP, TLS or nothing.
local all all trust
{client_cert_lines}hostssl all all 127.0.0.1/32 scram-sha-256
hostnossl all all 0.0.0.0/0 reject
"""


def serve_tls(
    pg: LocalPostgres,
    server: KeyPair,
    *,
    client_ca: KeyPair | None = None,
    client_cert_databases: tuple[str, ...] = (),
) -> None:
    """Restart `pg` with TLS on, presenting `server`, and a pg_hba.conf that refuses every TCP
    connection without TLS (so a connection that works proves TLS was used). With
    `client_ca`, client certificates signed by it are checked, and connections to
    `client_cert_databases` need one whose CN is the user name (clientcert=verify-full)."""
    for pair in (server, client_ca):
        if pair is None:
            continue
        for source, mode in ((pair.cert, 0o644), (pair.key, 0o600)):
            target = pg.pgdata / f"tls-{source.name}"
            shutil.copyfile(source, target)
            _give_to_server(pg, target, mode)
    settings = {
        "ssl": "on",
        "ssl_cert_file": str(pg.pgdata / f"tls-{server.cert.name}"),
        "ssl_key_file": str(pg.pgdata / f"tls-{server.key.name}"),
        "ssl_ca_file": "" if client_ca is None else str(pg.pgdata / f"tls-{client_ca.cert.name}"),
        "log_connections": "on",
    }
    pg.psql("".join(f"ALTER SYSTEM SET {k} = '{v}';\n" for k, v in settings.items()))
    hba = pg.pgdata / "pg_hba.conf"
    cert_lines = "".join(
        f"hostssl {db} all 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n"
        for db in client_cert_databases
    )
    hba.write_text(HBA_TLS_ONLY.format(client_cert_lines=cert_lines), encoding="utf-8")
    pg.stop()
    pg.start()
    if pg.psql("SHOW ssl;").strip() != "on":
        raise RuntimeError(f"PostgreSQL did not turn TLS on; see {pg.log_file}")
