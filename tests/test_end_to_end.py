"""End to end: `host-agent run` with both collectors on a real X desktop and a real directory,
shipping to a real PostgreSQL."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent_process import AgentProcess, agent_env, run_agent, wait_until, write_config
from support.data import pg_fetch_sync
from support.x11 import Desktop, require_tools


@pytest.fixture
def desktop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Desktop]:
    require_tools()
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    screen = Desktop(tmp_path)
    try:
        screen.start_xvfb()
        screen.start_openbox()
        yield screen
    finally:
        screen.close()


def test_real_window_switches_and_file_changes_arrive_in_postgres(
    tmp_path: Path, schema_url: str, desktop: Desktop
) -> None:
    watched = tmp_path / "watched"
    (watched / "project" / ".git").mkdir(parents=True)
    config = write_config(
        tmp_path / "config.yaml",
        url=schema_url,
        data_dir=tmp_path / "data",
        host="e2e-host",
        collectors={
            "desktop": {
                "enabled": True,
                "poll_interval_seconds": 0.1,
                "checkpoint_interval_seconds": 0.5,
                "redact_title_patterns": ["(?i)secret"],
            },
            "filesystem": {"enabled": True, "roots": [str(watched)], "coalesce_ms": 100},
        },
    )
    env = agent_env(data_sync_interval_seconds=3600, data_sync_wake_delay_seconds=0.3)
    env["HOST_AGENT_COLLECTORS_DESKTOP_ENABLED"] = "true"
    env["DISPLAY"] = desktop.display

    alpha = desktop.xterm("alpha editor", "AlphaTerm")
    beta = desktop.xterm("my secret banking", "BetaTerm")
    with AgentProcess(config, "run", env=env, workdir=tmp_path) as agent:
        desktop.activate(alpha.window_id)
        wait_until(
            lambda: pg_fetch_sync(
                schema_url,
                "SELECT 1 FROM desktop_activity_sessions WHERE application_name = 'AlphaTerm'",
            ),
            30,
            "the first window's session in PostgreSQL",
        )
        desktop.activate(beta.window_id)
        (watched / "project" / "main.py").write_text("print('hi')\n")
        (watched / "notes.md").write_text("# notes\n")
        # A focus change is seen at the next poll: switch back only once it has been.
        wait_until(
            lambda: pg_fetch_sync(
                schema_url,
                "SELECT 1 FROM desktop_activity_sessions WHERE application_name = 'BetaTerm'",
            ),
            30,
            "the second window's session in PostgreSQL",
        )
        desktop.activate(alpha.window_id)

        def arrived() -> bool:
            apps = pg_fetch_sync(
                schema_url,
                "SELECT application_name FROM desktop_activity_sessions ORDER BY start_time",
            )
            files = pg_fetch_sync(schema_url, "SELECT file_name FROM file_change_events")
            names = [r["application_name"] for r in apps]
            return (
                names.count("AlphaTerm") >= 2
                and "BetaTerm" in names
                and {
                    "main.py",
                    "notes.md",
                }
                <= {r["file_name"] for r in files}
            )

        wait_until(arrived, 30, "window switches and file changes in PostgreSQL")
        agent.send(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, agent.output()

    # Ship the final checkpoint (the session closed at shutdown), then compare.
    final = run_agent(config, "sync", "--once", env=agent_env(), cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    sessions = pg_fetch_sync(
        schema_url,
        "SELECT host_identifier, application_name, window_title, pid, process_name, "
        "start_time, end_time FROM desktop_activity_sessions ORDER BY start_time, source_id",
    )
    by_app = {r["application_name"]: r for r in sessions}
    assert by_app["AlphaTerm"]["window_title"] == "alpha editor"
    assert by_app["AlphaTerm"]["pid"] == alpha.pid
    assert by_app["AlphaTerm"]["process_name"] == "xterm"
    assert by_app["BetaTerm"]["window_title"] == "[redacted]"
    assert by_app["BetaTerm"]["pid"] == beta.pid
    assert all(r["host_identifier"] == "e2e-host" for r in sessions)
    assert all(r["end_time"] is not None and r["end_time"] >= r["start_time"] for r in sessions)
    assert not any("secret" in (r["window_title"] or "") for r in sessions)

    files = pg_fetch_sync(
        schema_url,
        "SELECT file_name, event_type, file_path_relative, project_name, monitored_root "
        "FROM file_change_events WHERE file_name = 'main.py'",
    )
    assert files and files[0]["event_type"] in ("created", "modified")
    assert files[0]["file_path_relative"] == "project/main.py"
    assert files[0]["project_name"] == "project"
    assert files[0]["monitored_root"] == str(watched)
