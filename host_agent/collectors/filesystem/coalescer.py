"""Coalescing: the changes seen on one path within `coalesce_ms` become one row. Pure: no I/O,
no clock; times come with each change, and rows leave through the `emit` callback.

What a row means
    `event_type` is `created`, `modified`, `deleted` or `moved`; for `moved` the path is the
    destination and `previous_path` the source (`Pending.source`). `event_time` is when the
    recorded kind of change was seen (e.g. the creation for created+modified). `modified` on a
    directory (its entry list or times changed) is noise and is not recorded. Rows leave in an
    order that replays (see `replay`): a row about a path never overtakes an earlier change that
    replaying it depends on.

The window is counted from the first change on a path; one row per window. A change on a path
with a pending row merges into it by this table (old + new -> row):

    created  + modified -> created          modified + modified -> modified
    created  + created  -> created          modified + created  -> modified
    created  + deleted  -> both rows        modified + deleted  -> deleted
    created  + moved    -> both rows        modified + moved    -> moved
    deleted  + modified -> modified         moved    + modified -> moved
    deleted  + deleted  -> deleted          moved    + created  -> moved
    deleted  + created  -> modified (replaced; both rows when a file replaced a directory or
                           the other way round)
    deleted  + moved    -> moved            moved    + deleted  -> both rows
                                            moved    + moved    -> both rows

"Both rows" means nothing that existed is hidden: a short-lived file is still recorded, created
and deleted. A new change after the window closed is a new row.

Renames (`renamed`, `arrived`, `renamed_from`, `destination_kind`)
    An editor's atomic save, "write a temporary file, rename it over the original", is a
    `modified` of the original (a `created` if there was none): this applies when the source is
    an ignored name (`foo.tmp`, `.foo.swp`, `foo~`) and when the source itself appeared within
    the window (`foo.XXXXXX`), so the temporary name never shows up. vim's "rename the original
    to foo~, write a new foo" is deleted + created, hence one `modified`; so is JetBrains' "safe
    write" (write `foo___jb_tmp___`, rename `foo` to `foo___jb_old___`, rename the temporary
    file onto `foo`, delete `foo___jb_old___`), both of whose names are ignored by default. The
    two renames are back to back, so any coalescing window joins them; with `coalesce_ms: 0`
    they can stay two rows. Any other rename within the watched tree writes the source's
    pending row at once and is `moved` at the destination, naming the source (so an atomic save
    whose temporary file outlived the window is a `moved` from that file, which replays right).
    A `moved` merged from a `deleted` or `modified` takes the new source.

Directory renames
    The rows pending at or below the destination (what was there before) are written first
    (`emit_below`); the directory's own row follows, then the pending rows that were below the
    source, now under the destination (`rekey`), with their sources renamed too: replaying the
    directory's move takes their old paths along, so they must come after it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from host_agent.collectors.filesystem.paths import prefix
from host_agent.collectors.filesystem.roots import Root

CREATED = "created"
MODIFIED = "modified"
DELETED = "deleted"
MOVED = "moved"


@dataclass(slots=True)
class Pending:
    """A row not yet written: the kind of change that stands for the window so far."""

    kind: str
    at: float  # wall clock of the event that set `kind`
    deadline: float  # monotonic
    root: Root
    is_dir: bool
    was_link: bool
    source: bytes | None = None  # for `moved`: the path it was renamed from
    found: bool = False  # found by the start scan, not seen as an event


def merge(old: str, new: str, *, same_type: bool) -> str | None:
    """The kind that stands for `old` followed by `new`, or None for "two rows".
    `same_type`: both are files, or both directories."""
    if new == MODIFIED:
        return MODIFIED if old == DELETED else old
    if new == DELETED:
        return DELETED if old in (MODIFIED, DELETED) else None
    if new == CREATED:
        if old == DELETED:
            return MODIFIED if same_type else None
        return old
    # new == MOVED
    return MOVED if old in (MODIFIED, DELETED) else None


def destination_kind(*, moved: bool, replaced: bool) -> str:
    """What a rename records at its destination. `moved`: the source was a path with a row of
    its own (watched, not ignored, not born within the window). Otherwise the destination got
    new content (an atomic save, or a move in from outside the tree): `modified` when a file
    was `replaced`, else `created`."""
    if moved:
        return MOVED
    return MODIFIED if replaced else CREATED


class Coalescer:
    """Pending rows by path, in the order their windows close. Rows leave through
    `emit(path, pending)`: when a change cannot merge, when a rename needs the source's row
    first, or when `flush` passes their deadline."""

    def __init__(self, window: float, emit: Callable[[bytes, Pending], None]) -> None:
        self.window = window
        self._emit = emit
        self._pending: OrderedDict[bytes, Pending] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, path: bytes) -> bool:
        return path in self._pending

    def change(
        self,
        path: bytes,
        kind: str,
        root: Root,
        *,
        is_dir: bool,
        mono: float,
        wall: float,
        was_link: bool = False,
        source: bytes | None = None,
    ) -> None:
        """A change of `kind` seen at `mono` (monotonic) / `wall` (epoch seconds); `source`:
        where a `moved` came from."""
        if is_dir and kind == MODIFIED:
            return  # a directory's entries or times changed: noise, its entries have rows
        source = source if kind == MOVED else None
        pending = self._pending.get(path)
        if pending is not None:
            merged = merge(pending.kind, kind, same_type=pending.is_dir == is_dir)
            if merged is not None:
                if merged != pending.kind:
                    pending.kind = merged
                    pending.at = wall
                    pending.source = source
                    pending.found = False
                pending.is_dir = is_dir
                pending.was_link = pending.was_link or was_link
                pending.root = root
                return
            self.emit(path)
        self._pending[path] = Pending(
            kind, wall, mono + self.window, root, is_dir, was_link, source
        )

    def renamed(
        self,
        source: bytes,
        target: bytes,
        root: Root,
        *,
        replaced: bool,
        mono: float,
        wall: float,
        was_link: bool = False,
    ) -> None:
        """A file renamed within the tree from `source` onto `target`, which held a file
        already if `replaced`."""
        temporary = self.renamed_from(source)
        kind = destination_kind(moved=not temporary, replaced=replaced)
        self.change(
            target,
            kind,
            root,
            is_dir=False,
            mono=mono,
            wall=wall,
            was_link=was_link,
            source=source,
        )

    def arrived(
        self, target: bytes, root: Root, *, is_dir: bool, replaced: bool, mono: float, wall: float
    ) -> None:
        """Renamed onto `target` from an ignored name or from outside the tree: new content,
        not a move."""
        kind = destination_kind(moved=False, replaced=replaced)
        self.change(target, kind, root, is_dir=is_dir, mono=mono, wall=wall)

    def renamed_from(self, source: bytes) -> bool:
        """`source` was renamed within the tree. True if it was born within the window (a
        temporary name): its `created` is dropped. Otherwise its pending row, if any, is
        written now, before the destination's."""
        pending = self._pending.get(source)
        if pending is None:
            return False
        if pending.kind == CREATED:
            del self._pending[source]
            return True
        self.emit(source)
        return False

    def emit(self, path: bytes) -> None:
        """Write the pending row of `path` now, if there is one."""
        pending = self._pending.pop(path, None)
        if pending is not None:
            self._emit(path, pending)

    def emit_below(self, path: bytes) -> None:
        """Write now the pending rows of `path` and of every path below it, in order (what
        was there before a directory is renamed onto `path`)."""
        top = prefix(path)
        for pending_path in [p for p in self._pending if p == path or p.startswith(top)]:
            self.emit(pending_path)

    def rekey(self, source: bytes, target: bytes, root: Root) -> None:
        """The directory `source` was renamed to `target` (and its own row queued): the
        pending rows of paths below `source` move below `target`, after that row, keeping
        their order; sources below `source` are renamed the same way."""
        top = prefix(source)

        def renamed(path: bytes) -> bytes:
            return target + path[len(source) :]

        below = [p for p in self._pending if p.startswith(top)]
        for path in below:
            pending = self._pending.pop(path)
            pending.root = root
            if pending.source is not None and pending.source.startswith(top):
                pending.source = renamed(pending.source)
            self.emit(renamed(path))  # found there by a scan meanwhile: nothing is lost
            self._pending[renamed(path)] = pending

    def next_deadline(self) -> float | None:
        """When the first pending window closes (monotonic), if any is open."""
        return next(iter(self._pending.values())).deadline if self._pending else None

    def flush(self, watermark: float) -> None:
        """Write every pending row whose window closed by `watermark` (monotonic)."""
        while self._pending:
            path, pending = next(iter(self._pending.items()))
            if pending.deadline > watermark:
                break
            self._pending.popitem(last=False)
            self._emit(path, pending)
