"""Local SQLite store: connections, schema, migrations, and the writer collectors use."""

from host_agent.store.connection import connect
from host_agent.store.migrations import applied_migrations, migrate, prepare_file
from host_agent.store.tables import DESKTOP_ACTIVITY, FILE_CHANGES, TABLES, LocalTable
from host_agent.store.writer import RowWriter

__all__ = [
    "DESKTOP_ACTIVITY",
    "FILE_CHANGES",
    "TABLES",
    "LocalTable",
    "RowWriter",
    "applied_migrations",
    "connect",
    "migrate",
    "prepare_file",
]
