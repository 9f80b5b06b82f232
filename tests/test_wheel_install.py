"""A plain wheel install (not editable) works with no source tree around: the schema SQL
travels inside the package, and init-db and sync --once run against a real server."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
from support.agent_process import write_config
from support.data import file_event, insert_file_events, pg_fetch_sync

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding the wheel built from this tree; the
    dependencies come from the test run's own environment (no network needed)."""
    base = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(base / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [wheel] = (base / "dist").glob("host_agent-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    # Dependencies from this environment: a plain path entry, so its .pth files (the
    # editable install of this tree among them) are not processed.
    [own] = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    Path(own, "test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def test_the_wheel_carries_the_schema_and_runs_init_db_and_sync(
    installed: Path, tmp_path: Path, pg_database: str
) -> None:
    elsewhere = tmp_path / "elsewhere"  # no source tree here or above it
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOST_AGENT_", "PYTHON"))}
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c", "import host_agent; print(host_agent.__file__)"],
        capture_output=True, text=True, cwd=elsewhere, env=env, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(installed)), where

    data = tmp_path / "data"
    data.mkdir()
    config = write_config(tmp_path / "config.yaml", url=pg_database, data_dir=data)
    agent = str(installed / "bin" / "host-agent")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [agent, "--config", str(config), *args],
            capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120, check=False,
        )  # fmt: skip

    init = run("init-db")
    assert init.returncode == 0, init.stderr
    assert "schema applied: 01_schema_version.sql" in init.stdout
    insert_file_events(data / "file_changes.db", [file_event(i) for i in range(25)])
    synced = run("sync", "--once")
    assert synced.returncode == 0, synced.stderr
    assert "file_change_events: success, 25 synced" in synced.stdout
    rows = pg_fetch_sync(pg_database, "SELECT count(*) AS n FROM file_change_events")
    assert rows[0]["n"] == 25
