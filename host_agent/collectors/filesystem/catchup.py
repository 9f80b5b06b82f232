"""The start scan: what changed below a root while the watcher was not running (stopped, or
killed before its rows were written), found by comparing the disk with the persistent snapshot
(`host_agent.store.snapshot`, which holds the replay of the root's rows).

How the two are compared
    Paths present in both with the same type are unchanged, or `modified` when a file's size
    or mtime differs. A path only on disk is `created`; one only in the snapshot is `deleted`,
    unless an entry only on disk has its inode: then it was `moved` there. A file matches on
    inode, size and mtime together (a rename keeps all three; a new file that got a deleted
    file's inode has its own mtime); a directory on its inode, and, when the snapshot knew
    entries in it, on at least one of them still there under the same name and inode (a new
    directory that reused a deleted one's inode has other contents). A directory moved is one
    row, and what was inside it is compared at its new place, so moved contents give no rows
    unless they changed. An inode reused all the same (same size and mtime, or a directory
    holding a reused file) only makes a move of what was a deletion and a creation: replaying
    the rows still gives the disk.

Times (the best known)
    `created` and `modified`: the entry's mtime; `moved`: its ctime (a rename sets it);
    `deleted`: the scan's time. Each is kept within [the snapshot's last update, the scan's
    time] (a file copied with its old mtime was still made after the watcher last looked; a
    future mtime is clamped to now); a root scanned for the first time has no lower bound.

Order (the rows replay)
    Deletions at their old paths first, then the moves (each names its source where the replay
    has it at that point), then deletions below moved directories, at their new paths, then
    modifications and creations.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from host_agent.collectors.filesystem.coalescer import CREATED, DELETED, MODIFIED, MOVED, Pending
from host_agent.collectors.filesystem.paths import join
from host_agent.collectors.filesystem.roots import Root
from host_agent.collectors.filesystem.snapshot import DIR, LINK, Directory, fingerprint
from host_agent.store.snapshot import DIRECTORY, SYMLINK, Entry, SnapshotReader

# How many entries of a directory are looked at for evidence that it is the one that moved.
EVIDENCE_NAMES = 32


@dataclass(eq=False)
class _Gone:
    """An entry of the snapshot not found at its path; `path` is where the replay has it now
    (below a moved directory, that moved too)."""

    path: bytes
    entry: Entry
    rekeyed: bool = False
    done: bool = False


def _kind_of(flags: int) -> int:
    return DIRECTORY if flags & DIR else SYMLINK if flags & LINK else 0


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0] or b"/"


class Comparison:
    """One root's disk (the in-memory directories after the start walk) against its
    snapshot. `found()` lists the rows, in order."""

    def __init__(
        self,
        root: Root,
        dirs: Mapping[bytes, Directory],
        old: SnapshotReader,
        *,
        scan_time: float,
    ) -> None:
        self._root = root
        self._dirs = dirs
        self._old = old
        self._scan_time = scan_time
        self._lower = old.updated_at
        self._removed: dict[bytes, _Gone] = {}
        self._originals: list[_Gone] = []
        self._children: defaultdict[bytes, set[bytes]] = defaultdict(set)  # of removed
        self._added: dict[bytes, int] = {}  # path -> in-memory entry
        self._modified: list[bytes] = []
        self._moves: list[tuple[bytes, bytes, bool, bool]] = []  # target, source, dir, link
        self._stats: dict[bytes, os.stat_result | None] = {}

    # --- comparing ---------------------------------------------------------------------------

    def _relative(self, path: bytes) -> bytes:
        return path[len(self._root.path) :].lstrip(b"/")

    def compare(self) -> list[tuple[bytes, Pending]]:
        stack = [self._root.path]
        while stack:
            directory = stack.pop()
            old = self._old.children(self._relative(directory))
            known = self._dirs.get(directory)
            for name, now in (known.entries if known is not None else {}).items():
                path = join(directory, name)
                before = old.pop(name, None)
                if before is not None and before.kind == _kind_of(now):
                    if now & DIR:
                        stack.append(path)
                    elif fingerprint(before) != now:
                        self._modified.append(path)
                    continue
                if before is not None:
                    self._gone(path, before)
                self._add_tree(path, now)
            for name, before in old.items():
                self._gone(join(directory, name), before)
        if self._removed and self._added:
            self._match_moves()
        return self._found()

    def _gone(self, path: bytes, entry: Entry) -> None:
        self._register(path, entry)
        if entry.kind == DIRECTORY:
            for relative, below in self._old.below(self._relative(path)):
                self._register(join(self._root.path, relative), below)

    def _register(self, path: bytes, entry: Entry) -> None:
        gone = _Gone(path, entry)
        self._originals.append(gone)
        self._removed.setdefault(path, gone)
        self._children[_parent(path)].add(path)

    def _add_tree(self, top: bytes, now: int) -> None:
        stack = [(top, now)]
        while stack:
            path, flags = stack.pop()
            self._added[path] = flags
            if flags & DIR:
                directory = self._dirs.get(path)
                if directory is not None:
                    stack.extend((join(path, n), f) for n, f in directory.entries.items())

    # --- moves -------------------------------------------------------------------------------

    def _stat(self, path: bytes) -> os.stat_result | None:
        if path not in self._stats:
            try:
                self._stats[path] = os.lstat(path)
            except OSError:
                self._stats[path] = None
        return self._stats[path]

    @staticmethod
    def _key(kind: int, inode: int, size: int | None, mtime_ns: int | None) -> tuple[object, ...]:
        return (kind, inode) if kind == DIRECTORY else (kind, inode, size, mtime_ns)

    def _match_moves(self) -> None:
        candidates: defaultdict[tuple[object, ...], list[_Gone]] = defaultdict(list)
        for gone in self._originals:
            entry = gone.entry
            if entry.inode is not None:
                key = self._key(entry.kind, entry.inode, entry.size, entry.mtime_ns)
                candidates[key].append(gone)
        for path in sorted(self._added):
            flags = self._added.get(path)
            if flags is None:
                continue  # taken along by a directory moved meanwhile
            st = self._stat(path)
            if st is None:
                continue
            kind = _kind_of(flags)
            size = None if kind == DIRECTORY else st.st_size
            key = self._key(kind, st.st_ino, size, st.st_mtime_ns)
            for gone in candidates.get(key, ()):
                if gone.done or (kind == DIRECTORY and not self._evidence(gone, path)):
                    continue
                self._move(gone, path, flags)
                break

    def _evidence(self, gone: _Gone, path: bytes) -> bool:
        """Whether the directory on disk at `path` is the one the snapshot knew as `gone`:
        it knew nothing inside, or something inside is still there, same name and inode."""
        inside = list(self._children.get(gone.path, ()))
        if not inside:
            return True
        for child in inside[:EVIDENCE_NAMES]:
            before = self._removed.get(child)
            st = self._stat(join(path, child.rpartition(b"/")[2]))
            if before is not None and st is not None and before.entry.inode == st.st_ino:
                return True
        return False

    def _move(self, gone: _Gone, target: bytes, flags: int) -> None:
        self._moves.append((target, gone.path, bool(flags & DIR), bool(flags & LINK)))
        self._take(gone)
        del self._added[target]
        if flags & DIR:
            self._reroot(gone.path, target)

    def _take(self, gone: _Gone) -> None:
        gone.done = True
        if self._removed.get(gone.path) is gone:
            del self._removed[gone.path]
        self._children[_parent(gone.path)].discard(gone.path)

    def _reroot(self, source: bytes, target: bytes) -> None:
        """What the replay had below `source` is now below `target`: pair it with what is on
        disk there, or keep it as gone at its new path."""
        stack = [(source, target)]
        while stack:
            old_dir, new_dir = stack.pop()
            for old_path in sorted(self._children.pop(old_dir, set())):
                gone = self._removed.get(old_path)
                if gone is None or gone.done:
                    continue
                new_path = new_dir + old_path[len(old_dir) :]
                flags = self._added.get(new_path)
                if flags is not None and _kind_of(flags) == gone.entry.kind:
                    self._take(gone)
                    del self._added[new_path]
                    if flags & DIR:
                        stack.append((old_path, new_path))
                    elif fingerprint(gone.entry) != flags:
                        self._modified.append(new_path)
                    continue
                del self._removed[old_path]
                gone.path, gone.rekeyed = new_path, True
                self._removed.setdefault(new_path, gone)
                self._children[new_dir].add(new_path)
                if gone.entry.kind == DIRECTORY:
                    stack.append((old_path, new_path))

    # --- rows --------------------------------------------------------------------------------

    def _when(self, seconds: float) -> float:
        if self._lower is not None:
            seconds = max(seconds, self._lower)
        return min(seconds, self._scan_time)

    def _pending(self, kind: str, at: float, *, is_dir: bool, was_link: bool,
                 source: bytes | None = None) -> Pending:
        return Pending(kind, at, 0.0, self._root, is_dir, was_link, source, found=True)

    def _deleted(self, gone: _Gone) -> tuple[bytes, Pending]:
        entry = gone.entry
        return gone.path, self._pending(
            DELETED,
            self._scan_time,
            is_dir=entry.kind == DIRECTORY,
            was_link=entry.kind == SYMLINK,
        )

    def _changed(self, kind: str, path: bytes, flags: int) -> tuple[bytes, Pending]:
        st = self._stats.get(path) if path in self._stats else _lstat(path)
        at = self._when(st.st_mtime) if st is not None else self._scan_time
        return path, self._pending(kind, at, is_dir=bool(flags & DIR), was_link=bool(flags & LINK))

    def _found(self) -> list[tuple[bytes, Pending]]:
        rows: list[tuple[bytes, Pending]] = []
        rows += [self._deleted(g) for g in self._originals if not g.done and not g.rekeyed]
        for target, source, is_dir, was_link in self._moves:
            st = self._stat(target)
            at = self._when(st.st_ctime) if st is not None else self._scan_time
            rows.append(
                (target, self._pending(MOVED, at, is_dir=is_dir, was_link=was_link, source=source))
            )
        rows += [self._deleted(g) for g in self._originals if not g.done and g.rekeyed]
        for path in self._modified:
            st = _lstat(path)
            flags = LINK if st is not None and stat.S_ISLNK(st.st_mode) else 0
            rows.append(self._changed(MODIFIED, path, flags))
        rows += [self._changed(CREATED, p, self._added[p]) for p in sorted(self._added)]
        return rows



def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def root_gone(root: Root, old: SnapshotReader, *, scan_time: float) -> list[tuple[bytes, Pending]]:
    """A root missing at start: everything its snapshot held is gone."""
    return [
        (
            join(root.path, relative),
            Pending(
                DELETED,
                scan_time,
                0.0,
                root,
                entry.kind == DIRECTORY,
                entry.kind == SYMLINK,
                found=True,
            ),
        )
        for relative, entry in old.below(b"")
    ]
