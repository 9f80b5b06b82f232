"""The docker-compose dev stack, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import json
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


# --- Grafana ------------------------------------------------------------------------------------

GRAFANA = ROOT / "services" / "grafana"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, for bind mounts (sources starting with ./) and volumes."""
    found = {}
    for mount in service["volumes"]:
        source, target = mount.split(":")[:2]
        found[target] = source
    return found


def _provisioning(kind: str) -> dict[str, Any]:
    [path] = sorted((GRAFANA / "provisioning" / kind).glob("*.yaml"))
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    assert data["apiVersion"] == 1, path
    return data


def _datasource() -> dict[str, Any]:
    [source] = _provisioning("datasources")["datasources"]
    return dict(source)


def test_grafana_runs_a_pinned_official_image_with_its_provisioning_mounted() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana(-oss)?:\d+\.\d+\.\d+", grafana["image"]), (
        "the official image, pinned to a release"
    )
    mounts = _mounts(grafana)
    for target in ("/etc/grafana/provisioning/datasources", "/etc/grafana/provisioning/dashboards"):
        assert mounts[target] == f"./services/grafana/provisioning/{target.rsplit('/', 1)[1]}"
    for target, source in mounts.items():
        if source.startswith("./"):
            assert (ROOT / source).is_dir(), source
            assert f"{target}:ro" in " ".join(grafana["volumes"]), f"{target} read-only"
    assert "grafana-data" in compose()["volumes"] and mounts["/var/lib/grafana"] == "grafana-data"
    assert grafana["ports"] == ["127.0.0.1:${GRAFANA_PORT:-3000}:3000"], "loopback only"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    directory, name = home.rsplit("/", 1)
    assert (ROOT / mounts[directory] / name).is_file(), home


def test_the_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    mounts = _mounts(compose()["services"]["grafana"])
    [provider] = _provisioning("dashboards")["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert mounts[path] == "./services/grafana/dashboards"
    assert sorted(p.name for p in (ROOT / mounts[path]).glob("*.json")) == [
        "activity.json", "fleet-sync-health.json",
    ]


def test_the_data_source_is_the_compose_postgres_read_by_the_reader_role() -> None:
    source = _datasource()
    assert source["type"] == "grafana-postgresql-datasource"
    host, port = source["url"].split(":")
    assert host in compose()["services"] and port == "5432"
    assert source["user"] == "host_agent_reader"
    schema = (ROOT / "services/database/init/07_grafana_reader.sql").read_text()
    assert "CREATE ROLE host_agent_reader NOLOGIN" in schema
    # The panels' SQL is tested with the plain PostgreSQL macros, not TimescaleDB's.
    assert source["jsonData"].get("timescaledb", False) is False
    assert source["jsonData"]["database"] == "$__env{POSTGRES_DB}"
    assert source["secureJsonData"]["password"] == "$__env{GRAFANA_DB_PASSWORD}"


def test_every_env_reference_of_the_provisioning_is_set_from_env_file_values() -> None:
    services = compose()["services"]
    grafana_env = services["grafana"]["environment"]
    text = (GRAFANA / "provisioning/datasources/host-agent.yaml").read_text()
    for name in re.findall(r"\$__env\{(\w+)\}", text):
        assert name in grafana_env, name
    assert grafana_env["POSTGRES_DB"] == services["postgres"]["environment"]["POSTGRES_DB"]
    login = services["grafana-reader-login"]
    for env in (grafana_env, login["environment"]):
        assert env["GRAFANA_DB_PASSWORD"].startswith("${GRAFANA_DB_PASSWORD:?"), "no default"
    assert grafana_env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")
    example = (ROOT / ".env.example").read_text()
    for key in ("GRAFANA_DB_PASSWORD", "GRAFANA_ADMIN_USER", "GRAFANA_ADMIN_PASSWORD",
                "GRAFANA_PORT"):
        assert re.search(rf"^{key}=", example, re.MULTILINE), key


def test_the_reader_login_runs_before_grafana_with_the_admin_connection() -> None:
    services = compose()["services"]
    login = services["grafana-reader-login"]
    assert login["image"] == services["postgres"]["image"], "its psql matches the server"
    assert login["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["grafana-reader-login"]["condition"] == (
        "service_completed_successfully"
    )
    mounts = _mounts(login)
    [script] = [target for target, source in mounts.items()
                if source == "./services/grafana/reader-login.sh"]
    assert login["entrypoint"] == ["sh", script]
    env = login["environment"]
    assert env["PGHOST"] == "postgres"
    assert env["PGPASSWORD"].startswith("${POSTGRES_PASSWORD")
    assert env["PGUSER"] == services["postgres"]["environment"]["POSTGRES_USER"]


def _dashboard_datasource_refs(node: Any) -> list[dict[str, Any]]:
    """Every `datasource` object anywhere in a dashboard (panels, targets, variables)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                found.append(value)
            found.extend(_dashboard_datasource_refs(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_dashboard_datasource_refs(item))
    return found


def test_dashboards_are_valid_and_refer_only_to_the_provisioned_data_source() -> None:
    source = _datasource()
    uids = set()
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        # Grafana's v1 dashboard model; 36+ have data source references as {type, uid}.
        assert isinstance(board["schemaVersion"], int) and 36 <= board["schemaVersion"] <= 42
        assert board["uid"] and board["uid"] not in uids and len(board["uid"]) <= 40
        uids.add(board["uid"])
        assert board["title"] and board["time"]["to"] == "now"
        refs = _dashboard_datasource_refs(board)
        assert refs, path.name
        for ref in refs:
            assert ref == {"type": source["type"], "uid": source["uid"]}, (path.name, ref)
        panel_ids = [panel["id"] for panel in board["panels"]]
        assert len(panel_ids) == len(set(panel_ids)), f"{path.name}: panel ids repeat"
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert panel["targets"] and panel.get("description"), panel["title"]
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            if panel.get("repeat"):
                names = [v["name"] for v in board["templating"]["list"]]
                assert panel["repeat"] in names, panel["title"]


def test_gateway_service_serves_tls_on_loopback_with_a_dev_certificate() -> None:
    services = compose()["services"]
    gateway = services["gateway"]
    assert gateway["build"] == "."
    assert gateway["command"] == ["host-agent", "gateway"]
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["gateway-dev-cert"]["condition"] == (
        "service_completed_successfully"
    )
    env = gateway["environment"]
    known = {env_name(k) for k in all_keys()} | {ENV_CONFIG_PATH}
    for name in env:
        if name.startswith("HOST_AGENT_"):
            assert name in known, f"{name} is not a configuration key"
    # Listening beyond loopback inside its container needs TLS: the config check demands it.
    assert env["HOST_AGENT_GATEWAY_LISTEN_ADDRESS"] == "0.0.0.0"
    assert env["HOST_AGENT_GATEWAY_TLS_CERT_FILE"] and env["HOST_AGENT_GATEWAY_TLS_KEY_FILE"]
    assert all(port.startswith("127.0.0.1:") for port in gateway["ports"])
    cert_volume = next(v for v in gateway["volumes"] if v.endswith(":/certs:ro"))
    made_by = services["gateway-dev-cert"]["volumes"][0]
    assert made_by.split(":")[0] == cert_volume.split(":")[0]
