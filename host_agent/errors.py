"""host-agent's errors, grouped by whether retrying can help.

    HostAgentError              base; `retryable` says whether trying again later can help
    ├── ConfigError             bad configuration: names the key (exit code 2)      not retryable
    ├── StoreError              the local SQLite store failed                        not retryable
    │   └── StoreClosed         a store object was used after close()                not retryable
    ├── AgentAlreadyRunning     another agent holds this data directory's lock       not retryable
    └── SinkError               the PostgreSQL side failed
        ├── SinkUnavailable     unreachable, timed out, connection lost, conflict    retryable
        ├── SinkAuthFailed      authentication or permission refused                 not retryable
        └── SchemaMismatch      tables or columns missing: run `host-agent init-db`  not retryable

Foreign errors (asyncpg, OSError, sqlite3) are translated into these at one boundary each:
`host_agent.sync.pg_errors` for PostgreSQL. Messages never contain secrets.
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


class StoreError(HostAgentError):
    pass


class StoreClosed(StoreError):
    pass


class AgentAlreadyRunning(HostAgentError):
    exit_code = 6


class SinkError(HostAgentError):
    pass


class SinkUnavailable(SinkError):
    retryable = True
    exit_code = 3


class SinkAuthFailed(SinkError):
    exit_code = 4


class SchemaMismatch(SinkError):
    exit_code = 5
