"""Pairing renames: a MOVED_FROM waits for the MOVED_TO with its cookie.

The kernel queues a rename's MOVED_FROM and MOVED_TO back to back, but they may straddle two
reads; a MOVED_FROM still unpaired after `MOVE_PAIR_SECONDS`, or followed by any other event,
left the watched tree (or its pair was lost), and its source counts as deleted. A move whose
destination lies outside the watched, non-ignored tree is recorded as `deleted` at the source;
one whose source lies outside it as `created` (or `modified`) at the destination.
"""

from __future__ import annotations

from dataclasses import dataclass

MOVE_PAIR_SECONDS = 0.2


@dataclass
class MoveFrom:
    mono: float
    wall: float
    path: bytes
    directory: bytes
    name: bytes
    is_dir: bool
    ignored: bool


class PendingMoves:
    """MOVED_FROM events waiting for their MOVED_TO, by cookie, oldest first."""

    def __init__(self) -> None:
        self._by_cookie: dict[int, MoveFrom] = {}

    def __bool__(self) -> bool:
        return bool(self._by_cookie)

    def add(self, cookie: int, move: MoveFrom) -> None:
        self._by_cookie[cookie] = move

    def pair(self, cookie: int) -> MoveFrom | None:
        """The MOVED_FROM of this MOVED_TO, if it was seen."""
        return self._by_cookie.pop(cookie, None)

    def unpaired(self, watermark: float | None = None) -> list[MoveFrom]:
        """Remove and return those that waited past `watermark` (monotonic); all without."""
        if watermark is None:
            moves = list(self._by_cookie.values())
            self._by_cookie.clear()
            return moves
        stale = [c for c, m in self._by_cookie.items() if m.mono + MOVE_PAIR_SECONDS <= watermark]
        return [self._by_cookie.pop(cookie) for cookie in stale]

    def next_due(self) -> float | None:
        """When the oldest one stops waiting (monotonic), if any waits."""
        if not self._by_cookie:
            return None
        return min(m.mono for m in self._by_cookie.values()) + MOVE_PAIR_SECONDS

    def clear(self) -> None:
        self._by_cookie.clear()
