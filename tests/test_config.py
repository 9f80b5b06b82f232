"""Configuration: defaults, ${VAR} expansion, environment overrides, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_agent.cli import main
from host_agent.config import all_keys, env_name, load_config, parse_config
from host_agent.errors import ConfigError
from host_agent.urls import redact_url

SECRET = "Zq9-very-secret-pw"


def test_example_config_documents_the_defaults() -> None:
    example = load_config(Path(__file__).parents[1] / "config" / "config.yaml", env={})
    assert example.model_dump() == parse_config({}, env={}).model_dump()


def test_env_references_and_overrides() -> None:
    config = parse_config(
        {"database": {"postgres_url": "postgresql://agent:${PGPW}@db.example:5433/events"}},
        env={
            "PGPW": SECRET,
            "HOST_AGENT_DATA_SYNC_BATCH_SIZE": "1234",
            "HOST_AGENT_COLLECTORS_FILESYSTEM_ROOTS": "[/srv/a, /srv/b]",
            "HOST_AGENT_HOST_IDENTIFIER": "ws-7",
            "HOST_AGENT_COLLECTORS_DESKTOP_ENABLED": "false",
        },
    )
    assert config.postgres_url == f"postgresql://agent:{SECRET}@db.example:5433/events"
    assert config.data_sync.batch_size == 1234
    assert [str(p) for p in config.collectors.filesystem.roots] == ["/srv/a", "/srv/b"]
    assert config.host == "ws-7"
    assert config.collectors.desktop.enabled is False
    assert SECRET not in repr(config) and SECRET not in str(config.model_dump())
    assert redact_url(config.postgres_url or "") == "postgresql://agent:***@db.example:5433/events"


def test_variables_that_are_not_config_keys_are_not_mistaken_for_overrides() -> None:
    env = {"HOST_AGENT_PG_BIN": "/opt/pg/bin"}
    assert parse_config({}, env=env).data_sync.batch_size == 10_000


def test_every_key_has_an_environment_override() -> None:
    for key in all_keys():
        assert env_name(key).startswith("HOST_AGENT_")
    assert env_name("data_sync.batch_size") == "HOST_AGENT_DATA_SYNC_BATCH_SIZE"


@pytest.mark.parametrize(
    ("yaml_text", "env", "key", "problem"),
    [
        ("datasync: {}\n", {}, "datasync", "unknown key"),
        ("data_sync: {batch_sise: 10}\n", {}, "data_sync.batch_sise", "unknown key"),
        ("data_sync: {batch_size: many}\n", {}, "data_sync.batch_size", "valid integer"),
        ("data_sync: {batch_size: 0}\n", {}, "data_sync.batch_size", "greater than or equal"),
        ("database: {postgres_url: 'http://x'}\n", {}, "database.postgres_url", "postgresql://"),
        (
            "database: {postgres_url: 'postgresql://u:" + SECRET + "@h:99999/d'}\n",
            {},
            "database.postgres_url",
            "not a valid URL",
        ),
        (
            "database: {postgres_url: 'postgresql://u:${NOT_SET_PW}@h/d'}\n",
            {},
            "database.postgres_url",
            "NOT_SET_PW is not set",
        ),
        (
            "{}\n",
            {"HOST_AGENT_DATA_SYNC_BATCHSIZE": "5"},
            "HOST_AGENT_DATA_SYNC_BATCHSIZE",
            "unknown",
        ),
        ("logging: {format: xml}\n", {}, "logging.format", "'console' or 'json'"),
        ("data_sync: [1, 2\n", {}, "config.yaml", "not valid YAML"),
        (
            "collectors: {desktop: {redact_title_patterns: ['(unclosed']}}\n",
            {},
            "collectors.desktop.redact_title_patterns",
            "regular expression",
        ),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    yaml_text: str,
    env: dict[str, str],
    key: str,
    problem: str,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("NOT_SET_PW", raising=False)

    code = main(["--config", str(path), "status"])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert key in lines[0] and problem in lines[0], lines[0]
    assert SECRET not in err


def test_missing_explicit_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.yaml"), "status"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_config_error_is_a_host_agent_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"data_sync": {"interval_seconds": -1}}, env={})
    assert caught.value.key == "data_sync.interval_seconds"
