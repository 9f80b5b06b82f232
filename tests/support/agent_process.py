"""Running the `host-agent` console script as a real process, for fault tests.

Everything here is plain blocking code: subprocesses with their output in files, a config
file writer, an environment builder and polling helpers (`wait_until`, `async_wait_until`)
that stand in for sleeps: they return as soon as the condition holds and fail with a message
when it does not within the deadline.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml

T = TypeVar("T")

POLL_INTERVAL = 0.02


def host_agent_executable() -> str:
    """The console script installed next to this interpreter (the project's venv)."""
    beside = Path(sys.executable).with_name("host-agent")
    if beside.exists():
        return str(beside)
    found = shutil.which("host-agent")
    if found is None:
        raise RuntimeError("the host-agent console script is not installed")
    return found


def agent_env(**overrides: object) -> dict[str, str]:
    """os.environ without inherited HOST_AGENT_* variables (a developer's shell must not
    redirect a test), the desktop collector off, the first sync at once (no start jitter),
    plus `overrides`: keyword
    data_sync_batch_size=500 becomes HOST_AGENT_DATA_SYNC_BATCH_SIZE=500."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOST_AGENT_")}
    env["HOST_AGENT_COLLECTORS_DESKTOP_ENABLED"] = "false"
    env["HOST_AGENT_DATA_SYNC_START_JITTER_SECONDS"] = "0"  # tests wait for the first run
    for key, value in overrides.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"HOST_AGENT_{key.upper()}"] = text
    return env


def write_config(
    path: Path,
    *,
    url: str | None,
    data_dir: Path,
    host: str = "test-host",
    **sections: dict[str, Any],
) -> Path:
    """A YAML config file with the local files in `data_dir` (same names as make_config)."""
    data: dict[str, Any] = {
        "host_identifier": host,
        "database": {
            "desktop_activity_db": str(data_dir / "desktop_activity.db"),
            "file_events_db": str(data_dir / "file_changes.db"),
            "postgres_url": url,
        },
        "collectors": {"desktop": {"enabled": False}, "filesystem": {"enabled": False}},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def with_port(url: str, port: int, host: str = "127.0.0.1") -> str:
    """`url` pointed at host:port instead (credentials and database kept)."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# --- polling -------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    message: str = "condition",
    *,
    interval: float = 0.05,
) -> T:
    """Poll `predicate` until it returns something truthy; return that. AssertionError on
    timeout, naming `message`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float,
    message: str = "condition",
    *,
    interval: float = POLL_INTERVAL,
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


# --- processes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_agent(
    config: Path,
    *args: str,
    env: dict[str, str],
    cwd: Path,
    timeout: float = 120,
    extra: Sequence[str] = (),
) -> Finished:
    """Run `host-agent [extra] --config config args...` to completion."""
    started = time.monotonic()
    result = subprocess.run(
        [host_agent_executable(), *extra, "--config", str(config), *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Finished(
        result.returncode, result.stdout, result.stderr, time.monotonic() - started
    )


class AgentProcess:
    """A `host-agent` process in the background, its output going to files in `workdir`.
    Use as a context manager: a process still running on exit is SIGKILLed and reaped."""

    _serial = 0

    def __init__(
        self,
        config: Path,
        *args: str,
        env: dict[str, str],
        workdir: Path,
        extra: Sequence[str] = (),
    ) -> None:
        AgentProcess._serial += 1
        stem = f"agent-{AgentProcess._serial}-{'-'.join(a.strip('-') for a in args)}"
        self.argv = [host_agent_executable(), *extra, "--config", str(config), *args]
        self.env = env
        self.workdir = workdir
        self.stdout_path = workdir / f"{stem}.stdout"
        self.stderr_path = workdir / f"{stem}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> AgentProcess:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL and reap; returns the exit status (-9 unless it had already exited)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def output(self) -> str:
        """Both streams, for assertion messages."""
        return f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"

    def __enter__(self) -> AgentProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
