"""The watched tree: inotify events, lost events and lost watches applied, in kernel order, to
the snapshot, the watches and the pending rows. Runs on the processor thread only.

Created, deleted and moved directories get rows; a directory moved within the roots is one
`moved` row naming its source, its contents are not repeated. A move from one root to another
is a deletion in the first and a creation in the second. Missing roots are logged and checked
again every `retry_seconds`; a root that disappears while watched (removed, or moved away) gets
`deleted` rows for what was known inside it and is handled the same way; once it is there
again, everything in it gets a `created` row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from watchdog.observers.inotify_c import InotifyConstants, WatchDescriptor

from host_agent.collectors.filesystem.coalescer import (
    CREATED,
    DELETED,
    MODIFIED,
    Coalescer,
    destination_kind,
)
from host_agent.collectors.filesystem.moves import MoveFrom, PendingMoves
from host_agent.collectors.filesystem.paths import join
from host_agent.collectors.filesystem.relay import Raw, Relay
from host_agent.collectors.filesystem.roots import Root, root_of
from host_agent.collectors.filesystem.snapshot import DIR, LINK, Directory, Snapshot
from host_agent.collectors.filesystem.watches import WatchSet

_C = InotifyConstants


class WatchedTree:
    """`overflows` counts rescans after lost events. `hidden` is a path of the collector's own
    (the shutdown fence) that is never recorded."""

    def __init__(
        self,
        roots: list[Root],
        *,
        snapshot: Snapshot,
        watches: WatchSet,
        changes: Coalescer,
        relay: Relay,
        forget_projects: Callable[[], None],
        log: Any,
        clock: Callable[[], float],
        retry_seconds: float,
    ) -> None:
        self.roots = roots
        self._snapshot = snapshot
        self._watches = watches
        self._changes = changes
        self._relay = relay
        self._forget_projects = forget_projects
        self._log = log
        self._clock = clock
        self._retry_seconds = retry_seconds
        self.moves = PendingMoves()
        self.hidden: bytes | None = None
        self.overflows = 0

    # --- roots -----------------------------------------------------------------------------

    def watch_root(self, root: Root, *, record: bool) -> bool:
        """Start watching a root that is not watched, walking all of it; with `record`, all
        its content gets `created` rows (a root found again while running: what was known
        inside got `deleted` rows when it was lost). False if it is not there."""
        if not os.path.isdir(root.path):
            self._log.warning(
                "fs.root_missing",
                root=root.text,
                retry_seconds=self._retry_seconds,
                detail="not an existing directory; skipped until it appears",
            )
            return False
        root.watched = True
        self._snapshot.adopt(
            root.path, root, record=record, mono=time.monotonic(), wall=self._clock()
        )
        self._forget_projects()
        return True

    def retry_root(self, root: Root) -> None:
        if os.path.isdir(root.path):
            self._log.info("fs.root_watched", root=root.text)
            if self.watch_root(root, record=True):
                parent = os.path.dirname(root.path)
                if not any(not r.watched and os.path.dirname(r.path) == parent
                           for r in self.roots):
                    self._watches.unwatch_parent(parent)

    def await_root(self, root: Root) -> None:
        """`root` is missing: besides the retry every `retry_seconds`, its parent directory's
        watch says when something of its name appears there."""
        parent = os.path.dirname(root.path)
        if parent != root.path:
            self._watches.watch_parent(parent)
        self.retry_root(root)  # it may have come back before the watch was there

    def _root_lost(self, root: Root, how: str) -> None:
        now, wall = time.monotonic(), self._clock()
        self._log.warning(
            "fs.root_lost", root=root.text, how=how, retry_seconds=self._retry_seconds
        )
        root.watched = False
        self._snapshot.forget(root.path, record=True, mono=now, wall=wall)
        self.await_root(root)

    def _parent_event(self, parent: bytes, name: bytes) -> None:
        """Something appeared in the directory holding missing roots."""
        path = join(parent, name)
        for root in self.roots:
            if not root.watched and root.path == path:
                self.retry_root(root)

    # --- events ----------------------------------------------------------------------------

    def on_event(self, raw: Raw) -> None:
        event = raw.event
        mask = event.mask
        directory = self._watches.path_of(event.wd)
        if directory is None:
            holder = self._watches.parent_path(event.wd)
            if holder is not None and event.name:
                self._parent_event(holder, event.name)
            return
        parent = self._snapshot.dirs.get(directory)
        if parent is None:
            return
        if not mask & _C.IN_MOVE and self.moves:
            # Anything but a rename between a MOVED_FROM and its MOVED_TO means the pair is
            # not coming: resolve first, so changes stay in kernel order.
            for move in self.moves.unpaired():
                self.unpaired_from(move)
        name = event.name
        if not name:
            if mask & _C.IN_MOVE_SELF and directory == parent.root.path:
                self._root_lost(parent.root, "moved")
            return
        if name == b".git":
            self._forget_projects()
        path = join(directory, name)
        if path == self.hidden:
            return
        is_dir = bool(mask & _C.IN_ISDIR)
        ignored = self._snapshot.ignored(name)
        if mask & _C.IN_MOVED_FROM:
            self.moves.add(
                event.cookie, MoveFrom(raw.mono, raw.wall, path, directory, name, is_dir, ignored)
            )
        elif mask & _C.IN_MOVED_TO:
            source = self.moves.pair(event.cookie)
            self._moved(source, parent, directory, name, is_dir, ignored, raw)
        elif ignored:
            return
        elif mask & _C.IN_CREATE:
            self._created(parent, path, name, is_dir, raw.mono, raw.wall)
        elif mask & _C.IN_DELETE:
            self._removed(parent, path, name, is_dir, raw.mono, raw.wall)
        elif mask & (_C.IN_MODIFY | _C.IN_ATTRIB):
            self._changes.change(
                path, MODIFIED, parent.root, is_dir=is_dir, mono=raw.mono, wall=raw.wall
            )

    def _created(
        self, parent: Directory, path: bytes, name: bytes, is_dir: bool, mono: float, wall: float
    ) -> None:
        if name in parent.entries:
            # Already seen by the scan of a new directory (or the baseline scan) that raced
            # with this event; a real re-creation would have been preceded by a delete.
            return
        parent.entries[name] = DIR if is_dir else 0
        self._changes.change(path, CREATED, parent.root, is_dir=is_dir, mono=mono, wall=wall)
        if is_dir:
            self._snapshot.adopt(path, parent.root, record=True, mono=mono, wall=wall)

    def _removed(
        self,
        parent: Directory | None,
        path: bytes,
        name: bytes,
        is_dir: bool,
        mono: float,
        wall: float,
    ) -> None:
        known = parent.entries.pop(name, None) if parent is not None else None
        root = parent.root if parent is not None else root_of(self.roots, path)
        if root is None:
            return
        if is_dir:
            self._snapshot.forget(path, record=True, mono=mono, wall=wall)
        was_link = known is not None and bool(known & LINK)
        self._changes.change(
            path, DELETED, root, is_dir=is_dir, mono=mono, wall=wall, was_link=was_link
        )

    def unpaired_from(self, move: MoveFrom) -> None:
        """A rename out of the watched tree (or the pair was lost): the source is gone."""
        if move.ignored:
            return
        self._removed(
            self._snapshot.dirs.get(move.directory),
            move.path,
            move.name,
            move.is_dir,
            move.mono,
            move.wall,
        )

    def _moved(
        self,
        source: MoveFrom | None,
        parent: Directory,
        directory: bytes,
        name: bytes,
        is_dir: bool,
        ignored: bool,
        raw: Raw,
    ) -> None:
        path = join(directory, name)
        mono, wall, root = raw.mono, raw.wall, parent.root
        if source is not None and not source.ignored and ignored:
            self.unpaired_from(source)
            return
        if ignored:
            return
        existed = parent.entries.get(name)
        replaced = existed is not None and not is_dir and not existed & DIR
        if source is None or source.ignored:
            # Moved in from outside, or an editor's temporary file renamed into place.
            if is_dir and existed is not None:
                self._snapshot.forget(path, record=False, mono=mono, wall=wall)
            parent.entries[name] = DIR if is_dir else 0
            self._changes.arrived(
                path, root, is_dir=is_dir, replaced=replaced, mono=mono, wall=wall
            )
            if is_dir:
                self._snapshot.adopt(path, root, record=True, mono=mono, wall=wall)
            return
        source_dir = self._snapshot.dirs.get(source.directory)
        if source_dir is not None and source_dir.root is not root:
            # From one root to another: each root's rows replay on their own, so the source
            # root records a deletion and this one a creation.
            self.unpaired_from(source)
            self._moved(None, parent, directory, name, is_dir, ignored, raw)
            return
        known = source_dir.entries.pop(source.name, None) if source_dir is not None else None
        was_link = known is not None and bool(known & LINK)
        if not is_dir:
            parent.entries[name] = known if known is not None else 0
            self._changes.renamed(
                source.path, path, root, replaced=replaced, mono=mono, wall=wall, was_link=was_link
            )
            return
        # Born within the window and renamed: a temporary name, not worth a row of its own.
        temporary = self._changes.renamed_from(source.path)
        self._changes.emit_below(path)  # what was there before comes first
        if existed is not None and path in self._snapshot.dirs:
            self._snapshot.forget(path, record=False, mono=mono, wall=wall)
        parent.entries[name] = DIR
        self._snapshot.rename(source.path, path, root)
        self._forget_projects()
        if temporary or not self._watches.is_watched(path):
            # Renamed before its creation was processed (so never watched or listed), or
            # never watched: content made meanwhile would be missed. Rows for what is
            # already known are not repeated.
            self._snapshot.adopt(path, root, record=True, mono=mono, wall=wall)
        kind = destination_kind(moved=not temporary, replaced=False)
        self._changes.change(
            path,
            kind,
            root,
            is_dir=True,
            mono=mono,
            wall=wall,
            was_link=was_link,
            source=source.path,
        )
        # The source's pending rows move along, after the directory's own row.
        self._changes.rekey(source.path, path, root)

    def on_watch_gone(self, wd: WatchDescriptor) -> None:
        path = self._watches.gone(wd)
        directory = self._snapshot.dirs.get(path) if path is not None else None
        if directory is not None and path == directory.root.path and directory.root.watched:
            self._root_lost(directory.root, "removed")

    # --- lost events and refused watches ---------------------------------------------------

    def rescan(self) -> None:
        """Events were lost: rescan every watched root against the snapshot."""
        self.overflows += 1
        self._log.warning(
            "fs.events_lost",
            detail="inotify event queue overflowed; rescanning the roots to record what changed",
            roots=[r.text for r in self.roots if r.watched],
            overflows=self.overflows,
        )
        self._relay.resume()
        self.moves.clear()
        self._forget_projects()
        mono, wall = time.monotonic(), self._clock()
        for root in self.roots:
            if root.watched:
                self._snapshot.rescan(root.path, root, mono, wall, rewatch=True)

    def retry_refused(self) -> None:
        mono, wall = time.monotonic(), self._clock()
        self._watches.retry_refused(lambda path: self._rewatch(path, mono, wall))

    def _rewatch(self, path: bytes, mono: float, wall: float) -> bool:
        """Watch a directory the limit refused, then rescan it so changes made while it was
        unwatched are recorded. False only if the limit refuses it again."""
        directory = self._snapshot.dirs.get(path)
        if directory is None or self._watches.is_watched(path):
            self._watches.forget_refusal(path)  # forgotten or watched meanwhile
            return True
        if self._snapshot.watch(path, directory):
            self._snapshot.rescan(path, directory.root, mono, wall, rewatch=False)
            return True
        if self._watches.is_refused(path):
            return False
        # Gone meanwhile. A subdirectory's deletion is recorded through its parent (an event,
        # or the parent's own rescan); a root has no parent to report it.
        root = directory.root
        if path == root.path and root.watched and not os.path.isdir(path):
            self._root_lost(root, "removed")
        return True
