"""A private PostgreSQL cluster under one directory, listening on 127.0.0.1 only.

Used by the test suite and by `scripts/run.sh` (embedded server for users who configured
none). Everything here blocks; never call it from an event loop.

Layout of `base_dir`:
    pgdata/            the cluster; also holds the unix socket (trust auth, owner only)
    credentials.json   {"port": ..., "password": ...}, mode 0600
    postgres.log       server log (pg_ctl -l)

The `postgres` superuser authenticates with scram-sha-256 over TCP. The password is sent to
the server only as a SCRAM verifier computed here, so the plain text never appears in a
process list, a server log or an error message.
`host-agent local-postgres url|status|stop|start --dir DIR` drives it from a shell.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final
from urllib.parse import quote

from host_agent.errors import EmbeddedPostgresError
from host_agent.scram import scram_verifier

__all__ = ["LocalPostgres", "LocalPostgresError", "find_bin_dir", "free_port"]

SERVER_USER: Final = "postgres"
_PG_ROOT: Final = Path("/usr/lib/postgresql")
_MISSING_BINARIES: Final = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found; "
    "install postgresql or set HOST_AGENT_PG_BIN"
)
# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107
_STOP_MODES: Final = frozenset({"smart", "fast", "immediate"})
_BIND_ATTEMPTS: Final = 3
_QUICK_TIMEOUT: Final = 30.0


# The cluster's failures are the error tree's EmbeddedPostgresError (exit 1); the old name stays
# for readers of this module.
LocalPostgresError = EmbeddedPostgresError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_bin_dir() -> Path:
    """Where initdb and pg_ctl live; raises LocalPostgresError when there are none."""
    override = os.environ.get("HOST_AGENT_PG_BIN")
    if override:
        path = Path(override)
        if _has_server_binaries(path):
            return path
        raise LocalPostgresError(
            f"HOST_AGENT_PG_BIN={override} does not contain initdb and pg_ctl"
        )
    versions: list[tuple[int, Path]] = []
    with contextlib.suppress(OSError):
        for child in _PG_ROOT.iterdir():
            if child.name.isdigit() and _has_server_binaries(child / "bin"):
                versions.append((int(child.name), child / "bin"))
    if versions:
        return max(versions)[1]
    initdb = shutil.which("initdb")
    if initdb is not None:
        path = Path(initdb).resolve().parent
        if _has_server_binaries(path):
            return path
    raise LocalPostgresError(_MISSING_BINARIES)


def _has_server_binaries(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in ("initdb", "pg_ctl"))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _conninfo_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class LocalPostgres:
    """A PostgreSQL cluster under base_dir, listening on 127.0.0.1 only."""

    def __init__(
        self, base_dir: Path, *, port: int | None = None, bin_dir: Path | None = None
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.pgdata = self.base_dir / "pgdata"
        self.log_file = self.base_dir / "postgres.log"
        self.credentials_file = self.base_dir / "credentials.json"
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_bin_dir()
        if not _has_server_binaries(self.bin_dir):
            raise LocalPostgresError(_MISSING_BINARIES)
        self._pinned_port = port
        self._port: int | None = None
        self._password: str | None = None
        # initdb, pg_ctl and postgres refuse to run as root, so root delegates to the
        # postgres system user and hands it the data directory.
        self._server_user: pwd.struct_passwd | None = None
        self._runuser: str | None = None
        if os.geteuid() == 0:
            try:
                self._server_user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise LocalPostgresError(
                    f"running as root needs a '{SERVER_USER}' system user to own the cluster"
                ) from None
            self._runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin")
            if self._runuser is None:
                raise LocalPostgresError("running as root needs runuser (util-linux)")

    def __repr__(self) -> str:
        return f"LocalPostgres(base_dir={str(self.base_dir)!r}, port={self._port})"

    # --- credentials -------------------------------------------------------------------

    @property
    def port(self) -> int:
        self._load_credentials()
        assert self._port is not None
        return self._port

    @property
    def password(self) -> str:
        self._load_credentials()
        assert self._password is not None
        return self._password

    def url(self, dbname: str = "postgres") -> str:
        return (
            f"postgresql://{SERVER_USER}:{quote(self.password, safe='')}"
            f"@127.0.0.1:{self.port}/{quote(dbname, safe='')}"
        )

    def _load_credentials(self) -> None:
        if self._port is not None and self._password is not None:
            return
        try:
            raw = json.loads(self.credentials_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LocalPostgresError(
                f"no cluster initialized under {self.base_dir} (run start first)"
            ) from None
        except (OSError, ValueError) as exc:
            # The message of a JSON error may quote the file, which holds the password.
            raise LocalPostgresError(
                f"cannot read {self.credentials_file}: {type(exc).__name__}"
            ) from None
        if not isinstance(raw, dict):
            raise LocalPostgresError(f"{self.credentials_file} is malformed")
        port, password = raw.get("port"), raw.get("password")
        if not isinstance(port, int) or not isinstance(password, str) or not password:
            raise LocalPostgresError(f"{self.credentials_file} is malformed")
        self._port, self._password = port, password
        if self._pinned_port is not None and self._pinned_port != port:
            self._save_credentials(self._pinned_port, password)

    def _save_credentials(self, port: int, password: str) -> None:
        tmp = self.credentials_file.with_name(self.credentials_file.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # Created 0600 from the start so the password is never readable by others.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"port": port, "password": password}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.credentials_file)
        self._port, self._password = port, password

    # --- lifecycle ---------------------------------------------------------------------

    def _initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").is_file()

    def ensure_initialized(self) -> None:
        """Create base_dir, credentials and the cluster unless they already exist."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._server_user is not None:
            self.base_dir.chmod(0o755)
        if self.credentials_file.exists():
            self._load_credentials()
        else:
            port = self._pinned_port if self._pinned_port is not None else free_port()
            self._save_credentials(port, secrets.token_urlsafe(24))
        if self._initialized():
            return
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise LocalPostgresError(
                f"{self.pgdata} exists, is not empty and is not a PostgreSQL cluster"
            )
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        self._give_to_server_user(self.pgdata)
        self._check_server_user_access()
        result = self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.pgdata),
                "-U", SERVER_USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-locale",
                "-E", "UTF8",
            ],
            timeout=180,
        )
        if result.returncode != 0:
            raise LocalPostgresError(f"initdb failed:\n{_tail(result.stderr or result.stdout)}")

    def start(self, timeout: float = 60) -> None:
        """Start the server (initializing it first if needed); no-op when already running."""
        self.ensure_initialized()
        if self.is_running():
            return
        self._check_socket_path()
        if not self.log_file.exists():
            self.log_file.touch(mode=0o600)
        self._give_to_server_user(self.log_file)
        deadline = time.monotonic() + timeout
        self._wait_for_dead_postmaster_reaped(deadline)
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            log_offset = self.log_file.stat().st_size
            stale_pid = (self.pgdata / "postmaster.pid").exists()
            server_opts = shlex.join(
                [
                    "-c", "listen_addresses=127.0.0.1",
                    "-p", str(self.port),
                    "-c", f"unix_socket_directories={self.pgdata}",
                ]
            )
            result = self._run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "start",
                    "-D", str(self.pgdata),
                    "-l", str(self.log_file),
                    "-w",
                    "-t", str(max(1, math.ceil(deadline - time.monotonic()))),
                    "-o", server_opts,
                ],
                timeout=max(1.0, deadline - time.monotonic()) + 15,
            )
            if result.returncode == 0:
                break
            log_tail = self._log_since(log_offset)
            # The free port chosen at init can be taken by the time we start; a port the
            # caller chose is their business.
            if (
                "Address already in use" in log_tail
                and self._pinned_port is None
                and attempt < _BIND_ATTEMPTS
            ):
                self._save_credentials(free_port(), self.password)
                continue
            hint = ""
            if stale_pid and not self.is_running():
                hint = (
                    f"\n{self.pgdata / 'postmaster.pid'} was present before start; if no "
                    "server is running for this directory it is stale and can be removed"
                )
                old_pid = self._pid_from_lock_file()
                if old_pid is not None and _is_zombie(old_pid):
                    hint += f" (its PID {old_pid} is a zombie not yet reaped by its parent)"
            raise LocalPostgresError(
                f"could not start PostgreSQL in {self.pgdata} on port {self.port}"
                f" (pg_ctl exit {result.returncode}): {result.stderr.strip()}{hint}\n"
                f"last lines of {self.log_file}:\n{log_tail}"
            )
        self._apply_password()

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server and wait for it; no-op when it is not running."""
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {sorted(_STOP_MODES)}, not {mode!r}")
        if not self.is_running():
            return
        result = self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "stop",
                "-D", str(self.pgdata),
                "-m", mode,
                "-w",
                "-t", str(max(1, math.ceil(timeout))),
            ],
            timeout=timeout + 15,
        )
        if result.returncode != 0 and self.is_running():
            raise LocalPostgresError(
                f"could not stop PostgreSQL in {self.pgdata}: {result.stderr.strip()}"
            )

    def is_running(self) -> bool:
        """Whether a postmaster is running on this cluster's data directory."""
        if not self._initialized():
            return False
        pid = self._pid_from_lock_file()
        if pid is None:
            return False
        # pg_ctl status only asks whether the PID in postmaster.pid is alive; after a crash
        # that PID may belong to an unrelated process (which stop() would then signal).
        # A postmaster's cwd is its data directory, which settles it where /proc allows.
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except FileNotFoundError:
            return False
        except OSError:
            pass
        else:
            return Path(cwd) == self.pgdata.resolve()
        result = self._run(
            [str(self.bin_dir / "pg_ctl"), "status", "-D", str(self.pgdata)],
            timeout=_QUICK_TIMEOUT,
        )
        return result.returncode == 0

    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster (for tests that kill it), None when stopped."""
        return self._pid_from_lock_file() if self.is_running() else None

    def _wait_for_dead_postmaster_reaped(self, deadline: float) -> None:
        # A killed postmaster is reparented to init and stays a zombie until reaped; until
        # then its PID answers kill(pid, 0), so the new server would take postmaster.pid
        # for a live server's and refuse to start. Slow reapers (container inits) take
        # seconds.
        pid = self._pid_from_lock_file()
        if pid is None:
            return
        while _is_exiting(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _pid_from_lock_file(self) -> int | None:
        try:
            first = (self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        return pid if pid > 0 else None

    # --- SQL ---------------------------------------------------------------------------

    def psql(self, sql: str, dbname: str = "postgres", *, timeout: float = 60) -> str:
        """Run `sql` over the unix socket as the superuser; returns unaligned tuples-only
        output. Statements are read from stdin, so several may be given and
        transaction-hostile ones (CREATE DATABASE) work."""
        self._load_credentials()
        conninfo = " ".join(
            [
                f"host={_conninfo_value(str(self.pgdata))}",
                f"port={self.port}",
                f"user={SERVER_USER}",
                f"dbname={_conninfo_value(dbname)}",
            ]
        )
        result = self._run(
            [
                str(self.bin_dir / "psql"),
                "-X", "-A", "-t", "-q",
                "-v", "ON_ERROR_STOP=1",
                "-d", conninfo,
                "-f", "-",
            ],
            timeout=timeout,
            stdin=sql,
        )
        if result.returncode != 0:
            raise LocalPostgresError(f"psql failed on {dbname!r}: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> str:
        self.psql(f"CREATE DATABASE {_quote_ident(name)};")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE);")

    def _apply_password(self) -> None:
        verifier = scram_verifier(self.password)
        try:
            self.psql(f"ALTER ROLE {SERVER_USER} PASSWORD '{verifier}';")
        except LocalPostgresError:
            # psql may echo the statement; the verifier is not for error messages either.
            raise LocalPostgresError(
                f"could not set the {SERVER_USER} password; see {self.log_file}"
            ) from None

    # --- plumbing ----------------------------------------------------------------------

    def _run(
        self, args: Sequence[str], *, timeout: float, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._runuser is not None:
            cmd = [self._runuser, "-u", SERVER_USER, "--", *cmd]
        # Inherited PG* variables (PGPASSWORD, PGHOST, PGOPTIONS...) would silently change
        # what the tools connect to.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        name = Path(args[0]).name
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                # The caller's cwd may be unreadable for the server user.
                cwd=self.base_dir,
                # A timeout must take down runuser's child as well.
                start_new_session=True,
            )
        except OSError as exc:
            raise LocalPostgresError(f"cannot run {name}: {exc}") from None
        with proc:
            try:
                out, err = proc.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=5)
                raise LocalPostgresError(f"{name} timed out after {timeout:g}s") from None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def _give_to_server_user(self, path: Path) -> None:
        if self._server_user is not None:
            os.chown(path, self._server_user.pw_uid, self._server_user.pw_gid)

    def _check_server_user_access(self) -> None:
        if self._runuser is None:
            return
        result = self._run(["test", "-w", str(self.pgdata)], timeout=_QUICK_TIMEOUT)
        if result.returncode != 0:
            raise LocalPostgresError(
                f"the {SERVER_USER} user cannot reach {self.pgdata}; every parent directory "
                "must be traversable by it (e.g. use a directory under /tmp or /var/lib)"
            )

    def _check_socket_path(self) -> None:
        socket_path = self.pgdata / f".s.PGSQL.{self.port}"
        if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
            raise LocalPostgresError(
                f"{self.base_dir} is too long a path for the server's unix socket "
                f"({socket_path}); choose a shorter directory"
            )
        if re.search(r"[,\"]", str(self.pgdata)):
            raise LocalPostgresError(
                f"{self.pgdata}: commas and double quotes are not supported in the path"
            )

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(offset)
                new = fh.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(cannot read log: {exc})"
        return _tail(new) or "(log is empty)"


def _is_exiting(pid: int) -> bool:
    """Whether `pid` is a process that has died but still holds its PID."""
    try:
        os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        # A process past releasing its filesystem state (dying or zombie) has no cwd.
        return os.path.exists(f"/proc/{pid}")
    except OSError:
        return _is_zombie(pid)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) state ...": comm may itself contain ") ".
    fields = stat_line.rpartition(")")[2].split()
    return bool(fields) and fields[0] == "Z"


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
