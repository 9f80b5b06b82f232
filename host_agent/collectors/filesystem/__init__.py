"""File change collector: inotify (through watchdog) into `file_change_events`.

How it watches
    watchdog's recursive inotify observer places a watch on every directory, ignored or not, and
    runs one emitter thread per scheduled path. Instead this collector drives watchdog's inotify
    layer (`InotifyFD`: one inotify instance, one reader thread) directly and places one
    non-recursive watch per directory it walks itself, skipping ignored names, so an ignored
    tree (`node_modules`, `.git`) costs no watch and produces no event.

Threads
    watchdog's reader thread only timestamps events and queues them (`relay`). One processor
    thread owns all bookkeeping (watches, snapshot, coalescing), so events are applied strictly
    in kernel order (`processor`). The store's write queue (`host_agent.store.queue`) writes
    the rows, with their snapshot changes, on its own thread (`writer` hands them over);
    whoever made the queue closes it (the agent, after `run()` returns).

A faithful history: the rows replay to the disk
    Replaying a root's rows in the order they were written gives the paths that exist
    (`replay`; `scripts/replay_check.py` does it against the disk): created and modified say a
    path exists, deleted that exactly that path no longer does, moved that the source
    (`previous_path`) and everything below it now live at the destination (`file_path`). A
    directory's move is one row: everything under it moves with it. Rows leave in an order that
    replays (see `coalescer`). A move between two roots is a deletion in one and a creation in
    the other, so each root's rows replay on their own.

Catch-up at start (`catchup`)
    Beside the rows, in the same transactions, the store keeps a persistent snapshot of each
    root (`host_agent.store.snapshot`: path, type, size, mtime, inode), which is by construction
    exactly the replay of the rows written so far. At start every root is walked (watches first,
    as always) and compared with it: what was created, modified, deleted or moved while the
    collector was not running, or was lost with it (`kill -9`, a dropped row), gets its row,
    with `found_at_start = 1` and the best time known (mtime for created and modified, ctime for
    a move, the scan's time for a deletion). A move is recognised by its inode; a root seen for
    the first time has an empty snapshot, so its content is recorded as created, once. A root
    missing at start has its known content recorded as deleted.

Roots that vanish and return
    A root removed or moved away gets `deleted` rows for what was known inside it; when it is
    there again (checked every `retry_seconds`, and at once when its parent directory reports
    it) it is watched again and its content recorded as `created`.

No silent loss
    When the kernel queue overflows or the collector's own queue is full, a warning is logged
    and every root is rescanned against the in-memory snapshot (`snapshot`). All roots share one
    inotify instance, so an overflow concerns them all. When the inotify watch limit is reached,
    the refused directories are still scanned and their watches asked for again (`watches`).
    Rows are handed to the store's queue as it has room (`writer`), so a start scan that finds
    many changes loses none to the queue's bound; what it could not hand over before a stop is
    found again at the next start.

Modules, and what each owns
    collector   `FileChangeCollector`: its two threads, state and counters
    processor   the processor thread: start, events read in bursts, rows flushed by deadline,
                retries of roots and watches, the shutdown fence
    tree        events applied to the model: creations, deletions, renames, roots lost and
                found, rescans
    catchup     the start scan: the disk against the persistent snapshot, moves by inode
    replay      the replay rule (pure), shared with scripts/replay_check.py
    moves       renames' MOVED_FROM events waiting for their MOVED_TO
    coalescer   pending changes by path and their merge rules (pure); what a row's kind means
    snapshot    the known directories and their entries; new trees adopted, rescans, trees
                forgotten; ignore patterns
    watches     the inotify instance, watches by path and descriptor, the watch limit
    relay       watchdog's callback and the queue to the processor
    rows        a row's columns: stat, project name, UTF-8 text and raw bytes
    writer      the hand-off to the store's write queue, as it has room, in order
    roots       the configured roots, resolved
    paths       byte paths
"""

from host_agent.collectors.filesystem.collector import WATCH_RETRY_SECONDS, FileChangeCollector

__all__ = ["WATCH_RETRY_SECONDS", "FileChangeCollector"]
