"""Progress you can see on a long catch-up (issue 14), with the real CLI and a real PostgreSQL.

`sync --once` on a terminal (a real pseudo-terminal here) draws a progress line per table
that redraws in place: rows shipped of the backlog, rows/s, time left. Without a terminal, or
with `--no-progress`, nothing of it is written; a run that lasts longer than 10 s logs a
`sync.progress` event every 10 s instead (a real slow link: the proxy passes 40 KB/s), and
`status` estimates a backlog's time to drain at the last measured rate.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

from support.agent_process import (
    agent_env,
    host_agent_executable,
    run_agent,
    with_port,
    write_config,
)
from support.data import bulk_file_events, local_query
from support.tcp_proxy import TcpProxy

ROWS = 20_000
SLOW_ROWS = 3_000  # about 15 s through the throttled proxy


def _unsynced(data: Path) -> int:
    [(n,)] = local_query(
        data / "file_changes.db", "SELECT count(*) FROM file_change_events WHERE synced_at IS NULL"
    )
    return int(n)


def run_in_pty(
    args: list[str], *, env: dict[str, str], cwd: Path, timeout: float, columns: int = 0
) -> tuple[int, str]:
    """Run `args` with stdin, stdout and stderr on a new pseudo-terminal of `columns` columns
    (0: a terminal that does not say its size); (exit code, all it wrote to the terminal)."""
    master, slave = os.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    proc = subprocess.Popen(
        args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"still running after {timeout} s: {out.decode(errors='replace')}"
            ready, _, _ = select.select([master], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end is gone
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=timeout), out.decode("utf-8", errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _setup(tmp_path: Path, url: str) -> tuple[Path, Path]:
    data = tmp_path / "data"
    bulk_file_events(data / "file_changes.db", ROWS)
    config = write_config(tmp_path / "config.yaml", url=url, data_dir=data)
    return config, data


PROGRESS_LINE = re.compile(
    r"file_change_events: +100%\|.*\| 20\.0k/20\.0k \[[0-9:]+<[0-9:]+, +[0-9.]+k? rows/s\]"
)


def test_on_a_terminal_sync_once_draws_a_progress_line_per_table(
    tmp_path: Path, schema_url: str
) -> None:
    config, data = _setup(tmp_path, schema_url)
    code, screen = run_in_pty(
        [host_agent_executable(), "--config", str(config), "sync", "--once"],
        env=agent_env(data_sync_batch_size=1000),
        cwd=tmp_path,
        timeout=120,
        columns=100,
    )
    assert code == 0, screen
    assert _unsynced(data) == 0
    # The line redraws in place (carriage returns), from the backlog to the end.
    assert "\r" in screen
    # The first drawing: nothing shipped of 20,000 rows; the last: all of them, with the rate.
    assert re.search(r"file_change_events: +0%\|.*\| 0\.00/20\.0k", screen), screen
    assert PROGRESS_LINE.search(screen), screen
    lines = [line for line in screen.replace("\r\n", "\n").split("\r") if "%|" in line]
    assert all(len(line.split("\n")[0]) <= 100 for line in lines)  # it fits the terminal
    assert "desktop_activity_sessions:" not in screen.split("sync.table_done")[0]  # empty
    assert "file_change_events: success, 20000 synced, 0 rejected" in screen


def test_without_a_terminal_or_with_no_progress_nothing_of_it_is_written(
    tmp_path: Path, schema_url: str
) -> None:
    config, data = _setup(tmp_path, schema_url)
    piped = run_agent(config, "sync", "--once", env=agent_env(data_sync_batch_size=1000),
                      cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr
    assert _unsynced(data) == 0
    for text in (piped.stdout, piped.stderr):
        assert "\r" not in text and "rows/s" not in text and "%|" not in text

    # `status` estimates how long a new backlog takes at the rate that run measured.
    bulk_file_events(data / "file_changes.db", 5_000, start=ROWS)
    shown = run_agent(config, "status", "--json", env=agent_env(), cwd=tmp_path)
    files = json.loads(shown.stdout)["tables"]["file_change_events"]
    assert files["unsynced"] == 5_000
    rate = files["rows_per_second"]
    assert rate > 0 and files["rate_measured_at"]
    assert files["drain_seconds_estimate"] == round(5_000 / rate)
    text = run_agent(config, "status", env=agent_env(), cwd=tmp_path).stdout
    assert f"at {rate:,} rows/s" in text and "time to ship them: about" in text

    more = tmp_path / "more"
    bulk_file_events(more / "file_changes.db", 2_000)
    quiet_config = write_config(tmp_path / "quiet.yaml", url=schema_url, data_dir=more)
    code, screen = run_in_pty(
        [host_agent_executable(), "--config", str(quiet_config), "sync", "--once",
         "--no-progress"],
        env=agent_env(),
        cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    assert code == 0, screen
    assert "%|" not in screen and "rows/s" not in screen and "\r" not in screen.replace(
        "\r\n", "\n"
    )
    assert "file_change_events: success, 2000 synced, 0 rejected" in screen


def test_a_run_longer_than_ten_seconds_logs_its_progress_every_ten_seconds(
    tmp_path: Path, schema_url: str
) -> None:
    data = tmp_path / "data"
    bulk_file_events(data / "file_changes.db", SLOW_ROWS)
    with TcpProxy("127.0.0.1", int(schema_url.rsplit(":", 1)[1].split("/")[0])) as proxy:
        proxy.throttle(40_000)  # bytes a second from the agent to the server
        config = write_config(
            tmp_path / "config.yaml", url=with_port(schema_url, proxy.port), data_dir=data
        )
        started = time.monotonic()
        result = run_agent(
            config, "sync", "--once", extra=("--log-format", "json"),
            env=agent_env(data_sync_batch_size=200), cwd=tmp_path, timeout=180,
        )  # fmt: skip
        lasted = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert _unsynced(data) == 0
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    progress = [e for e in events if e.get("event") == "sync.progress"]
    assert lasted > 11, f"the throttled run took only {lasted:.1f} s: the test proves nothing"
    # One event per full 10 s of the table's run (give or take the last one).
    assert int(lasted // 10) - 1 <= len(progress) <= int(lasted // 10), (lasted, progress)
    first = progress[0]
    assert first["table"] == "file_change_events"
    assert 0 < first["shipped"] < SLOW_ROWS
    assert first["backlog_left"] == SLOW_ROWS - first["shipped"]
    assert first["rows_per_second"] > 0 and first["seconds_left"] >= 0
    shipped = [e["shipped"] for e in progress]
    assert shipped == sorted(shipped)
