"""`host-agent ack RECEIPT`: settle an export with the receipt `import` wrote next to it."""

from __future__ import annotations

from pathlib import Path

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import prepare_stores, table_path
from host_agent.store.tables import TABLES
from host_agent.sync.offline import TableAck, ack_receipt, read_receipt


def ack(config: AgentConfig, receipt_path: Path) -> list[TableAck]:
    """Blocking: SQLite and the file only."""
    receipt = read_receipt(receipt_path)
    prepare_stores(config)
    return ack_receipt(receipt, [(t, table_path(config, t)) for t in TABLES])
