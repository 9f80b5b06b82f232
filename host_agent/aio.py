"""Small asyncio helpers shared by the agent's long-running tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def first_of(*awaitables: Awaitable[Any], seconds: float | None = None) -> None:
    """Return when the first of `awaitables` finishes or `seconds` pass, whichever
    comes first; the others are cancelled and awaited, so nothing is left pending."""
    waits = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
