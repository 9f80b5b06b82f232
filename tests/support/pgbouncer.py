"""A real PgBouncer in transaction pooling mode, started by the suite in front of a test cluster.

Run as the `postgres` user when the suite runs as root (PgBouncer refuses root), from a
directory of its own under /tmp; it authenticates clients with SCRAM and logs in to the
server with the same credentials (a plain-text userlist, private to the test).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from host_agent.embedded.cluster import SERVER_USER, LocalPostgres, free_port
from support.ci import unavailable

START_TIMEOUT = 30.0


def find_pgbouncer() -> str:
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    unavailable("PgBouncer is not installed (apt-get install pgbouncer)")


class PgBouncer:
    """Listens on 127.0.0.1:`port` and pools into `server`'s databases, transaction mode."""

    def __init__(
        self,
        server: LocalPostgres,
        *,
        pool_size: int = 5,
        users: dict[str, str] | None = None,
    ) -> None:
        self.server = server
        self.pool_size = pool_size
        self.users = {SERVER_USER: server.password, **(users or {})}
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="host-agent-pgbouncer-", dir="/tmp"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, dbname: str) -> str:
        return (
            f"postgresql://{SERVER_USER}:{quote(self.server.password, safe='')}"
            f"@127.0.0.1:{self.port}/{quote(dbname, safe='')}"
        )

    def via(self, direct_url: str) -> str:
        """The same database as `direct_url` (a URL of `server`), through the pooler."""
        return self.url(direct_url.rsplit("/", 1)[1])

    def start(self) -> None:
        binary = find_pgbouncer()
        self.dir.chmod(0o755)
        userlist = self.dir / "userlist.txt"
        userlist.write_text("".join(f'"{user}" "{pw}"\n' for user, pw in self.users.items()))
        userlist.chmod(0o600)
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.server.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir = {self.dir}\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {userlist}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 2000\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
        )
        argv = [binary, str(ini)]
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            for path in (self.dir, userlist, ini):
                os.chown(path, user.pw_uid, user.pw_gid)
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        # A session of its own: stopping signals the whole group (runuser and PgBouncer).
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.dir / "pgbouncer.log"
                detail = log.read_text() if log.exists() else ""
                raise RuntimeError(f"PgBouncer did not start: {detail[-2000:]}")
            time.sleep(0.05)  # polling a port another process opens: no event to wait on

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # PgBouncer: immediate shutdown
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
            # runuser may exit before PgBouncer has: wait for the group to be gone.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)  # polling for other processes' exit: no event to wait on
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_pgbouncer(server: LocalPostgres, *, pool_size: int = 5) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(server, pool_size=pool_size)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()
