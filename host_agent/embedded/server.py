"""The embedded default: run the agent against a PostgreSQL cluster it starts itself.

Used by `host-agent run --local-postgres DIR` (and so by `scripts/run.sh`) when no
`database.postgres_url` is configured: the cluster is created under DIR on first use, started,
given the schema, and stopped again when the agent exits, unless another live agent (on other
data) shares it: the agent that holds the cluster's owner lock stops it.

The agent's data lock is taken before the cluster is touched, so a second `run` on the same
data exits naming the running agent without disturbing its PostgreSQL.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from pydantic import SecretStr

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import initialize
from host_agent.daemon.lock import AgentLock
from host_agent.embedded.cluster import LocalPostgres, LocalPostgresError
from host_agent.errors import AgentAlreadyRunning, EmbeddedPostgresError
from host_agent.logging import register_secret
from host_agent.urls import redact_url

DATABASE = "host_agent"
log = structlog.get_logger("host_agent.embedded")


def _start(directory: Path, owner: bool) -> str:
    """Start the cluster (a no-op if it runs) and return the database URL. An owner stops it
    again if this fails."""
    pg = LocalPostgres(directory)
    pg.ensure_initialized()
    register_secret(pg.password)
    pg.start()
    try:
        exists = pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'").strip()
        if not exists:
            pg.create_database(DATABASE)
    except BaseException:
        if owner:
            pg.stop()
        raise
    return pg.url(DATABASE)


def _claim(directory: Path) -> AgentLock | None:
    """The cluster's owner lock, held while an agent uses the cluster; None when another
    live agent (on other data) holds it. A cluster running with nobody holding it was left
    behind by an agent that died (SIGKILL, OOM): the new owner adopts it, and stops it."""
    directory.mkdir(parents=True, exist_ok=True)
    owner = AgentLock([directory / "cluster"])
    try:
        owner.acquire()
    except AgentAlreadyRunning:
        return None
    return owner


def _stop(directory: Path) -> None:
    LocalPostgres(directory).stop()


def with_url(config: AgentConfig, url: str) -> AgentConfig:
    database = config.database.model_copy(update={"postgres_url": SecretStr(url)})
    return config.model_copy(update={"database": database})


async def run_with_local_postgres(config: AgentConfig, directory: str | Path) -> None:
    from host_agent.daemon.agent import data_lock, run_agent

    path = Path(directory)
    lock = data_lock(config)
    lock.acquire()  # AgentAlreadyRunning (exit 6) before anything else is touched
    owner: AgentLock | None = None
    try:
        owner = await asyncio.to_thread(_claim, path)
        try:
            url = await asyncio.to_thread(_start, path, owner is not None)
        except LocalPostgresError as exc:
            raise EmbeddedPostgresError(
                f"cannot start the local PostgreSQL in {path}: {exc}"
            ) from None
        try:
            log.info(
                "embedded_postgres.started" if owner else "embedded_postgres.shared",
                directory=str(path),
                url=redact_url(url),
            )
            config = with_url(config, url)
            await initialize(config)
            await run_agent(config, lock)
        finally:
            if owner is not None:
                await asyncio.to_thread(_stop, path)
                log.info("embedded_postgres.stopped", directory=str(path))
    finally:
        if owner is not None:
            owner.release()
        lock.release()
