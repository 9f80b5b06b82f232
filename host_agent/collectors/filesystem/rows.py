"""Rows of `file_change_events`, built when a pending change is written.

`file_path` is absolute. `file_size` is the size when the row is written (NULL when the path is
gone and for directories), `file_extension` is NULL for names without one and for directories.
`project_name` is the name of the nearest directory above the path, up to and including the
root, that contains `.git`; else the root's name. Names that are not valid UTF-8 are written
with backslash escapes in the text columns and byte for byte in `file_path_raw` (NULL for valid
UTF-8 paths). Symlinks are recorded like files, with `is_symlink = 1`. A `moved` row names its
source in `previous_path` (and `previous_path_raw`, the same way); NULL for the other kinds.
`found_at_start` is 1 for rows the start scan found (`catchup`), 0 for changes seen as events.

Each row comes with its effect on the persistent snapshot (`snapshot_change`), written with it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable

from host_agent.collectors.filesystem.coalescer import DELETED, Pending
from host_agent.collectors.filesystem.paths import join, text
from host_agent.collectors.filesystem.roots import Root
from host_agent.store.snapshot import DIRECTORY, FILE, SYMLINK, Change, Entry
from host_agent.store.writer import Row
from host_agent.timefmt import iso

# Directories whose project is remembered, at most; past that the cache starts over.
MAX_PROJECTS = 100_000


def current_stat(path: bytes, pending: Pending) -> os.stat_result | None:
    """The path's own status now (links not followed); None if it is gone or was deleted."""
    if pending.kind == DELETED:
        return None
    with contextlib.suppress(OSError):
        return os.lstat(path)
    return None


def snapshot_entry(st: os.stat_result) -> Entry:
    """What the persistent snapshot keeps of an entry seen as `st` (links not followed)."""
    if stat.S_ISDIR(st.st_mode):
        return Entry(DIRECTORY, None, st.st_mtime_ns, st.st_ino)
    kind = SYMLINK if stat.S_ISLNK(st.st_mode) else FILE
    return Entry(kind, st.st_size, st.st_mtime_ns, st.st_ino)


def snapshot_change(path: bytes, pending: Pending, st: os.stat_result | None) -> Change:
    """The effect of `pending`'s row on the persistent snapshot."""
    if st is not None:
        entry = snapshot_entry(st)
    else:
        entry = Entry(DIRECTORY if pending.is_dir else SYMLINK if pending.was_link else FILE)
    return Change(pending.root.path, pending.kind, path, pending.source, entry)


class RowBuilder:
    """Builds rows; remembers each directory's project until told the layout changed."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._projects: dict[bytes, str] = {}
        self._iso_cache: tuple[int, str] = (-1, "")

    def forget_projects(self) -> None:
        """A `.git` appeared or vanished, or directories moved: project names may differ."""
        self._projects.clear()

    def row(self, path: bytes, pending: Pending, st: os.stat_result | None) -> Row:
        """The row for `pending` at `path`, whose status is `st` (see `current_stat`)."""
        directory, name = os.path.split(path)
        if st is not None:
            is_dir = stat.S_ISDIR(st.st_mode)
            is_link = stat.S_ISLNK(st.st_mode)
        else:
            is_dir, is_link = pending.is_dir, pending.was_link
        root = pending.root
        path_text, raw = text(path)
        name_text = text(name)[0]
        extension = None if is_dir else (os.path.splitext(name_text)[1] or None)
        event_time = int(pending.at)
        row: dict[str, object] = {
            "event_time": event_time,
            "event_time_iso": self._iso(event_time),
            "event_type": pending.kind,
            "file_path": path_text,
            "file_path_relative": text(path[len(root.path) :].lstrip(b"/"))[0],
            "file_name": name_text,
            "file_extension": extension,
            "file_size": st.st_size if st is not None and not is_dir else None,
            "is_symlink": int(is_link),
            "monitored_root": root.text,
            "project_name": self._project(directory, root),
            "created_at": int(self._clock()),
            "file_path_raw": raw,
        }
        # Left to the columns' defaults (NULL, 0) when they have nothing to say: most rows are
        # written in the same shape as before, which the writer's statement cache likes.
        if pending.source is not None:
            row["previous_path"], row["previous_path_raw"] = text(pending.source)
        if pending.found:
            row["found_at_start"] = 1
        return row

    def _iso(self, epoch: int) -> str:
        cached_epoch, iso_text = self._iso_cache
        if cached_epoch != epoch:
            iso_text = iso(epoch)
            self._iso_cache = (epoch, iso_text)
        return iso_text

    def _project(self, directory: bytes, root: Root) -> str:
        cached = self._projects.get(directory)
        if cached is not None:
            return cached
        if len(self._projects) > MAX_PROJECTS:
            self._projects.clear()
        chain: list[bytes] = []
        current = directory
        result = root.name
        while True:
            known = self._projects.get(current)
            if known is not None:
                result = known
                break
            chain.append(current)
            if os.path.lexists(join(current, b".git")):
                result = text(os.path.basename(current))[0] or root.name
                break
            if len(current) <= len(root.path):
                break
            current = os.path.dirname(current)
        for visited in chain:
            self._projects[visited] = result
        return result
