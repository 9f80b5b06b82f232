"""File change collector: inotify (through watchdog) into `file_change_events`.

How it watches
    watchdog's recursive inotify observer places a watch on every directory, ignored or not, and
    runs one emitter thread per scheduled path. Instead this collector drives watchdog's inotify
    layer (`InotifyFD`: one inotify instance, one reader thread) directly and places one
    non-recursive watch per directory it walks itself, skipping ignored names, so an ignored
    tree (`node_modules`, `.git`) costs no watch and produces no event. Ignore patterns
    (fnmatch, case-sensitive) are matched against each path component below a root; a root
    itself is never ignored. Symlinks are recorded like files (`is_symlink = 1`) and never
    followed. A root nested in another root is dropped (the outer one covers it).

Threads
    watchdog's reader thread only timestamps events and queues them. One processor thread owns
    all bookkeeping (watches, snapshot, coalescing), so events are applied strictly in kernel
    order. One writer thread writes batches through the `RowWriter` with `insert_many`; whoever
    made the writer closes it (the agent, after `run()` returns).

What a row means
    `event_type` is `created`, `modified`, `deleted` or `moved`. `file_path` is absolute and, for
    `moved`, the destination; the table has no column for the source path, so it is not stored
    (a move whose source or destination lies outside the watched, non-ignored tree is recorded
    as `created` at the destination or `deleted` at the source). `file_size` is the size when
    the row is written (NULL when the path is gone and for directories), `file_extension` is
    NULL for names without one and for directories. `project_name` is the name of the nearest
    directory above the path, up to and including the root, that contains `.git`; else the
    root's name. Names that are not valid UTF-8 are written with backslash escapes in the text
    columns and byte for byte in `file_path_raw` (NULL for valid UTF-8 paths). `event_time` is
    when the recorded kind of change was seen (e.g. the creation for created+modified).

Directories
    Created, deleted and moved directories get rows; `modified` on a directory (its entry list
    or times changed) is noise and is not recorded. A directory moved within the roots is one
    `moved` row; its contents are not repeated. A directory that appears (mkdir, moved in, copied
    in) is watched and then scanned, and everything already inside gets a `created` row, so
    files made before its watch existed (`mkdir -p a/b/c && touch a/b/c/f`) are not missed; a
    directory that leaves the tree (moved out, or a root moved away) gets `deleted` rows for
    everything known inside it, as `rm -r` would.

Coalescing (`coalesce_ms`, counted from the first event on a path; one row per window)
    created + modified...  -> created        modified + modified...   -> modified
    modified + deleted     -> deleted        deleted + created        -> modified (replaced)
    moved + modified...    -> moved          created + deleted        -> both rows (nothing
                                                                         that existed is hidden)
    An editor's atomic save, "write a temporary file, rename it over the original", is a
    `modified` of the original (a `created` if there was none): this applies when the source is
    an ignored name (`foo.tmp`, `.foo.swp`, `foo~`) and when the source itself appeared within
    the window (`foo.XXXXXX`), so the temporary name never shows up. vim's "rename the original
    to foo~, write a new foo" is deleted + created, hence one `modified`; so is JetBrains' "safe
    write" (write `foo___jb_tmp___`, rename `foo` to `foo___jb_old___`, rename the temporary
    file onto `foo`, delete `foo___jb_old___`), both of whose names are ignored by default. The
    two renames are back to back, so any coalescing window joins them; with `coalesce_ms: 0`
    they can stay two rows.

No silent loss
    When the kernel queue overflows (IN_Q_OVERFLOW, which watchdog reports through
    `on_queue_overflow`) or the collector's own queue is full, a warning is logged and every
    root is rescanned against the in-memory snapshot (per directory: name -> kind and a
    fingerprint of mtime and size); what changed since the last known state is recorded as
    created / modified / deleted (a move during the outage shows as deleted + created). All
    roots share one inotify instance, so an overflow concerns them all. When the inotify watch
    limit is reached, one warning names `fs.inotify.max_user_watches` and the command to raise
    it; directories that could not be watched are still scanned (their content is the
    baseline), but changes in them are not seen as they happen. Every `retry_seconds` (default
    `WATCH_RETRY_SECONDS`) the collector asks again for their watches, so raising the sysctl (or
    watches freed elsewhere) takes effect without a restart; each directory that gets its watch
    is rescanned, recording what changed while it was unwatched. While the limit still refuses,
    a round costs one refused call. Once every directory is watched an info message says so, and
    the next time the limit is reached warns again. The initial scan is the baseline: files
    present at start are not recorded.

Missing roots are logged and checked again every `retry_seconds`; a root that disappears
while watched is handled the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import itertools
import os
import queue
import re
import shutil
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog
from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
)

from host_agent.config import FilesystemCollectorConfig
from host_agent.errors import StoreClosed
from host_agent.store.writer import Row, RowWriter
from host_agent.timefmt import iso

CREATED = "created"
MODIFIED = "modified"
DELETED = "deleted"
MOVED = "moved"

# How often missing roots, and directories the watch limit refused, are tried again.
WATCH_RETRY_SECONDS = 30.0
FENCE_SECONDS = 2.0
# A rename's MOVED_FROM and MOVED_TO are queued back to back by the kernel, but may straddle two
# reads; a MOVED_FROM still unpaired after this long left the watched tree.
MOVE_PAIR_SECONDS = 0.2
# The collector's own queue between watchdog's reader and the processor. Past this many
# unprocessed events it behaves like the kernel queue: drop, then rescan.
MAX_QUEUED_EVENTS = 250_000
MAX_BATCH_ROWS = 10_000
BURST_EVENTS = 4096
WATCH_LIMIT_SYSCTL = "fs.inotify.max_user_watches"
SUGGESTED_WATCH_LIMIT = 524_288

_C = InotifyConstants
_WATCH_MASK = Mask(
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
_ROOT_MASK = Mask((_WATCH_MASK | _C.IN_DELETE_SELF | _C.IN_MOVE_SELF) & ~_C.IN_DONT_FOLLOW)

# Snapshot entries are small ints: two flag bits and a fingerprint of (mtime_ns, size), so a
# large tree stays cheap to hold. An entry learnt from an event holds only the flags until its
# row is written (which stats the file anyway).
_DIR = 1
_LINK = 2
_FINGERPRINT_MASK = (1 << 60) - 1


def _entry(st: os.stat_result) -> int:
    if stat.S_ISDIR(st.st_mode):
        return _DIR  # a directory's times change with every entry; its entries are the state
    flags = _LINK if stat.S_ISLNK(st.st_mode) else 0
    return ((hash((st.st_mtime_ns, st.st_size)) & _FINGERPRINT_MASK) << 2) | flags


def _join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory != b"/" else b"/" + name


def _prefix(directory: bytes) -> bytes:
    return directory if directory.endswith(b"/") else directory + b"/"


def _text(path: bytes) -> tuple[str, bytes | None]:
    """The text a column gets and, when the bytes are not UTF-8, the raw bytes."""
    try:
        return path.decode("utf-8"), None
    except UnicodeDecodeError:
        return path.decode("utf-8", "backslashreplace"), path


@dataclass
class _Root:
    path: bytes
    text: str
    name: str
    watched: bool = False


@dataclass
class _Dir:
    root: _Root
    entries: dict[bytes, int] = field(default_factory=dict)
    wd: WatchDescriptor | None = None
    callback_id: CallbackId | None = None


@dataclass
class _Pending:
    kind: str
    at: float  # wall clock of the event that set `kind`
    deadline: float  # monotonic
    root: _Root
    is_dir: bool
    was_link: bool


@dataclass
class _MoveFrom:
    mono: float
    wall: float
    path: bytes
    directory: bytes
    name: bytes
    is_dir: bool
    ignored: bool


class _Raw(NamedTuple):
    mono: float
    wall: float
    event: InotifyEvent


class _Gone(NamedTuple):
    wd: WatchDescriptor


_STOP = object()
_OVERFLOW = object()


class _Relay:
    """watchdog's callback: runs on its reader thread, so it only stamps and queues."""

    def __init__(self, sink: queue.SimpleQueue[object], clock: Callable[[], float]) -> None:
        self._sink = sink
        self._clock = clock
        self._dropping = False

    def on_event(self, event: InotifyEvent) -> None:
        if self._dropping:
            return
        if self._sink.qsize() >= MAX_QUEUED_EVENTS:
            self._dropping = True
            self._sink.put(_OVERFLOW)
            return
        self._sink.put(_Raw(time.monotonic(), self._clock(), event))

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        self._sink.put(_Gone(wd))

    def on_queue_overflow(self) -> None:
        self._sink.put(_OVERFLOW)

    def resume(self) -> None:
        self._dropping = False


class FileChangeCollector:
    """Records file changes below `config.roots`; see the module docstring for the rules.

    `ready` is set once the initial watches are placed (or it is clear nothing will be watched).
    Plain counters for metrics: `events_recorded` (rows committed), `overflows` (rescans after
    lost events), `errors`, `watches` (directories watched now), `unwatched` (directories the
    watch limit refused, waiting for a retry), `watch_limit_hits` (watch requests refused for
    the inotify limit, retries included) and `rows_dropped` (rows the store refused for good).
    `retry_seconds` is how often missing roots and refused directories are tried again.
    """

    def __init__(
        self,
        config: FilesystemCollectorConfig,
        writer: RowWriter,
        log: structlog.stdlib.BoundLogger | Any = None,
        *,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = WATCH_RETRY_SECONDS,
    ) -> None:
        self._config = config
        self._writer = writer
        self._log: Any = log if log is not None else structlog.get_logger(__name__)
        self._clock = clock
        self._retry_seconds = retry_seconds
        self._window = config.coalesce_ms / 1000
        patterns = [fnmatch.translate(p) for p in config.ignore]
        self._ignore = re.compile("|".join(patterns)) if patterns else None

        self.ready = asyncio.Event()
        self.events_recorded = 0
        self.overflows = 0
        self.errors = 0
        self.watches = 0
        self.unwatched = 0
        self.watch_limit_hits = 0
        self.rows_dropped = 0

        self._raw: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._out: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._relay = _Relay(self._raw, clock)
        self._stopping = threading.Event()
        self._fd: InotifyFD | None = None
        self._closing = False
        self._ids = itertools.count(1)
        self._roots: list[_Root] = []
        self._dirs: dict[bytes, _Dir] = {}
        self._wd_paths: dict[WatchDescriptor, bytes] = {}
        # Directories (in `_dirs`) whose watch the inotify limit refused, to be asked again.
        self._unwatched: set[bytes] = set()
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._moves_from: dict[int, _MoveFrom] = {}
        self._projects: dict[bytes, str] = {}
        self._rows: list[Row] = []
        self._limit_logged = False
        self._next_retry = 0.0
        self._iso_cache: tuple[int, str] = (-1, "")
        self._last_mono = 0.0  # reader timestamp of the newest event processed
        self._fence_wd: WatchDescriptor | None = None
        self._fence_path: bytes | None = None
        self._fenced = False

    # --- asyncio side --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Record until `stop` is set; then read what the kernel still holds, write every
        pending row, stop watching, release the writer and return."""
        if not self._config.enabled or not self._config.roots:
            self._log.info(
                "fs.collector_idle",
                reason="disabled" if not self._config.enabled else "no roots configured",
            )
            self.ready.set()
            await stop.wait()
            return
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fs-collector")
        processor = loop.run_in_executor(executor, self._process, loop)
        writer = loop.run_in_executor(executor, self._write_loop)
        stop_wait = asyncio.create_task(stop.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {processor, writer, stop_wait}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            self._stopping.set()
            self._raw.put(_STOP)
            results = await asyncio.gather(processor, writer, return_exceptions=True)
            await loop.run_in_executor(None, executor.shutdown)
            with contextlib.suppress(asyncio.CancelledError):
                await stop_wait
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # --- processor thread ----------------------------------------------------------------

    def _process(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._start()
            loop.call_soon_threadsafe(self.ready.set)
            self._event_loop()
        finally:
            try:
                self._shutdown()
            finally:
                self._out.put(_STOP)
                loop.call_soon_threadsafe(self.ready.set)

    def _start(self) -> None:
        started = time.monotonic()
        self._roots = self._resolve_roots()
        # The first use of tempfile probes the temp directory with a scratch file; done now,
        # before any watch exists, the shutdown fence leaves no trace even if it lies in a root.
        tempfile.gettempdir()
        try:
            self._fd = InotifyFD()
        except OSError as exc:
            self.errors += 1
            hint = (
                "raise fs.inotify.max_user_instances, e.g. "
                "`sudo sysctl fs.inotify.max_user_instances=512`"
                if exc.errno == errno.EMFILE
                else None
            )
            self._log.error("fs.inotify_unavailable", error=str(exc), hint=hint)
            return
        self._fd.start()
        for root in self._roots:
            if self._stopping.is_set():
                return
            self._watch_root(root)
        self._next_retry = time.monotonic() + self._retry_seconds
        self._update_watch_count()
        self._log.info(
            "fs.watching",
            roots=[r.text for r in self._roots if r.watched],
            directories=len(self._dirs),
            watches=self.watches,
            unwatched=self.unwatched,
            watch_limit_hits=self.watch_limit_hits,
            seconds=round(time.monotonic() - started, 3),
        )

    def _resolve_roots(self) -> list[_Root]:
        roots: list[_Root] = []
        for configured in self._config.roots:
            path = os.fsencode(os.path.abspath(os.path.expanduser(os.fspath(configured))))
            text, _ = _text(path)
            outer = next(
                (r for r in roots if r.path == path or path.startswith(_prefix(r.path))), None
            )
            if outer is not None:
                self._log.warning("fs.root_nested", root=text, inside=outer.text)
                continue
            inner = [r for r in roots if r.path.startswith(_prefix(path))]
            for r in inner:
                self._log.warning("fs.root_nested", root=r.text, inside=text)
                roots.remove(r)
            name = _text(os.path.basename(path))[0] or text
            roots.append(_Root(path, text, name))
        return roots

    def _watch_root(self, root: _Root) -> None:
        """Start watching a root that is not watched; its present content is the baseline."""
        if not os.path.isdir(root.path):
            self._log.warning(
                "fs.root_missing",
                root=root.text,
                retry_seconds=self._retry_seconds,
                detail="not an existing directory; skipped until it appears",
            )
            return
        root.watched = True
        self._adopt(root.path, root, record=False, mono=time.monotonic(), wall=self._clock())
        self._projects.clear()

    def _event_loop(self) -> None:
        while True:
            try:
                item = self._raw.get(timeout=self._next_timeout())
            except queue.Empty:
                item = None
            caught_up = True
            if item is _STOP:
                return
            if item is not None:
                self._dispatch(item)
                for _ in range(BURST_EVENTS):
                    try:
                        item = self._raw.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        return
                    self._dispatch(item)
                else:
                    caught_up = False
            self._after_burst(caught_up)

    def _next_timeout(self) -> float:
        now = time.monotonic()
        due = self._next_retry
        if self._pending:
            due = min(due, next(iter(self._pending.values())).deadline)
        for move in self._moves_from.values():
            due = min(due, move.mono + MOVE_PAIR_SECONDS)
        return min(max(due - now, 0.0), 5.0)

    def _after_burst(self, caught_up: bool) -> None:
        """Flush what is due. While events are still queued, "now" is the newest event seen,
        so a slow processor coalesces exactly as a fast one would."""
        now = time.monotonic()
        watermark = now if caught_up else self._last_mono
        if self._moves_from:
            stale = [
                c for c, m in self._moves_from.items() if m.mono + MOVE_PAIR_SECONDS <= watermark
            ]
            for cookie in stale:
                self._guard(self._unpaired_from, self._moves_from.pop(cookie))
        self._flush(watermark)
        if now >= self._next_retry:
            self._next_retry = now + self._retry_seconds
            if not self._closing and self._fd is not None:
                for root in self._roots:
                    if not root.watched:
                        self._guard(self._retry_root, root)
                if self._unwatched:
                    self._guard(self._retry_unwatched)
        self._update_watch_count()
        self._send()

    def _dispatch(self, item: object) -> None:
        if isinstance(item, _Raw):
            self._last_mono = item.mono
            self._guard(self._on_event, item)
        elif isinstance(item, _Gone):
            if not self._closing:
                self._guard(self._on_watch_gone, item.wd)
        elif item is _OVERFLOW and not self._closing:
            self._guard(self._rescan)

    def _guard(self, func: Callable[..., None], *args: Any) -> None:
        try:
            func(*args)
        except Exception as exc:
            # One odd path (a race with a vanishing directory, a permission change) must not
            # stop the collector; it is counted and logged with its traceback.
            self.errors += 1
            self._log.error("fs.event_failed", error=repr(exc), exc_info=True)

    def _shutdown(self) -> None:
        self._stopping.set()
        fence = self._fence()
        self._closing = True
        fd, self._fd = self._fd, None
        if fd is not None:
            fd.stop()
            fd.join()
        # Events read before the reader stopped are real changes: apply them, then flush all.
        while True:
            try:
                item = self._raw.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self._dispatch(item)
        for cookie in list(self._moves_from):
            self._guard(self._unpaired_from, self._moves_from.pop(cookie))
        self._flush(float("inf"))
        self._send()
        if fence is not None:
            shutil.rmtree(fence, ignore_errors=True)

    def _fence(self) -> str | None:
        """Make sure every change made before the stop has been read before inotify closes.

        Closing the instance discards what the kernel still holds, so a marker file is created
        in a fresh watched directory and events are applied until its event arrives: one queue,
        so everything before it has arrived too (watchman's "cookie" technique, kept out of
        the user's directories)."""
        fd = self._fd
        if fd is None:
            return None
        try:
            fence = tempfile.mkdtemp(prefix="host-agent-fence-")
        except OSError as exc:
            self._log.warning("fs.fence_failed", error=str(exc))
            return None
        self._fence_path = os.fsencode(fence)  # the temp directory may lie in a root
        try:
            callback_id = CallbackId(next(self._ids))
            self._fence_wd = fd.add_callback(
                os.fsencode(fence), _C.IN_CREATE, self._relay, callback_id
            )
            os.close(os.open(os.path.join(fence, "stop"), os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            self._log.warning("fs.fence_failed", error=str(exc))
            return fence
        deadline = time.monotonic() + FENCE_SECONDS
        while not self._fenced:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._log.warning("fs.fence_timeout", seconds=FENCE_SECONDS)
                break
            try:
                item = self._raw.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is not _STOP:
                self._dispatch(item)
        return fence

    # --- events --------------------------------------------------------------------------

    def _ignored(self, name: bytes) -> bool:
        return self._ignore is not None and self._ignore.match(os.fsdecode(name)) is not None

    def _on_event(self, raw: _Raw) -> None:
        event = raw.event
        mask = event.mask
        if event.wd == self._fence_wd:
            self._fenced = True
            return
        directory = self._wd_paths.get(event.wd)
        if directory is None:
            return
        parent = self._dirs.get(directory)
        if parent is None:
            return
        if not mask & _C.IN_MOVE and self._moves_from:
            # Anything but a rename between a MOVED_FROM and its MOVED_TO means the pair is
            # not coming: resolve first, so changes stay in kernel order.
            for cookie in list(self._moves_from):
                self._unpaired_from(self._moves_from.pop(cookie))
        name = event.name
        if not name:
            if mask & _C.IN_MOVE_SELF and directory == parent.root.path:
                self._root_lost(parent.root, "moved")
            return
        if name == b".git":
            self._projects.clear()
        path = _join(directory, name)
        if path == self._fence_path:
            return
        is_dir = bool(mask & _C.IN_ISDIR)
        ignored = self._ignored(name)
        if mask & _C.IN_MOVED_FROM:
            self._moves_from[event.cookie] = _MoveFrom(
                raw.mono, raw.wall, path, directory, name, is_dir, ignored
            )
        elif mask & _C.IN_MOVED_TO:
            source = self._moves_from.pop(event.cookie, None)
            self._moved(source, parent, directory, name, is_dir, ignored, raw)
        elif ignored:
            return
        elif mask & _C.IN_CREATE:
            self._created(parent, path, name, is_dir, raw.mono, raw.wall)
        elif mask & _C.IN_DELETE:
            self._removed(parent, path, name, is_dir, raw.mono, raw.wall)
        elif mask & (_C.IN_MODIFY | _C.IN_ATTRIB):
            self._change(path, MODIFIED, parent.root, is_dir=is_dir, mono=raw.mono, wall=raw.wall)

    def _created(
        self, parent: _Dir, path: bytes, name: bytes, is_dir: bool, mono: float, wall: float
    ) -> None:
        if name in parent.entries:
            # Already seen by the scan of a new directory (or the baseline scan) that raced
            # with this event; a real re-creation would have been preceded by a delete.
            return
        parent.entries[name] = _DIR if is_dir else 0
        self._change(path, CREATED, parent.root, is_dir=is_dir, mono=mono, wall=wall)
        if is_dir:
            self._adopt(path, parent.root, record=True, mono=mono, wall=wall)

    def _removed(
        self, parent: _Dir | None, path: bytes, name: bytes, is_dir: bool, mono: float, wall: float
    ) -> None:
        entry = parent.entries.pop(name, None) if parent is not None else None
        root = parent.root if parent is not None else self._root_of(path)
        if root is None:
            return
        if is_dir:
            self._forget_tree(path, record=True, mono=mono, wall=wall)
        was_link = entry is not None and bool(entry & _LINK)
        self._change(path, DELETED, root, is_dir=is_dir, mono=mono, wall=wall, was_link=was_link)

    def _unpaired_from(self, move: _MoveFrom) -> None:
        """A rename out of the watched tree (or the pair was lost): the source is gone."""
        if move.ignored:
            return
        self._removed(
            self._dirs.get(move.directory), move.path, move.name, move.is_dir, move.mono, move.wall
        )

    def _moved(
        self,
        source: _MoveFrom | None,
        parent: _Dir,
        directory: bytes,
        name: bytes,
        is_dir: bool,
        ignored: bool,
        raw: _Raw,
    ) -> None:
        path = _join(directory, name)
        mono, wall, root = raw.mono, raw.wall, parent.root
        if source is not None and not source.ignored and ignored:
            self._unpaired_from(source)
            return
        if ignored:
            return
        if source is None or source.ignored:
            # Moved in from outside, or an editor's temporary file renamed into place.
            existed = parent.entries.get(name)
            if is_dir:
                if existed is not None:
                    self._forget_tree(path, record=False, mono=mono, wall=wall)
                parent.entries[name] = _DIR
                self._change(path, CREATED, root, is_dir=True, mono=mono, wall=wall)
                self._adopt(path, root, record=True, mono=mono, wall=wall)
            else:
                parent.entries[name] = 0
                kind = MODIFIED if existed is not None and not existed & _DIR else CREATED
                self._change(path, kind, root, is_dir=False, mono=mono, wall=wall)
            return
        source_dir = self._dirs.get(source.directory)
        entry = source_dir.entries.pop(source.name, None) if source_dir is not None else None
        existed = parent.entries.get(name)
        own = self._pending.get(source.path)
        # Born within the window and renamed: a temporary name, not worth a row of its own.
        temporary = own is not None and own.kind == CREATED
        if own is not None and not temporary:
            self._emit(source.path)
        if is_dir:
            if path in self._pending:
                self._emit(path)
            if existed is not None and path in self._dirs:
                self._forget_tree(path, record=False, mono=mono, wall=wall)
            parent.entries[name] = _DIR
            # Moves the source's pending rows (its own temporary `created` included) along.
            self._rename_tree(source.path, path, root)
            if temporary:
                self._pending.pop(path, None)
            moved = self._dirs.get(path)
            if temporary or moved is None or moved.wd is None:
                # Renamed before its creation was processed (so never watched or listed), or
                # never watched: content made meanwhile would be missed. Rows for what is
                # already known are not repeated.
                self._adopt(path, root, record=True, mono=mono, wall=wall)
        else:
            if temporary:
                del self._pending[source.path]
            parent.entries[name] = entry if entry is not None else 0
        if temporary:
            replaced = existed is not None and not is_dir and not existed & _DIR
            kind = MODIFIED if replaced else CREATED
        else:
            kind = MOVED
        was_link = entry is not None and bool(entry & _LINK)
        self._change(path, kind, root, is_dir=is_dir, mono=mono, wall=wall, was_link=was_link)

    def _on_watch_gone(self, wd: WatchDescriptor) -> None:
        path = self._wd_paths.pop(wd, None)
        if path is None:
            return
        directory = self._dirs.get(path)
        if directory is not None and directory.wd == wd:
            directory.wd = None
            directory.callback_id = None
            if path == directory.root.path and directory.root.watched:
                self._root_lost(directory.root, "removed")

    def _root_lost(self, root: _Root, how: str) -> None:
        now, wall = time.monotonic(), self._clock()
        self._log.warning(
            "fs.root_lost", root=root.text, how=how, retry_seconds=self._retry_seconds
        )
        root.watched = False
        self._forget_tree(root.path, record=True, mono=now, wall=wall)
        self._retry_root(root)

    def _retry_root(self, root: _Root) -> None:
        if os.path.isdir(root.path):
            self._log.info("fs.root_watched", root=root.text)
            self._watch_root(root)

    # --- watches and the snapshot ----------------------------------------------------------

    def _adopt(self, top: bytes, root: _Root, *, record: bool, mono: float, wall: float) -> None:
        """Watch `top` and every non-ignored directory below it, each before listing it, so
        anything created after a listing arrives as an event. Only a baseline walk gives way to
        a stop: a new directory's content is recorded in full."""
        stack = [top]
        while stack and (record or not self._stopping.is_set()):
            path = stack.pop()
            directory = self._dirs.get(path)
            if directory is None:
                directory = self._dirs[path] = _Dir(root)
            if directory.wd is None:
                self._watch(path, directory)
            for name, entry in self._list(path).items():
                known = name in directory.entries
                directory.entries[name] = entry
                if record and not known:
                    self._change(
                        _join(path, name),
                        CREATED,
                        root,
                        is_dir=bool(entry & _DIR),
                        mono=mono,
                        wall=wall,
                    )
                if entry & _DIR:
                    stack.append(_join(path, name))

    def _list(self, path: bytes) -> dict[bytes, int]:
        entries: dict[bytes, int] = {}
        try:
            with os.scandir(path) as listing:
                for item in listing:
                    name = item.name
                    if self._ignored(name):
                        continue
                    try:
                        entries[name] = _entry(item.stat(follow_symlinks=False))
                    except OSError:
                        continue
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._log.warning("fs.list_failed", path=_text(path)[0], error=str(exc))
        return entries

    def _watch(self, path: bytes, directory: _Dir) -> bool:
        """Place (or renew) the watch on `path`; True if it is watched now. A refusal for the
        watch limit leaves `path` in `_unwatched`, to be asked again; other failures (gone,
        permission) are not retried, since asking again would not help."""
        fd = self._fd
        if fd is None or self._closing:
            return False
        mask = _ROOT_MASK if path == directory.root.path else _WATCH_MASK
        callback_id = CallbackId(next(self._ids))
        try:
            wd = fd.add_callback(path, mask, self._relay, callback_id)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._unwatched.add(path)
                self._watch_limit_reached(path)
                return False
            self._unwatched.discard(path)
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._log.warning("fs.watch_failed", path=_text(path)[0], error=str(exc))
            return False
        self._unwatched.discard(path)
        if wd < 0:
            # watchdog returns -1 instead of raising for EACCES; undo its bookkeeping.
            fd.remove_callbacks([(wd, callback_id)])
            self._log.warning("fs.watch_failed", path=_text(path)[0], error="permission denied")
            return False
        # inotify returns the existing descriptor when this inode is already watched (a
        # rescan, a move missed in an overflow): keep one callback per watch so each event
        # arrives once.
        previous_path = self._wd_paths.get(wd)
        if previous_path is not None:
            other = self._dirs.get(previous_path)
            if other is not None and other.wd == wd and other.callback_id is not None:
                fd.remove_callbacks([(wd, other.callback_id)])
                other.wd = None
                other.callback_id = None
        if directory.wd is not None and directory.callback_id is not None:
            # The old descriptor died while its IN_IGNORED was lost.
            fd.remove_callbacks([(directory.wd, directory.callback_id)])
            self._wd_paths.pop(directory.wd, None)
        directory.wd = wd
        directory.callback_id = callback_id
        self._wd_paths[wd] = path
        return True

    def _unwatch(self, directory: _Dir) -> None:
        wd, callback_id = directory.wd, directory.callback_id
        directory.wd = None
        directory.callback_id = None
        if wd is None or callback_id is None:
            return
        self._wd_paths.pop(wd, None)
        if self._fd is not None:
            try:
                self._fd.remove_callbacks([(wd, callback_id)])
            except OSError as exc:
                self._log.debug("fs.unwatch_failed", error=str(exc))

    def _watch_limit_reached(self, path: bytes) -> None:
        self.watch_limit_hits += 1
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
            first_unwatched=_text(path)[0],
        )

    def _update_watch_count(self) -> None:
        self.watches = len(self._wd_paths)
        self.unwatched = len(self._unwatched)

    def _retry_unwatched(self) -> None:
        """Ask again for the watches the limit refused: the user may have raised it, or
        watches were freed. Any refused directory serves as a probe, so while the limit still
        holds a round costs one refused call; once one is granted the rest follow, parents
        before children (a parent's rescan takes its unwatched subdirectories along)."""
        mono, wall = time.monotonic(), self._clock()
        if not self._rewatch(next(iter(self._unwatched)), mono, wall):
            return
        for path in sorted(self._unwatched):
            if path in self._unwatched and not self._rewatch(path, mono, wall):
                return
        if not self._unwatched:
            self._log.info(
                "fs.watch_limit_cleared",
                detail="every directory is watched again",
                watches=len(self._wd_paths),
            )
            self._limit_logged = False  # reaching the limit again deserves a new warning

    def _rewatch(self, path: bytes, mono: float, wall: float) -> bool:
        """Watch a directory the limit refused, then rescan it so changes made while it was
        unwatched are recorded. False only if the limit refuses it again."""
        directory = self._dirs.get(path)
        if directory is None or directory.wd is not None:
            self._unwatched.discard(path)  # forgotten or watched meanwhile
            return True
        if self._watch(path, directory):
            self._rescan_tree(path, directory.root, mono, wall, rewatch=False)
            return True
        if path in self._unwatched:
            return False
        # Gone meanwhile. A subdirectory's deletion is recorded through its parent (an event,
        # or the parent's own rescan); a root has no parent to report it.
        root = directory.root
        if path == root.path and root.watched and not os.path.isdir(path):
            self._root_lost(root, "removed")
        return True

    def _subtree(self, path: bytes) -> list[bytes]:
        """`path` and the known directories below it, found through the snapshot's entries so
        that removing a directory costs its own size, not the whole tree's."""
        found: list[bytes] = []
        stack = [path]
        while stack:
            current = stack.pop()
            directory = self._dirs.get(current)
            if directory is None:
                continue
            found.append(current)
            stack.extend(
                _join(current, name) for name, entry in directory.entries.items() if entry & _DIR
            )
        return found

    def _forget_tree(self, path: bytes, *, record: bool, mono: float, wall: float) -> None:
        for directory_path in self._subtree(path):
            directory = self._dirs.pop(directory_path)
            self._unwatched.discard(directory_path)
            self._unwatch(directory)
            if record:
                for name, entry in directory.entries.items():
                    self._change(
                        _join(directory_path, name),
                        DELETED,
                        directory.root,
                        is_dir=bool(entry & _DIR),
                        mono=mono,
                        wall=wall,
                        was_link=bool(entry & _LINK),
                    )

    def _rename_tree(self, source: bytes, target: bytes, root: _Root) -> None:
        for old in self._subtree(source):
            directory = self._dirs.pop(old)
            new = target + old[len(source) :]
            directory.root = root
            self._dirs[new] = directory
            if directory.wd is not None:
                self._wd_paths[directory.wd] = new
            if old in self._unwatched:
                self._unwatched.discard(old)
                self._unwatched.add(new)
        prefix = _prefix(source)
        if any(p == source or p.startswith(prefix) for p in self._pending):

            def rekey(p: bytes, pending: _Pending) -> bytes:
                if p != source and not p.startswith(prefix):
                    return p
                pending.root = root
                return target + p[len(source) :]

            self._pending = OrderedDict((rekey(p, v), v) for p, v in self._pending.items())
        self._projects.clear()

    def _root_of(self, path: bytes) -> _Root | None:
        return next(
            (r for r in self._roots if path == r.path or path.startswith(_prefix(r.path))), None
        )

    def _rescan(self) -> None:
        self.overflows += 1
        self._log.warning(
            "fs.events_lost",
            detail="inotify event queue overflowed; rescanning the roots to record what changed",
            roots=[r.text for r in self._roots if r.watched],
            overflows=self.overflows,
        )
        self._relay.resume()
        self._moves_from.clear()
        self._projects.clear()
        mono, wall = time.monotonic(), self._clock()
        for root in self._roots:
            if root.watched:
                self._rescan_tree(root.path, root, mono, wall, rewatch=True)

    def _rescan_tree(
        self, top: bytes, root: _Root, mono: float, wall: float, *, rewatch: bool
    ) -> None:
        """Record what changed below `top` since the snapshot, and watch what is not watched.
        With `rewatch`, after an overflow, every watch is renewed (a lost move may have left
        one under a stale path) and every directory listed; without it only `top` and the
        directories below it that were not watched, whose snapshot may be stale."""
        stack = [top]
        while stack and not self._stopping.is_set():
            path = stack.pop()
            directory = self._dirs.get(path)
            if directory is None:
                directory = self._dirs[path] = _Dir(root)
            elif not rewatch and path != top and directory.wd is not None:
                continue  # watched all along, so its snapshot is current
            if rewatch or directory.wd is None:
                self._watch(path, directory)
            if not os.path.isdir(path):
                continue  # vanished meanwhile; its parent's listing records that
            fresh = self._list(path)
            old = directory.entries
            for name, entry in fresh.items():
                child = _join(path, name)
                before = old.get(name)
                is_dir = bool(entry & _DIR)
                if before is not None and bool(before & _DIR) != is_dir:
                    if before & _DIR:
                        self._forget_tree(child, record=True, mono=mono, wall=wall)
                    self._change(child, DELETED, root, is_dir=not is_dir, mono=mono, wall=wall)
                    before = None
                if before is None:
                    self._change(child, CREATED, root, is_dir=is_dir, mono=mono, wall=wall)
                elif not is_dir and before != entry:
                    self._change(child, MODIFIED, root, is_dir=False, mono=mono, wall=wall)
                if is_dir:
                    stack.append(child)
            for name, before in old.items():
                if name not in fresh:
                    child = _join(path, name)
                    if before & _DIR:
                        self._forget_tree(child, record=True, mono=mono, wall=wall)
                    self._change(
                        child,
                        DELETED,
                        root,
                        is_dir=bool(before & _DIR),
                        mono=mono,
                        wall=wall,
                        was_link=bool(before & _LINK),
                    )
            directory.entries = fresh

    # --- coalescing and rows ---------------------------------------------------------------

    def _change(
        self,
        path: bytes,
        kind: str,
        root: _Root,
        *,
        is_dir: bool,
        mono: float,
        wall: float,
        was_link: bool = False,
    ) -> None:
        if is_dir and kind == MODIFIED:
            return  # a directory's entries or times changed: noise, its entries have rows
        pending = self._pending.get(path)
        if pending is not None:
            merged = self._merge(pending.kind, kind, same_type=pending.is_dir == is_dir)
            if merged is not None:
                if merged != pending.kind:
                    pending.kind = merged
                    pending.at = wall
                pending.is_dir = is_dir
                pending.was_link = pending.was_link or was_link
                pending.root = root
                return
            self._emit(path)
        self._pending[path] = _Pending(kind, wall, mono + self._window, root, is_dir, was_link)

    @staticmethod
    def _merge(old: str, new: str, *, same_type: bool) -> str | None:
        """The kind that stands for `old` followed by `new`, or None for "two rows"."""
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

    def _emit(self, path: bytes) -> None:
        pending = self._pending.pop(path)
        self._add_row(path, pending)

    def _flush(self, watermark: float) -> None:
        while self._pending:
            path, pending = next(iter(self._pending.items()))
            if pending.deadline > watermark:
                break
            self._pending.popitem(last=False)
            self._add_row(path, pending)

    def _add_row(self, path: bytes, pending: _Pending) -> None:
        try:
            self._rows.append(self._row(path, pending))
        except Exception as exc:
            self.errors += 1
            self._log.error("fs.row_failed", path=_text(path)[0], error=repr(exc), exc_info=True)

    def _row(self, path: bytes, pending: _Pending) -> Row:
        st: os.stat_result | None = None
        if pending.kind != DELETED:
            with contextlib.suppress(OSError):
                st = os.lstat(path)
        directory, name = os.path.split(path)
        if st is not None:
            is_dir = stat.S_ISDIR(st.st_mode)
            is_link = stat.S_ISLNK(st.st_mode)
            parent = self._dirs.get(directory)
            if parent is not None and name in parent.entries:
                parent.entries[name] = _entry(st)
        else:
            is_dir, is_link = pending.is_dir, pending.was_link
        root = pending.root
        path_text, raw = _text(path)
        name_text = _text(name)[0]
        extension = None if is_dir else (os.path.splitext(name_text)[1] or None)
        event_time = int(pending.at)
        return {
            "event_time": event_time,
            "event_time_iso": self._iso(event_time),
            "event_type": pending.kind,
            "file_path": path_text,
            "file_path_relative": _text(path[len(root.path) :].lstrip(b"/"))[0],
            "file_name": name_text,
            "file_extension": extension,
            "file_size": st.st_size if st is not None and not is_dir else None,
            "is_symlink": int(is_link),
            "monitored_root": root.text,
            "project_name": self._project(directory, root),
            "created_at": int(self._clock()),
            "file_path_raw": raw,
        }

    def _iso(self, epoch: int) -> str:
        cached_epoch, text = self._iso_cache
        if cached_epoch != epoch:
            text = iso(epoch)
            self._iso_cache = (epoch, text)
        return text

    def _project(self, directory: bytes, root: _Root) -> str:
        cached = self._projects.get(directory)
        if cached is not None:
            return cached
        if len(self._projects) > 100_000:
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
            if os.path.lexists(_join(current, b".git")):
                result = _text(os.path.basename(current))[0] or root.name
                break
            if len(current) <= len(root.path):
                break
            current = os.path.dirname(current)
        for visited in chain:
            self._projects[visited] = result
        return result

    def _send(self) -> None:
        if self._rows:
            self._out.put(self._rows)
            self._rows = []

    # --- writer thread -------------------------------------------------------------------

    def _write_loop(self) -> None:
        done = False
        while not done:
            batch: list[Row] = []
            item = self._out.get()
            done = item is _STOP
            if not done:
                batch.extend(self._batch(item))
            while not done and len(batch) < MAX_BATCH_ROWS:
                try:
                    item = self._out.get_nowait()
                except queue.Empty:
                    break
                done = item is _STOP
                if not done:
                    batch.extend(self._batch(item))
            if batch:
                self._write(batch)

    @staticmethod
    def _batch(item: object) -> Iterator[Row]:
        assert isinstance(item, list)
        return iter(item)

    def _write(self, batch: list[Row]) -> None:
        delay = 0.5
        attempts_after_stop = 0
        while True:
            try:
                self._writer.insert_many(batch)
                self.events_recorded += len(batch)
                return
            except StoreClosed:
                self._drop(batch, "the store is closed")
                return
            except Exception as exc:
                self.errors += 1
                self._log.error("fs.write_failed", error=repr(exc), rows=len(batch))
            if self._stopping.is_set():
                attempts_after_stop += 1
                if attempts_after_stop >= 3:
                    self._drop(batch, "still failing at shutdown")
                    return
                delay = 0.2
            # Retrying keeps the rows; waiting on the stop flag lets shutdown cut it short.
            self._stopping.wait(delay)
            delay = min(delay * 2, 30.0)

    def _drop(self, batch: list[Row], why: str) -> None:
        self.rows_dropped += len(batch)
        self.errors += 1
        self._log.error("fs.rows_dropped", rows=len(batch), reason=why)
