"""The processor thread: owns all bookkeeping (watches, snapshot, coalescing), so events are
applied strictly in kernel order; it hands finished rows to the writer thread.

It starts the inotify instance and the start scan of each root (watch and list everything,
then compare with the persistent snapshot: `catchup`), then reads the relay's queue in bursts;
between bursts it writes the rows whose window closed, gives up on unpaired renames and, every
`retry_seconds`, asks again for missing roots and refused watches. While events are still
queued, "now" is the newest event seen, so a slow processor coalesces exactly as a fast one
would.

Stopping: closing the inotify instance discards what the kernel still holds, so first a marker
file is created in a fresh watched directory and events are applied until its event arrives
(the shutdown fence: one queue, so everything before it has arrived too; watchman's "cookie"
technique, kept out of the user's directories). Then every pending row is written.
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from watchdog.observers.inotify_c import WatchDescriptor

from host_agent.collectors.base import RUNNING, failed
from host_agent.collectors.filesystem.catchup import Comparison, root_gone
from host_agent.collectors.filesystem.coalescer import Coalescer, Pending
from host_agent.collectors.filesystem.paths import text
from host_agent.collectors.filesystem.relay import OVERFLOW, STOP, Gone, Raw, Relay
from host_agent.collectors.filesystem.roots import Root, resolve_roots
from host_agent.collectors.filesystem.rows import RowBuilder, current_stat, snapshot_change
from host_agent.collectors.filesystem.snapshot import Snapshot, ignore_matcher
from host_agent.collectors.filesystem.tree import WatchedTree
from host_agent.collectors.filesystem.watches import WatchSet
from host_agent.collectors.filesystem.writer import Built, Found, RowHandoff
from host_agent.config import FilesystemCollectorConfig
from host_agent.errors import StoreError
from host_agent.store.snapshot import Change, SnapshotReader
from host_agent.store.writer import Row

FENCE_SECONDS = 2.0
BURST_EVENTS = 4096
MAX_WAIT_SECONDS = 5.0
# While rows wait for room in the store's queue, look again this often.
HELD_WAIT_SECONDS = 0.01


class EventProcessor:
    """`errors` counts events, rows and starts that failed (each logged with its traceback)."""

    def __init__(
        self,
        config: FilesystemCollectorConfig,
        batches: RowHandoff,
        log: Any,
        *,
        clock: Callable[[], float],
        retry_seconds: float,
        stopping: threading.Event,
    ) -> None:
        self._config = config
        self._batches = batches
        self._log = log
        self._clock = clock
        self._retry_seconds = retry_seconds
        self._stopping = stopping
        self._raw: queue.SimpleQueue[object] = queue.SimpleQueue()
        relay = Relay(self._raw, clock)
        self.watches = WatchSet(relay, log, retry_seconds)
        self._changes = Coalescer(config.coalesce_ms / 1000, self._add_row)
        self._snapshot = Snapshot(
            ignore_matcher(config.ignore), self.watches, self._changes, log, stopping
        )
        self._rows = RowBuilder(clock)
        self.tree = WatchedTree(
            [],
            snapshot=self._snapshot,
            watches=self.watches,
            changes=self._changes,
            relay=relay,
            forget_projects=self._rows.forget_projects,
            log=log,
            clock=clock,
            retry_seconds=retry_seconds,
        )
        self._finished: list[Row] = []
        self._effects: list[Change] = []  # each finished row's snapshot change
        batches.build = self._build
        self.found_at_start = 0  # changes the start scans found
        self._next_retry = 0.0
        self._last_mono = 0.0  # reader timestamp of the newest event processed
        self._fence_wd: WatchDescriptor | None = None
        self._fenced = False
        self.errors = 0

    def halt(self) -> None:
        """Thread-safe: stop reading events (with the collector's `stopping` flag set)."""
        self._raw.put(STOP)

    def run(self, started: Callable[[str], None]) -> None:
        """The thread: record until halted, then flush. `started(state)` is called once the
        initial watches are placed (state "running") or inotify failed (a "failed: ..." state,
        and nothing is recorded until the stop)."""
        try:
            started(self._start())
            self._read_events()
        finally:
            self._shutdown()

    def _start(self) -> str:
        started = time.monotonic()
        self.tree.roots = resolve_roots(self._config.roots, self._log)
        # The first use of tempfile probes the temp directory with a scratch file; done now,
        # before any watch exists, the shutdown fence leaves no trace even if it lies in a root.
        tempfile.gettempdir()
        try:
            self.watches.open()
        except OSError as exc:
            self.errors += 1
            hint = (
                "raise fs.inotify.max_user_instances, e.g. "
                "`sudo sysctl fs.inotify.max_user_instances=512`"
                if exc.errno == errno.EMFILE
                else None
            )
            self._log.error("fs.inotify_unavailable", error=str(exc), hint=hint)
            return failed(f"inotify unavailable ({exc})")
        for root in self.tree.roots:
            found = self._start_scan(root)
            if self._stopping.is_set():
                return RUNNING  # a scan cut short compares nothing: the next start does
            self.found_at_start += len(found)
            self._batches.found(found)
        self._next_retry = time.monotonic() + self._retry_seconds
        self._log.info(
            "fs.watching",
            roots=[r.text for r in self.tree.roots if r.watched],
            directories=len(self._snapshot.dirs),
            watches=self.watches.count,
            unwatched=self.watches.refused,
            watch_limit_hits=self.watches.limit_hits,
            found_at_start=self.found_at_start,
            seconds=round(time.monotonic() - started, 3),
        )
        return RUNNING

    def _start_scan(self, root: Root) -> list[Found]:
        """Watch `root` and compare it with its persistent snapshot; what changed since, as
        rows to be, in order (see `catchup`). A snapshot that cannot be read skips the
        comparison: nothing found is recorded, the snapshot still matches the rows, and the
        next start compares."""
        scan_time = self._clock()
        present = self.tree.watch_root(root, record=False)
        if self._stopping.is_set():
            return []
        if not present:
            self.tree.await_root(root)
        old: SnapshotReader | None = None
        try:
            old = SnapshotReader(self._batches.queue.path, root.path)
            if not present:
                found = root_gone(root, old, scan_time=scan_time)
            else:
                found = Comparison(root, self._snapshot.dirs, old, scan_time=scan_time).compare()
        except StoreError as exc:
            self._log.warning(
                "fs.snapshot_unreadable",
                root=root.text,
                error=str(exc),
                detail="changes made while the agent was not running are not compared now; "
                "the next start compares them",
            )
            return []
        finally:
            if old is not None:
                old.close()
        return [Found(p, pending) for p, pending in found]

    def _read_events(self) -> None:
        while True:
            try:
                item = self._raw.get(timeout=self._next_timeout())
            except queue.Empty:
                item = None
            caught_up = True
            if item is STOP:
                return
            if item is not None:
                self._dispatch(item)
                burst = 0
                for item in self._queued(BURST_EVENTS):
                    if item is STOP:
                        return
                    self._dispatch(item)
                    burst += 1
                caught_up = burst < BURST_EVENTS
            self._after_burst(caught_up)

    def _queued(self, most: int | None = None) -> Iterator[object]:
        """What the queue holds now, without waiting; at most `most` items."""
        for _ in range(most) if most is not None else itertools.count():
            try:
                yield self._raw.get_nowait()
            except queue.Empty:
                return

    def _next_timeout(self) -> float:
        due = self._next_retry
        for deadline in (self._changes.next_deadline(), self.tree.moves.next_due()):
            if deadline is not None:
                due = min(due, deadline)
        longest = HELD_WAIT_SECONDS if self._batches.held else MAX_WAIT_SECONDS
        return min(max(due - time.monotonic(), 0.0), longest)

    def _after_burst(self, caught_up: bool) -> None:
        """Write what is due. While events are still queued, "now" is the newest event seen,
        so a slow processor coalesces exactly as a fast one would."""
        self._batches.pump()
        now = time.monotonic()
        watermark = now if caught_up else self._last_mono
        for move in self.tree.moves.unpaired(watermark):
            self._guard(self.tree.unpaired_from, move)
        self._changes.flush(watermark)
        if now >= self._next_retry:
            self._next_retry = now + self._retry_seconds
            if self.watches.active:
                for root in self.tree.roots:
                    if not root.watched:
                        self._guard(self.tree.retry_root, root)
                if self.watches.refused:
                    self._guard(self.tree.retry_refused)
        self._send()

    def _dispatch(self, item: object) -> None:
        if isinstance(item, Raw):
            self._last_mono = item.mono
            if item.event.wd == self._fence_wd:
                self._fenced = True
                return
            self._guard(self.tree.on_event, item)
        elif isinstance(item, Gone):
            if self.watches.active:
                self._guard(self.tree.on_watch_gone, item.wd)
        elif item is OVERFLOW and self.watches.active:
            self._guard(self.tree.rescan)

    def _guard(self, func: Callable[..., None], *args: Any) -> None:
        try:
            func(*args)
        except Exception as exc:
            # One odd path (a race with a vanishing directory, a permission change) must not
            # stop the collector; it is counted and logged with its traceback.
            self.errors += 1
            self._log.error("fs.event_failed", error=repr(exc), exc_info=True)

    # --- rows ------------------------------------------------------------------------------

    def _add_row(self, path: bytes, pending: Pending) -> None:
        """The coalescer's output: a row for `pending`, stat'ed now."""
        built = self._build(path, pending)
        if built is not None:
            self._finished.append(built[0])
            self._effects.append(built[1])

    def _build(self, path: bytes, pending: Pending) -> Built | None:
        """The row for `pending` at `path` and its effect on the persistent snapshot."""
        try:
            st = current_stat(path, pending)
            if st is not None:
                self._snapshot.refresh(path, st)
            return self._rows.row(path, pending, st), snapshot_change(path, pending, st)
        except Exception as exc:
            self.errors += 1
            self._log.error("fs.row_failed", path=text(path)[0], error=repr(exc), exc_info=True)
            return None

    def _send(self) -> None:
        if self._finished:
            self._batches.send(self._finished, self._effects)
            self._finished, self._effects = [], []

    # --- stopping --------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._stopping.set()
        fence = self._fence()
        self.watches.close()
        # Events read before the reader stopped are real changes: apply them, then flush all.
        for item in self._queued():
            if item is not STOP:
                self._dispatch(item)
        for move in self.tree.moves.unpaired():
            self._guard(self.tree.unpaired_from, move)
        self._changes.flush(float("inf"))
        self._send()
        self._batches.pump(stopping=True)
        if fence is not None:
            shutil.rmtree(fence, ignore_errors=True)

    def _fence(self) -> str | None:
        """Make sure every change made before the stop has been read before inotify closes
        (see the module docstring). Returns the fence's directory, to be removed."""
        if not self.watches.active:
            return None
        try:
            fence = tempfile.mkdtemp(prefix="host-agent-fence-")
        except OSError as exc:
            self._log.warning("fs.fence_failed", error=str(exc))
            return None
        self.tree.hidden = os.fsencode(fence)  # the temp directory may lie in a root
        try:
            self._fence_wd = self.watches.watch_marker(os.fsencode(fence))
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
            if item is not STOP:
                self._dispatch(item)
        return fence
