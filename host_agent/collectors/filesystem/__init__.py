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
    in kernel order (`processor`). One writer thread writes batches through the `RowWriter`
    with `insert_many` (`writer`); whoever made the writer closes it (the agent, after `run()`
    returns).

No silent loss
    When the kernel queue overflows or the collector's own queue is full, a warning is logged
    and every root is rescanned against the in-memory snapshot (`snapshot`). All roots share one
    inotify instance, so an overflow concerns them all. When the inotify watch limit is reached,
    the refused directories are still scanned and their watches asked for again (`watches`).
    The initial scan is the baseline: files present at start are not recorded.

Modules, and what each owns
    collector   `FileChangeCollector`: its two threads, state and counters
    processor   the processor thread: start, events read in bursts, rows flushed by deadline,
                retries of roots and watches, the shutdown fence
    tree        events applied to the model: creations, deletions, renames, roots lost and
                found, rescans
    moves       renames' MOVED_FROM events waiting for their MOVED_TO
    coalescer   pending changes by path and their merge rules (pure); what a row's kind means
    snapshot    the known directories and their entries; new trees adopted, rescans, trees
                forgotten; ignore patterns
    watches     the inotify instance, watches by path and descriptor, the watch limit
    relay       watchdog's callback and the queue to the processor
    rows        a row's columns: stat, project name, UTF-8 text and raw bytes
    writer      the writer thread: batches, write retries, the one insert into the store
    roots       the configured roots, resolved
    paths       byte paths
"""

from host_agent.collectors.filesystem.collector import WATCH_RETRY_SECONDS, FileChangeCollector

__all__ = ["WATCH_RETRY_SECONDS", "FileChangeCollector"]
