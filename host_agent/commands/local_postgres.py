"""`host-agent local-postgres start|stop|status|url`: the embedded cluster from a shell.

`url` prints a URL with the password (for scripts that need one: keep it out of logs); its
database defaults to the one the agent uses (`host_agent`), so the URL it prints is the one
`run --local-postgres` ships to.
"""

from __future__ import annotations

from pathlib import Path

from host_agent.embedded.cluster import LocalPostgres
from host_agent.embedded.server import DATABASE

DEFAULT_DIR = Path("data/postgres")


def main(action: str, directory: Path, *, port: int | None, timeout: float, db: str) -> int:
    pg = LocalPostgres(directory, port=port)
    if action == "start":
        pg.start(timeout=timeout)
    elif action == "stop":
        pg.stop(timeout=timeout)
    elif action == "status":
        running = pg.is_running()
        print("running" if running else "stopped")
        return 0 if running else 3
    else:
        print(pg.url(db))
    return 0


__all__ = ["DATABASE", "DEFAULT_DIR", "main"]
