"""The replay rule: which paths a root's `file_change_events` rows say exist. Pure.

Rows are replayed in the order they were written (local id, or `source_id` on the server):

    created, modified   the path exists
    deleted             the path no longer exists (exactly that path: what was inside a
                        deleted directory has rows of its own, as `rm -r` would make)
    moved               the source (`previous_path`) and everything below it no longer exist
                        there: they exist below the destination (`file_path`) instead, and the
                        destination exists. A directory's move is one row; its contents follow
                        it. A `moved` row without a source (written before sources were kept)
                        only says the destination exists.

The persistent snapshot (`host_agent.store.snapshot`) follows the same rule, row by row, and
`scripts/replay_check.py` compares its result with the disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class Change(NamedTuple):
    event_type: str
    path: bytes
    previous_path: bytes | None = None


class Replay:
    """The paths present after the rows fed so far (absolute, bytes)."""

    def __init__(self) -> None:
        self.present: set[bytes] = set()
        # Every path ever added, by parent, so a move finds what lies below its source even
        # when a directory itself has no row (its content was recorded before it).
        self._children: dict[bytes, set[bytes]] = {}

    def apply(self, change: Change) -> None:
        kind, path, source = change
        if kind == "deleted":
            self.present.discard(path)
        elif kind == "moved" and source is not None and source != path:
            self._move(source, path)
        else:
            self._add(path)

    def _add(self, path: bytes) -> None:
        self.present.add(path)
        child = path
        while True:
            parent = child.rpartition(b"/")[0]
            if not parent:
                return
            names = self._children.setdefault(parent, set())
            if child in names:
                return
            names.add(child)
            child = parent

    def _below(self, top: bytes) -> list[bytes]:
        found: list[bytes] = []
        stack = [top]
        while stack:
            for child in self._children.get(stack.pop(), ()):
                if child in self.present:
                    found.append(child)
                stack.append(child)
        return found

    def _move(self, source: bytes, target: bytes) -> None:
        moving = self._below(source)
        for path in moving:
            self.present.discard(path)
        self.present.discard(source)
        self._add(target)
        for path in moving:
            self._add(target + path[len(source) :])


def replay(changes: Iterable[Change]) -> set[bytes]:
    """The paths the rows say exist."""
    state = Replay()
    for change in changes:
        state.apply(change)
    return state.present
