"""The inotify instance and its watches: one non-recursive watch per directory, by path and by
watch descriptor, and the directories the watch limit refused.

All roots share one inotify instance (watchdog's `InotifyFD`: one instance, one reader thread).
When the inotify watch limit is reached, one warning names `fs.inotify.max_user_watches` and
the command to raise it; directories that could not be watched are still scanned (their
content is the baseline), but changes in them are not seen as they happen. Every
`retry_seconds` the collector asks again for their watches (`retry_refused`), so raising the
sysctl (or watches freed elsewhere) takes effect without a restart; each directory that gets
its watch is rescanned, recording what changed while it was unwatched. While the limit still
refuses, a round costs one refused call. Once every directory is watched an info message says
so, and the next time the limit is reached warns again.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyFD,
    Mask,
    WatchDescriptor,
)

from host_agent.collectors.filesystem.paths import text
from host_agent.collectors.filesystem.relay import Relay

WATCH_LIMIT_SYSCTL = "fs.inotify.max_user_watches"
SUGGESTED_WATCH_LIMIT = 524_288

_C = InotifyConstants
WATCH_MASK = Mask(
    _C.IN_CREATE
    | _C.IN_DELETE
    | _C.IN_MOVED_FROM
    | _C.IN_MOVED_TO
    | _C.IN_MODIFY
    | _C.IN_ATTRIB
    | _C.IN_ONLYDIR
    | _C.IN_DONT_FOLLOW
    | _C.IN_EXCL_UNLINK
)
# A root may be configured as a symlink to a directory, so its watch follows links; it also
# reports its own removal or move, which a subdirectory's parent watch reports for the others.
ROOT_MASK = Mask((WATCH_MASK | _C.IN_DELETE_SELF | _C.IN_MOVE_SELF) & ~_C.IN_DONT_FOLLOW)
# The directory holding a missing root: tells when something of the root's name appears.
PARENT_MASK = Mask(_C.IN_CREATE | _C.IN_MOVED_TO | _C.IN_ONLYDIR)


@dataclass
class _Watch:
    wd: WatchDescriptor
    callback_id: CallbackId


class WatchSet:
    """Watches placed through one inotify instance, whose events go to `relay`. Used by the
    processor thread only. `limit_hits` counts watch requests refused for the limit, retries
    included."""

    def __init__(self, relay: Relay, log: Any, retry_seconds: float) -> None:
        self._relay = relay
        self._log = log
        self._retry_seconds = retry_seconds
        self._fd: InotifyFD | None = None
        self._ids = itertools.count(1)
        self._by_path: dict[bytes, _Watch] = {}
        self._paths: dict[WatchDescriptor, bytes] = {}
        # Directories whose watch the inotify limit refused, to be asked again.
        self._refused: set[bytes] = set()
        # Parents of missing roots, watched for the root's return (apart from the tree).
        self._parents: dict[bytes, _Watch] = {}
        self._parent_paths: dict[WatchDescriptor, bytes] = {}
        self._limit_logged = False
        self.limit_hits = 0

    @property
    def active(self) -> bool:
        """Open, and not yet closed: watches can be placed."""
        return self._fd is not None

    @property
    def count(self) -> int:
        """Directories watched now."""
        return len(self._paths)

    @property
    def refused(self) -> int:
        """Directories the watch limit refused, waiting for a retry."""
        return len(self._refused)

    def open(self) -> None:
        """Create the inotify instance and start its reader; raises OSError if it cannot."""
        fd = InotifyFD()
        fd.start()
        self._fd = fd

    def close(self) -> None:
        """Stop reading: what the kernel still holds is discarded (see the shutdown fence)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            fd.stop()
            fd.join()

    def watch(self, path: bytes, *, root: bool) -> bool:
        """Place (or renew) the watch on `path`; True if it is watched now. A refusal for the
        watch limit keeps `path` to be asked again; other failures (gone, permission) are not
        retried, since asking again would not help."""
        fd = self._fd
        if fd is None:
            return False
        callback_id = CallbackId(next(self._ids))
        try:
            wd = fd.add_callback(path, ROOT_MASK if root else WATCH_MASK, self._relay, callback_id)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._refused.add(path)
                self._limit_reached(path)
                return False
            self._refused.discard(path)
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._log.warning("fs.watch_failed", path=text(path)[0], error=str(exc))
            return False
        self._refused.discard(path)
        if wd < 0:
            # watchdog returns -1 instead of raising for EACCES; undo its bookkeeping.
            fd.remove_callbacks([(wd, callback_id)])
            self._log.warning("fs.watch_failed", path=text(path)[0], error="permission denied")
            return False
        # inotify returns the existing descriptor when this inode is already watched (a
        # rescan, a move missed in an overflow): keep one callback per watch so each event
        # arrives once.
        previous_path = self._paths.get(wd)
        if previous_path is not None:
            other = self._by_path.get(previous_path)
            if other is not None and other.wd == wd:
                fd.remove_callbacks([(wd, other.callback_id)])
                del self._by_path[previous_path]
        old = self._by_path.get(path)
        if old is not None:
            # The old descriptor died while its IN_IGNORED was lost.
            fd.remove_callbacks([(old.wd, old.callback_id)])
            self._paths.pop(old.wd, None)
        self._by_path[path] = _Watch(wd, callback_id)
        self._paths[wd] = path
        return True

    def watch_marker(self, path: bytes) -> WatchDescriptor | None:
        """A watch for creations in `path`, kept apart from the directories (the shutdown
        fence's); None when closed. Raises OSError if it cannot be placed."""
        if self._fd is None:
            return None
        return self._fd.add_callback(
            path, _C.IN_CREATE, self._relay, CallbackId(next(self._ids))
        )

    def watch_parent(self, path: bytes) -> bool:
        """Watch the directory `path`, which holds a missing root, for entries appearing in it;
        True if it is watched now. A failure (gone, the watch limit) only leaves the root to
        the periodic retry."""
        fd = self._fd
        if fd is None:
            return False
        if path in self._parents:
            return True
        callback_id = CallbackId(next(self._ids))
        try:
            wd = fd.add_callback(path, PARENT_MASK, self._relay, callback_id)
        except OSError:
            return False
        if wd < 0 or wd in self._paths:
            # Not readable, or (a bind mount) the same directory as one of the tree's: its
            # watch must keep the tree's mask.
            fd.remove_callbacks([(wd, callback_id)])
            return False
        self._parents[path] = _Watch(wd, callback_id)
        self._parent_paths[wd] = path
        return True

    def parent_path(self, wd: WatchDescriptor) -> bytes | None:
        """The directory `wd` watches for a missing root, if it is such a watch."""
        return self._parent_paths.get(wd)

    def unwatch_parent(self, path: bytes) -> None:
        watch = self._parents.pop(path, None)
        if watch is None:
            return
        self._parent_paths.pop(watch.wd, None)
        if self._fd is not None:
            try:
                self._fd.remove_callbacks([(watch.wd, watch.callback_id)])
            except OSError as exc:
                self._log.debug("fs.unwatch_failed", error=str(exc))

    def is_watched(self, path: bytes) -> bool:
        return path in self._by_path

    def is_refused(self, path: bytes) -> bool:
        """The watch limit refused `path`; it is asked for again in `retry_refused`."""
        return path in self._refused

    def forget_refusal(self, path: bytes) -> None:
        self._refused.discard(path)

    def path_of(self, wd: WatchDescriptor) -> bytes | None:
        return self._paths.get(wd)

    def gone(self, wd: WatchDescriptor) -> bytes | None:
        """The kernel dropped `wd`; the path it was watching, if that was its current watch."""
        parent = self._parent_paths.pop(wd, None)
        if parent is not None:
            self._parents.pop(parent, None)
        path = self._paths.pop(wd, None)
        if path is None:
            return None
        watch = self._by_path.get(path)
        if watch is None or watch.wd != wd:
            return None
        del self._by_path[path]
        return path

    def unwatch(self, path: bytes) -> None:
        watch = self._by_path.pop(path, None)
        if watch is None:
            return
        self._paths.pop(watch.wd, None)
        if self._fd is not None:
            try:
                self._fd.remove_callbacks([(watch.wd, watch.callback_id)])
            except OSError as exc:
                self._log.debug("fs.unwatch_failed", error=str(exc))

    def forget(self, path: bytes) -> None:
        """`path` left the tree: no watch, and no retry."""
        self.forget_refusal(path)
        self.unwatch(path)

    def rename(self, old: bytes, new: bytes) -> None:
        """A watched (or refused) directory is now known as `new`."""
        watch = self._by_path.pop(old, None)
        if watch is not None:
            self._by_path[new] = watch
            self._paths[watch.wd] = new
        if old in self._refused:
            self._refused.discard(old)
            self._refused.add(new)

    def retry_refused(self, rewatch: Callable[[bytes], bool]) -> None:
        """Ask again for the watches the limit refused: the user may have raised it, or
        watches were freed. `rewatch(path)` places one (and rescans), False only if the limit
        refuses it again. Any refused directory serves as a probe, so while the limit still
        holds a round costs one refused call; once one is granted the rest follow, parents
        before children (a parent's rescan takes its unwatched subdirectories along)."""
        if not self._refused or not rewatch(next(iter(self._refused))):
            return
        for path in sorted(self._refused):
            if path in self._refused and not rewatch(path):
                return
        if not self._refused:
            self._log.info(
                "fs.watch_limit_cleared",
                detail="every directory is watched again",
                watches=self.count,
            )
            self._limit_logged = False  # reaching the limit again deserves a new warning

    def _limit_reached(self, path: bytes) -> None:
        self.limit_hits += 1
        if self._limit_logged:
            return
        self._limit_logged = True
        try:
            with open("/proc/sys/fs/inotify/max_user_watches") as f:
                limit: int | None = int(f.read())
        except (OSError, ValueError):
            limit = None
        target = max(SUGGESTED_WATCH_LIMIT, (limit or 0) * 2)
        self._log.warning(
            "fs.watch_limit_reached",
            detail=(
                f"the inotify watch limit ({WATCH_LIMIT_SYSCTL}) is reached: some directories "
                "are not watched, so changes in them are not seen as they happen; their "
                f"watches are asked for again every {self._retry_seconds:g} s, and once a "
                "directory is watched it is rescanned and what changed meanwhile is recorded"
            ),
            sysctl=WATCH_LIMIT_SYSCTL,
            limit=limit,
            retry_seconds=self._retry_seconds,
            fix=(
                f"sudo sysctl {WATCH_LIMIT_SYSCTL}={target} && echo "
                f"'{WATCH_LIMIT_SYSCTL}={target}' | sudo tee /etc/sysctl.d/60-inotify.conf"
            ),
            first_unwatched=text(path)[0],
        )
