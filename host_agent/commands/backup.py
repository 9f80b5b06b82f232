"""`host-agent backup --out DIR`: a consistent copy of every local store, with a manifest."""

from __future__ import annotations

from pathlib import Path

from host_agent import __version__
from host_agent.config import AgentConfig
from host_agent.daemon.assembly import prepare_stores, table_path
from host_agent.errors import ConfigError
from host_agent.store.backup import Backup, write_backup
from host_agent.store.tables import TABLES


def backup(config: AgentConfig, out: Path) -> Backup:
    """Blocking: SQLite and files only; safe while the agent runs."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("--out", f"{out} exists and is not an empty directory: choose a new one")
    prepare_stores(config)
    return write_backup(
        [(t, table_path(config, t)) for t in TABLES], out, host=config.host, version=__version__
    )
