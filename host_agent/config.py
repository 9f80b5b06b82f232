"""Load, expand and validate host-agent's YAML configuration.

Order of precedence (last wins): built-in defaults, the YAML file, `HOST_AGENT_<SECTION>_<KEY>`
environment variables (values parsed as YAML scalars, so `true`, `5`, `[a, b]` work).
`${VAR}` and `${VAR:-default}` in string values are expanded from the environment.
Every problem becomes a `ConfigError` naming the dotted key; values of secret keys are never
quoted in messages.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from host_agent.errors import ConfigError
from host_agent.urls import check_postgres_url

DEFAULT_CONFIG_PATH = Path("config/config.yaml")
ENV_PREFIX = "HOST_AGENT_"
ENV_CONFIG_PATH = "HOST_AGENT_CONFIG"
# HOST_AGENT_* variables that are not configuration keys: the config file's path, the
# PostgreSQL binaries for the embedded server (host_agent.embedded).
NOT_OVERRIDES = frozenset({ENV_CONFIG_PATH, "HOST_AGENT_PG_BIN"})
SECRET_KEYS = frozenset({"database.postgres_url", "database.admin_url", "gateway.token"})

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True)


class DatabaseConfig(_Section):
    desktop_activity_db: Path = Path("./data/desktop_activity.db")
    file_events_db: Path = Path("./data/file_changes.db")
    postgres_url: SecretStr | None = None
    admin_url: SecretStr | None = None
    retention_days: float = Field(30, ge=0)
    max_local_db_mb: float | None = Field(None, gt=0)
    size_limit_policy: Literal["stop_collecting", "drop_oldest_unsynced"] = "stop_collecting"
    max_buffered_rows: int = Field(100_000, ge=100, le=10_000_000)
    server_retention_days: float = Field(0, ge=0)

    @field_validator("desktop_activity_db", "file_events_db")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("postgres_url", "admin_url", mode="before")
    @classmethod
    def _check_url(cls, value: object) -> object:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ValueError("must be a postgresql:// URL string")
        check_postgres_url(value)
        return value


class DataSyncConfig(_Section):
    enabled: bool = True
    interval_seconds: float = Field(300, gt=0)
    batch_size: int = Field(10_000, ge=1, le=100_000)
    batch_max_bytes: int = Field(16 * 2**20, ge=2**16, le=2**31)
    max_retries: int = Field(5, ge=0, le=100)
    retry_backoff_seconds: float = Field(30, gt=0)
    retry_backoff_max_seconds: float = Field(900, gt=0)
    wake_delay_seconds: float = Field(10, ge=0)
    start_jitter_seconds: float = Field(5, ge=0, le=3600)
    connect_timeout_seconds: float = Field(10, gt=0)
    command_timeout_seconds: float = Field(120, gt=0)
    once_deadline_seconds: float = Field(10, gt=0)
    allow_schema_alter: bool = False


class MetricsConfig(_Section):
    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = Field(9465, ge=0, le=65535)

    @field_validator("address")
    @classmethod
    def _loopback_only(cls, value: str) -> str:
        try:
            loopback = ipaddress.ip_address(value).is_loopback
        except ValueError:
            loopback = value == "localhost"
        if not loopback:
            raise ValueError("must be a loopback address (the endpoint is for this machine only)")
        return value


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


class DesktopCollectorConfig(_Section):
    enabled: bool = True
    poll_interval_seconds: float = Field(1, gt=0)
    idle_timeout_seconds: float = Field(180, gt=0)
    checkpoint_interval_seconds: float = Field(60, gt=0)
    exclude_applications: list[str] = Field(default_factory=list)
    redact_title_patterns: list[str] = Field(default_factory=list)

    @field_validator("redact_title_patterns")
    @classmethod
    def _check_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from None
        return value


DEFAULT_IGNORE = [
    ".git",
    "node_modules",
    "__pycache__",
    ".venv",
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "*.tmp",
    "*___jb_tmp___",
    "*___jb_old___",
]


class FilesystemCollectorConfig(_Section):
    enabled: bool = False
    roots: list[Path] = Field(default_factory=list)
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    coalesce_ms: int = Field(500, ge=0, le=60_000)

    @field_validator("roots")
    @classmethod
    def _expand_home(cls, value: list[Path]) -> list[Path]:
        return [root.expanduser() for root in value]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class GatewayConfig(_Section):
    # The agent's side: send rows to a gateway instead of PostgreSQL.
    url: str | None = None
    token: SecretStr | None = None
    ca_file: Path | None = None
    # The gateway's side (`host-agent gateway`).
    listen_address: str = "127.0.0.1"
    listen_port: int = Field(8443, ge=0, le=65535)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    pool_size: int = Field(4, ge=1, le=1000)
    max_body_mb: float = Field(64, gt=0, le=4096)
    acquire_timeout_seconds: float = Field(5, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an https:// URL of a host-agent gateway")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("plain http is for a gateway on this machine only: use https://")
        return value

    @model_validator(mode="after")
    def _tls_off_loopback(self) -> GatewayConfig:
        if not _is_loopback(self.listen_address) and not (
            self.tls_cert_file and self.tls_key_file
        ):
            raise ValueError(
                "tls_cert_file and tls_key_file are needed to listen beyond loopback "
                f"({self.listen_address})"
            )
        if self.url and not self.token:
            raise ValueError("gateway.token is needed with gateway.url")
        return self


class CollectorsConfig(_Section):
    desktop: DesktopCollectorConfig = Field(default_factory=DesktopCollectorConfig)
    filesystem: FilesystemCollectorConfig = Field(default_factory=FilesystemCollectorConfig)


class AgentConfig(_Section):
    host_identifier: str | None = None
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    data_sync: DataSyncConfig = Field(default_factory=DataSyncConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    collectors: CollectorsConfig = Field(default_factory=CollectorsConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)

    @field_validator("host_identifier")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @property
    def host(self) -> str:
        """The identity this host's rows carry in PostgreSQL."""
        return self.host_identifier or default_host_identifier()

    @property
    def postgres_url(self) -> str | None:
        url = self.database.postgres_url
        return url.get_secret_value() if url is not None else None

    @property
    def gateway_token(self) -> str | None:
        token = self.gateway.token
        return token.get_secret_value() if token is not None else None

    @property
    def admin_url(self) -> str | None:
        url = self.database.admin_url
        return url.get_secret_value() if url is not None else None


def default_host_identifier() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{socket.gethostname()}_{user}"


def _expand(value: Any, key: str, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(key, f"environment variable {name} is not set")

        return _VAR.sub(replace, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}" if key else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, key, env) for v in value]
    return value


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, ...]]:
    keys: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend((name, *sub) for sub in _leaf_keys(annotation))
        else:
            keys.append((name,))
    return keys


def all_keys() -> list[str]:
    """Every configuration key as a dotted path (for docs and their test)."""
    return [".".join(path) for path in _leaf_keys(AgentConfig)]


def env_name(dotted_key: str) -> str:
    return ENV_PREFIX + dotted_key.replace(".", "_").upper()


def _apply_env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> None:
    known = {env_name(k): tuple(k.split(".")) for k in all_keys()}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_OVERRIDES:
            continue
        path = known.get(name)
        if path is None:
            raise ConfigError(name, "unknown environment override (no such configuration key)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if (
            isinstance(value, (dict, list))
            or value is None
            or isinstance(value, (int, float, bool))
        ):
            pass
        else:
            value = raw
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value


def _describe(error: Mapping[str, Any]) -> tuple[str, str]:
    key = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error["type"] == "extra_forbidden":
        return key, "unknown key"
    secret = any(key == s or key.startswith(s + ".") for s in SECRET_KEYS)
    if not secret and error["type"] not in ("missing",) and "input" in error:
        shown = repr(error["input"])
        if len(shown) <= 60:
            message = f"{message} (got {shown})"
    return key, message


def parse_config(data: Any, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Validate already-loaded YAML data (a mapping or None) into an `AgentConfig`."""
    env = os.environ if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("(top level)", "must be a mapping of sections")
    data = _expand(data, "", env)
    _apply_env_overrides(data, env)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        key, message = _describe(exc.errors()[0])
        raise ConfigError(key, message) from None


def resolve_config_path(path: str | Path | None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if path is not None:
        return Path(path)
    if env.get(ENV_CONFIG_PATH):
        return Path(env[ENV_CONFIG_PATH])
    return DEFAULT_CONFIG_PATH


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> AgentConfig:
    """Load the configuration. An explicitly named file must exist; the default may be absent."""
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get(ENV_CONFIG_PATH))
    config_path = resolve_config_path(path, env)
    data: Any = None
    try:
        text = config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError("--config", f"file not found: {config_path}") from None
        text = ""
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {config_path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(config_path), f"not valid YAML{where}") from None
    return parse_config(data, env)
