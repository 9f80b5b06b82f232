"""Throwaway PostgreSQL clusters for tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from host_agent.embedded.cluster import LocalPostgres, LocalPostgresError, find_bin_dir
from support.ci import unavailable


def require_pg_binaries() -> Path:
    """The PostgreSQL bin dir; skips the test without one, fails it on CI."""
    try:
        return find_bin_dir()
    except LocalPostgresError as exc:
        unavailable(f"PostgreSQL tests: {exc}")


@contextmanager
def _scratch_dir() -> Iterator[Path]:
    # Under /tmp, not pytest's tmp_path: that is private to root, and as root the server
    # runs as the postgres user.
    base = Path(tempfile.mkdtemp(prefix="host-agent-pg-", dir="/tmp"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def cluster_template() -> Iterator[LocalPostgres]:
    """An initialized, never started cluster to copy: initdb once instead of per test."""
    bin_dir = require_pg_binaries()
    with _scratch_dir() as base:
        template = LocalPostgres(base, bin_dir=bin_dir)
        template.ensure_initialized()
        yield template


@contextmanager
def temporary_cluster(template: LocalPostgres | None = None) -> Iterator[LocalPostgres]:
    """A started cluster in a fresh directory, stopped and deleted on exit. From a copy of
    `template`'s data directory when given, with its own port and password."""
    bin_dir = require_pg_binaries() if template is None else template.bin_dir
    with _scratch_dir() as base:
        if template is not None:
            copy_template(template, base)
        pg = LocalPostgres(base, bin_dir=bin_dir)
        try:
            pg.start()
            yield pg
        finally:
            pg.stop(mode="immediate")


def copy_template(template: LocalPostgres, base_dir: Path) -> None:
    """Give base_dir (existing, to be a LocalPostgres base dir) a copy of the template's
    data directory; LocalPostgres then skips initdb and makes its own credentials."""
    # cp -a keeps the postgres user's ownership when we are root.
    subprocess.run(
        ["cp", "-a", str(template.pgdata), str(base_dir / "pgdata")],
        check=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def unique_db_name(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"
