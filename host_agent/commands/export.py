"""`host-agent export --out FILE [--table T]`: unsynced rows into a bundle to carry by hand."""

from __future__ import annotations

from pathlib import Path

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import prepare_stores, table_path
from host_agent.errors import ConfigError
from host_agent.store.tables import TABLES
from host_agent.sync.offline import ExportReport, export_bundle


def export(config: AgentConfig, out: Path, table: str | None) -> ExportReport:
    """Blocking: SQLite and the file only."""
    chosen = [t for t in TABLES if table is None or t.name == table]
    if not chosen:
        names = ", ".join(t.name for t in TABLES)
        raise ConfigError("--table", f"no such table: {table} (one of {names})")
    if out.exists():
        raise ConfigError("--out", f"{out} exists already: choose a new file name")
    prepare_stores(config)
    return export_bundle(config.host, [(t, table_path(config, t)) for t in chosen], out)
