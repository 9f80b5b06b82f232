"""The directory snapshot: what is known below the roots, per directory, and the walks that
bring it up to date (adopting a new directory, rescanning after lost events, forgetting a tree
that left).

The collector walks the tree itself and places one non-recursive watch per directory it walks,
skipping ignored names, so an ignored tree (`node_modules`, `.git`) costs no watch and produces
no event. Ignore patterns (fnmatch, case-sensitive) are matched against each path component
below a root; a root itself is never ignored. Symlinks are never followed.

A directory that appears (mkdir, moved in, copied in) is watched and then listed, and
everything already inside gets a `created` row, so files made before its watch existed
(`mkdir -p a/b/c && touch a/b/c/f`) are not missed; a directory that leaves the tree (moved
out, or a root moved away) gets `deleted` rows for everything known inside it, as `rm -r`
would. The start walk records nothing itself: its result is compared with the persistent
snapshot afterwards (`catchup`).

After lost events every root is rescanned against the snapshot (per directory: name -> kind
and a fingerprint of mtime and size); what changed since the last known state is recorded as
created / modified / deleted (a move during the outage shows as deleted + created).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from host_agent.collectors.filesystem.coalescer import CREATED, DELETED, MODIFIED, Coalescer
from host_agent.collectors.filesystem.paths import join, text
from host_agent.collectors.filesystem.roots import Root
from host_agent.collectors.filesystem.watches import WatchSet
from host_agent.store.snapshot import DIRECTORY, SYMLINK, Entry

# Snapshot entries are small ints: two flag bits and a fingerprint of (mtime_ns, size), so a
# large tree stays cheap to hold. An entry learnt from an event holds only the flags until its
# row is written (which stats the file anyway).
DIR = 1
LINK = 2
_FINGERPRINT_MASK = (1 << 60) - 1


def entry(st: os.stat_result) -> int:
    if stat.S_ISDIR(st.st_mode):
        return DIR  # a directory's times change with every entry; its entries are the state
    flags = LINK if stat.S_ISLNK(st.st_mode) else 0
    return ((hash((st.st_mtime_ns, st.st_size)) & _FINGERPRINT_MASK) << 2) | flags


def fingerprint(known: Entry) -> int | None:
    """The in-memory entry for what the persistent snapshot knew (as `entry` makes it from a
    stat); None when it knew no size or mtime, which then matches nothing."""
    if known.kind == DIRECTORY:
        return DIR
    if known.size is None or known.mtime_ns is None:
        return None
    flags = LINK if known.kind == SYMLINK else 0
    return ((hash((known.mtime_ns, known.size)) & _FINGERPRINT_MASK) << 2) | flags


def ignore_matcher(patterns: Iterable[str]) -> re.Pattern[str] | None:
    translated = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(translated)) if translated else None


@dataclass
class Directory:
    root: Root
    entries: dict[bytes, int] = field(default_factory=dict)


class Snapshot:
    """Known directories by path. Changes found by its walks go to `changes`; watches are
    placed through `watches`. Used by the processor thread only; `stopping` cuts a baseline
    walk (or a rescan) short."""

    def __init__(
        self,
        ignore: re.Pattern[str] | None,
        watches: WatchSet,
        changes: Coalescer,
        log: Any,
        stopping: threading.Event,
    ) -> None:
        self._ignore = ignore
        self._watches = watches
        self._changes = changes
        self._log = log
        self._stopping = stopping
        self.dirs: dict[bytes, Directory] = {}

    def ignored(self, name: bytes) -> bool:
        return self._ignore is not None and self._ignore.match(os.fsdecode(name)) is not None

    def directory(self, path: bytes, root: Root) -> Directory:
        """The known directory at `path`, made known (empty) if it was not."""
        found = self.dirs.get(path)
        if found is None:
            found = self.dirs[path] = Directory(root)
        return found

    def watch(self, path: bytes, directory: Directory) -> bool:
        return self._watches.watch(path, root=path == directory.root.path)

    def refresh(self, path: bytes, st: os.stat_result) -> None:
        """`path` was just stat'ed (to write its row): remember its fingerprint."""
        parent_path, name = os.path.split(path)
        parent = self.dirs.get(parent_path)
        if parent is not None and name in parent.entries:
            parent.entries[name] = entry(st)

    def adopt(self, top: bytes, root: Root, *, record: bool, mono: float, wall: float) -> None:
        """Watch `top` and every non-ignored directory below it, each before listing it, so
        anything created after a listing arrives as an event. Only a baseline walk gives way to
        a stop: a new directory's content is recorded in full."""
        stack = [top]
        while stack and (record or not self._stopping.is_set()):
            path = stack.pop()
            directory = self.directory(path, root)
            if not self._watches.is_watched(path):
                self.watch(path, directory)
            for name, found in self.listing(path).items():
                known = name in directory.entries
                directory.entries[name] = found
                if record and not known:
                    self._changes.change(
                        join(path, name),
                        CREATED,
                        root,
                        is_dir=bool(found & DIR),
                        mono=mono,
                        wall=wall,
                    )
                if found & DIR:
                    stack.append(join(path, name))

    def rescan(self, top: bytes, root: Root, mono: float, wall: float, *, rewatch: bool) -> None:
        """Record what changed below `top` since the snapshot, and watch what is not watched.
        With `rewatch`, after an overflow, every watch is renewed (a lost move may have left
        one under a stale path) and every directory listed; without it only `top` and the
        directories below it that were not watched, whose snapshot may be stale."""
        stack = [top]
        while stack and not self._stopping.is_set():
            path = stack.pop()
            known = path in self.dirs
            directory = self.directory(path, root)
            watched = known and self._watches.is_watched(path)
            if known and not rewatch and path != top and watched:
                continue  # watched all along, so its snapshot is current
            if rewatch or not watched:
                self.watch(path, directory)
            if not os.path.isdir(path):
                continue  # vanished meanwhile; its parent's listing records that
            fresh = self.listing(path)
            old = directory.entries
            for name, now in fresh.items():
                child = join(path, name)
                before = old.get(name)
                is_dir = bool(now & DIR)
                if before is not None and bool(before & DIR) != is_dir:
                    if before & DIR:
                        self.forget(child, record=True, mono=mono, wall=wall)
                    self._changes.change(
                        child, DELETED, root, is_dir=not is_dir, mono=mono, wall=wall
                    )
                    before = None
                if before is None:
                    self._changes.change(child, CREATED, root, is_dir=is_dir, mono=mono, wall=wall)
                elif not is_dir and before != now:
                    self._changes.change(child, MODIFIED, root, is_dir=False, mono=mono, wall=wall)
                if is_dir:
                    stack.append(child)
            for name, before in old.items():
                if name not in fresh:
                    child = join(path, name)
                    if before & DIR:
                        self.forget(child, record=True, mono=mono, wall=wall)
                    self._deleted(child, before, root, mono, wall)
            directory.entries = fresh

    def listing(self, path: bytes) -> dict[bytes, int]:
        """The non-ignored entries of directory `path` now (empty if it is gone)."""
        entries: dict[bytes, int] = {}
        try:
            with os.scandir(path) as listing:
                for item in listing:
                    name = item.name
                    if self.ignored(name):
                        continue
                    try:
                        entries[name] = entry(item.stat(follow_symlinks=False))
                    except OSError:
                        continue
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._log.warning("fs.list_failed", path=text(path)[0], error=str(exc))
        return entries

    def subtree(self, path: bytes) -> list[bytes]:
        """`path` and the known directories below it, found through the snapshot's entries so
        that removing a directory costs its own size, not the whole tree's."""
        found: list[bytes] = []
        stack = [path]
        while stack:
            current = stack.pop()
            directory = self.dirs.get(current)
            if directory is None:
                continue
            found.append(current)
            stack.extend(
                join(current, name) for name, kind in directory.entries.items() if kind & DIR
            )
        return found

    def forget(self, path: bytes, *, record: bool, mono: float, wall: float) -> None:
        """The directory `path` and everything below it left the tree; with `record`, each
        entry known inside gets a `deleted` row, as `rm -r` would."""
        for directory_path in self.subtree(path):
            directory = self.dirs.pop(directory_path)
            self._watches.forget(directory_path)
            if record:
                for name, known in directory.entries.items():
                    self._deleted(join(directory_path, name), known, directory.root, mono, wall)

    def _deleted(self, path: bytes, known: int, root: Root, mono: float, wall: float) -> None:
        """The entry known as `known` at `path` is gone: a `deleted` row."""
        self._changes.change(
            path,
            DELETED,
            root,
            is_dir=bool(known & DIR),
            mono=mono,
            wall=wall,
            was_link=bool(known & LINK),
        )

    def rename(self, source: bytes, target: bytes, root: Root) -> None:
        """The directory `source` is now `target`, watches and all."""
        for old in self.subtree(source):
            directory = self.dirs.pop(old)
            new = target + old[len(source) :]
            directory.root = root
            self.dirs[new] = directory
            self._watches.rename(old, new)
