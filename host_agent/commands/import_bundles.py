"""`host-agent import FILE...`: apply bundles carried by hand, where PostgreSQL is reachable.

Each bundle is checked whole first (a truncated, reordered or altered file is refused and
nothing written), then applied in one transaction with the same code as the gateway
(`sync/postgres/apply.py`); its receipt is written next to it as `FILE.receipt.json`, to carry
back to the host for `host-agent ack`.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from host_agent.config import AgentConfig
from host_agent.daemon.assembly import require_url
from host_agent.errors import BundleRefused
from host_agent.sync.bundle import BundleHead, bundle_rows, check_bundle
from host_agent.sync.postgres.apply import Receipt, apply_bundle
from host_agent.sync.postgres.codecs import use_row_codecs
from host_agent.sync.postgres.connect import connected


@dataclass(frozen=True)
class Imported:
    path: Path
    receipt_path: Path
    receipt: Receipt


def receipt_path_for(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".receipt.json")


def _write_receipt(path: Path, receipt: Receipt) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(receipt.as_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


async def import_bundles(config: AgentConfig, paths: list[Path]) -> list[Imported]:
    url = require_url(config)
    sync = config.data_sync
    heads: list[tuple[Path, BundleHead]] = []
    for path in paths:  # every file checked before any is applied
        try:
            heads.append((path, await asyncio.to_thread(check_bundle, path)))
        except BundleRefused as exc:
            raise BundleRefused(f"{path}: {exc}") from None
    done: list[Imported] = []
    async with connected(
        url,
        connect_timeout=sync.connect_timeout_seconds,
        command_timeout=sync.command_timeout_seconds,
    ) as conn:
        await use_row_codecs(conn)
        for path, head in heads:
            # Read again row by row as they are applied: a bundle never has to fit in memory.
            receipt = await apply_bundle(
                conn, head, bundle_rows(path), via="import",
                command_timeout=sync.command_timeout_seconds,
            )  # fmt: skip
            target = receipt_path_for(path)
            await asyncio.to_thread(_write_receipt, target, receipt)
            done.append(Imported(path, target, receipt))
    return done
