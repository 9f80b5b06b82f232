"""The docker-compose dev stack, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from host_agent.config import ENV_CONFIG_PATH, all_keys, env_name

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_postgres_service_gets_the_schema_and_a_healthcheck() -> None:
    postgres = compose()["services"]["postgres"]
    assert postgres["image"].startswith("postgres:15")
    mounts = {m.split(":")[1]: m.split(":")[0] for m in postgres["volumes"]}
    assert mounts["/docker-entrypoint-initdb.d"] == "./services/database/init"
    assert sorted((ROOT / "services/database/init").glob("*.sql")), "schema files exist"

    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")


def test_the_compose_schema_directory_is_the_packaged_schema() -> None:
    """One source of truth: the stack mounts the very files `init-db` applies."""
    from host_agent.sync.postgres.schema import schema_files

    mounted = sorted((ROOT / "services/database/init").glob("*.sql"))
    packaged = schema_files()
    assert [p.name for p in mounted] == [p.name for p in packaged]
    for path, resource in zip(mounted, packaged, strict=True):
        assert path.read_bytes() == resource.read_bytes(), path.name


def test_agent_service_starts_after_a_healthy_database_with_config_and_data() -> None:
    agent = compose()["services"]["agent"]
    assert agent["build"] == "."
    assert agent["depends_on"]["postgres"]["condition"] == "service_healthy"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in agent["volumes"]}
    assert (ROOT / mounts["/etc/host-agent/config.yaml"]).is_file()
    env = agent["environment"]
    assert env[ENV_CONFIG_PATH] == "/etc/host-agent/config.yaml"
    data_dir = next(path for path, source in mounts.items() if source == "agent-data")
    for key in ("database.desktop_activity_db", "database.file_events_db"):
        assert env[env_name(key)].startswith(data_dir + "/")
    assert "${POSTGRES_PASSWORD}" in env["HOST_AGENT_DATABASE_POSTGRES_URL"]
    assert "@postgres:5432/" in env["HOST_AGENT_DATABASE_POSTGRES_URL"]
    known = {env_name(k) for k in all_keys()} | {ENV_CONFIG_PATH}
    for name in env:
        if name.startswith("HOST_AGENT_"):
            assert name in known, f"{name} is not a configuration key"


def test_credentials_come_from_an_ignored_env_file_with_a_committed_example() -> None:
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=", example, re.MULTILINE)
    text = (ROOT / "docker-compose.yml").read_text()
    assert "change-me" not in text
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True, timeout=30
    )
    assert ignored.returncode == 0, ".env must be ignored by git"


def test_dockerfile_copies_what_exists_and_runs_the_agent() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
    text = "\n".join(lines)
    assert "host-agent init-db" in text and "exec host-agent run" in text
    assert "STOPSIGNAL SIGTERM" in text
    assert re.search(r"^RUN pip install --no-cache-dir \. ", text, re.MULTILINE), (
        "a normal install, not an editable one: the package carries its schema"
    )
    assert re.search(r"^USER (?!root)", text, re.MULTILINE), "the agent does not run as root"
