"""Every error host-agent raises, split first by whether retrying later can help.

    class                       what it means                                       exit  retry
    HostAgentError              base (`retryable`, `exit_code`): an unexpected error   1     no
    ├── ConfigError             bad configuration or usage; names the key              2     no
    ├── AgentAlreadyRunning     another agent holds this data directory's lock         6     no
    ├── TriggerError            `trigger-sync` got no result                           1     no
    │   ├── AgentNotRunning     no agent runs on these local files                     7     no
    │   ├── TriggerRefused      the agent belongs to another user                      8     no
    │   └── TriggerTimedOut     the triggered run did not finish within --wait         9     yes
    ├── EmbeddedPostgresError   the embedded PostgreSQL could not be set up or run     1     no
    ├── BundleRefused           a bundle or receipt that is damaged, altered, or not   12    no
    │                           for this store: nothing was applied or marked
    ├── VerifyMismatch          `verify` found rows the server lacks or holds at       13    no
    │                           another version (run `verify --repair`)
    ├── StoreError              the local SQLite store failed                          1     no
    │   ├── StoreUnavailable    locked by another process, disk full, I/O error,       11    yes
    │   │                       read-only file: a fault that can clear by itself
    │   ├── StoreUnusable       not an SQLite file, or corrupt; names the file         10    no
    │   │   └── StoreTooNew     written by a newer host-agent; names both versions     10    no
    │   └── StoreClosed         a store object used after close() (a bug)              1     no
    └── SinkError               the server side failed (PostgreSQL, a gateway)         1     no
        ├── SinkUnavailable     unreachable, timed out, connection lost, overloaded    3     yes
        │   └── SinkReadOnly    a read-only or recovering server (replica, failover)   3     yes
        ├── SinkAuthFailed      credentials or permissions refused                     4     no
        └── SchemaMismatch      tables, columns or keys missing: run `init-db`         5     no
            └── ColumnsMissing  local columns the server's table lacks (names them)    5     no

Foreign errors are translated at one boundary each: sqlite3 in `host_agent.store.faults`,
asyncpg and sockets in `host_agent.sync.postgres.errors`. Exit codes live here, on the
classes, and nowhere else; `host_agent.cli` maps an error to its code. Messages never hold
secrets.
"""

from __future__ import annotations


class HostAgentError(Exception):
    retryable = False
    exit_code = 1


class ConfigError(HostAgentError):
    exit_code = 2

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class AgentAlreadyRunning(HostAgentError):
    exit_code = 6


class TriggerError(HostAgentError):
    pass


class AgentNotRunning(TriggerError):
    exit_code = 7


class TriggerRefused(TriggerError):
    exit_code = 8


class TriggerTimedOut(TriggerError):
    retryable = True
    exit_code = 9


class EmbeddedPostgresError(HostAgentError):
    pass


class BundleRefused(HostAgentError):
    exit_code = 12


class VerifyMismatch(HostAgentError):
    exit_code = 13


class StoreError(HostAgentError):
    pass


class StoreUnavailable(StoreError):
    retryable = True
    exit_code = 11


class StoreUnusable(StoreError):
    exit_code = 10


class StoreTooNew(StoreUnusable):
    pass


class StoreClosed(StoreError):
    pass


class SinkError(HostAgentError):
    pass


class SinkUnavailable(SinkError):
    retryable = True
    exit_code = 3

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        # How long the other end asked us to wait (a gateway's Retry-After), if it said.
        self.retry_after = retry_after


class SinkReadOnly(SinkUnavailable):
    pass


class SinkAuthFailed(SinkError):
    exit_code = 4


class SchemaMismatch(SinkError):
    exit_code = 5


class ColumnsMissing(SchemaMismatch):
    def __init__(self, table: str, columns: list[str]) -> None:
        listed = ", ".join(columns)
        super().__init__(
            f"{table} in PostgreSQL lacks the local column(s) {listed}, so their values would "
            "not arrive: upgrade the server's schema (`host-agent init-db` with this version, "
            "before the agents), or set data_sync.allow_schema_alter: true to let agents add "
            "them as nullable columns"
        )
        self.table = table
        self.columns = columns


# Exit codes that are not errors of the program but outcomes a command reports.
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_TRIGGERED_SYNC_FAILED = SinkUnavailable.exit_code
