"""The coalescer's rules, table by table (see host_agent/collectors/filesystem/coalescer.py).

Each case is a sequence of changes at given times (seconds) with a one-second window, and the
rows that come out, in order, as "kind path" strings ("moved b<-a" for a move from a). No
filesystem, no inotify: the coalescer is pure, so these run its rules alone.
"""

from __future__ import annotations

import math

import pytest

from host_agent.collectors.filesystem.coalescer import (
    CREATED,
    DELETED,
    MODIFIED,
    MOVED,
    Coalescer,
    Pending,
    merge,
)
from host_agent.collectors.filesystem.replay import Change, Replay, replay
from host_agent.collectors.filesystem.roots import Root

ROOT = Root(b"/r", "/r", "r")
WINDOW = 1.0

# A step: (time, operation, path...) with the operations
#   created / modified / deleted / moved PATH      a change on a file
#   created/ / modified/ / deleted/ / moved/ PATH  the same on a directory
#   renamed SOURCE TARGET                          a file renamed within the tree; "renamed!"
#                                                  when TARGET was a file already (replaced)
#   arrived TARGET                                 renamed in from an ignored name or from
#                                                  outside; "arrived!" when it replaced a file
Step = tuple[float, str, str] | tuple[float, str, str, str]


def run(steps: list[Step], window: float = WINDOW) -> list[str]:
    rows: list[str] = []

    def emit(path: bytes, pending: Pending) -> None:
        suffix = "/" if pending.is_dir else ""
        source = f"<-{pending.source.decode()}" if pending.source is not None else ""
        rows.append(f"{pending.kind} {path.decode()}{suffix}{source}")

    coalescer = Coalescer(window, emit)
    for at, operation, *paths in steps:
        coalescer.flush(at)  # as the processor does between bursts
        first = paths[0].encode()
        if operation.startswith("renamed"):
            target = paths[1].encode()
            replaced = operation.endswith("!")
            coalescer.renamed(first, target, ROOT, replaced=replaced, mono=at, wall=at)
        elif operation.startswith("arrived"):
            replaced = operation.endswith("!")
            coalescer.arrived(first, ROOT, is_dir=False, replaced=replaced, mono=at, wall=at)
        else:
            kind = operation.rstrip("/")
            is_dir = operation.endswith("/")
            coalescer.change(first, kind, ROOT, is_dir=is_dir, mono=at, wall=at)
    coalescer.flush(math.inf)
    return rows


# The merge table, pair by pair: old + new within one window -> rows.
MERGES = [
    # (old, new, rows)
    ("created", "modified", ["created a"]),
    ("created", "created", ["created a"]),
    ("created", "deleted", ["created a", "deleted a"]),  # a short-lived file is still seen
    ("created", "moved", ["created a", "moved a"]),
    ("modified", "modified", ["modified a"]),
    ("modified", "created", ["modified a"]),
    ("modified", "deleted", ["deleted a"]),
    ("modified", "moved", ["moved a"]),
    ("deleted", "modified", ["modified a"]),
    ("deleted", "deleted", ["deleted a"]),
    ("deleted", "created", ["modified a"]),  # replaced
    ("deleted", "moved", ["moved a"]),
    ("moved", "modified", ["moved a"]),
    ("moved", "created", ["moved a"]),
    ("moved", "deleted", ["moved a", "deleted a"]),
    ("moved", "moved", ["moved a", "moved a"]),
]


@pytest.mark.parametrize(("old", "new", "rows"), MERGES, ids=[f"{o}+{n}" for o, n, _ in MERGES])
def test_merge_table(old: str, new: str, rows: list[str]) -> None:
    assert run([(0.0, old, "a"), (0.5, new, "a")]) == rows


def test_the_merge_table_covers_every_pair() -> None:
    kinds = (CREATED, MODIFIED, DELETED, MOVED)
    assert {(old, new) for old, new, _ in MERGES} == {(o, n) for o in kinds for n in kinds}
    for old, new, rows in MERGES:
        expected = None if len(rows) == 2 else rows[0].split()[0]
        assert merge(old, new, same_type=True) == expected, (old, new)


CASES: dict[str, tuple[list[Step], list[str]]] = {
    "repeated writes are one row": (
        [(0.0, "modified", "a"), (0.2, "modified", "a"), (0.9, "modified", "a")],
        ["modified a"],
    ),
    "the window counts from the first change: later ones are a new row": (
        [(0.0, "modified", "a"), (0.9, "modified", "a"), (1.5, "modified", "a")],
        ["modified a", "modified a"],
    ),
    "a new file written to in bursts": (
        [(0.0, "created", "a"), (0.1, "modified", "a"), (0.7, "modified", "a")],
        ["created a"],
    ),
    "edited then deleted": (
        [(0.0, "modified", "a"), (0.3, "modified", "a"), (0.6, "deleted", "a")],
        ["deleted a"],
    ),
    "created, deleted and created again: nothing that existed is hidden": (
        [(0.0, "created", "a"), (0.2, "deleted", "a"), (0.4, "created", "a")],
        ["created a", "modified a"],
    ),
    "paths coalesce apart, rows come out as windows close": (
        [(0.0, "created", "a"), (0.5, "created", "b"), (0.6, "modified", "a")],
        ["created a", "created b"],
    ),
    "a directory's own modification is noise": (
        [(0.0, "modified/", "d"), (0.1, "modified/", "d")],
        [],
    ),
    "a created directory stays created": (
        [(0.0, "created/", "d"), (0.1, "modified/", "d")],
        ["created d/"],
    ),
    "a file replacing a directory is two rows": (
        [(0.0, "deleted/", "d"), (0.2, "created", "d")],
        ["deleted d/", "created d"],
    ),
    "a directory replacing a file is two rows": (
        [(0.0, "deleted", "d"), (0.2, "created/", "d")],
        ["deleted d", "created d/"],
    ),
    "a directory deleted and made again is modified": (
        [(0.0, "deleted/", "d"), (0.2, "created/", "d")],
        ["modified d/"],
    ),
    # Renames and editors' saves.
    "a rename is one moved row at the destination": (
        [(0.0, "renamed", "a", "b")],
        ["moved b<-a"],
    ),
    "a rename writes the source's pending row first": (
        [(0.0, "modified", "a"), (0.2, "renamed", "a", "b")],
        ["modified a", "moved b<-a"],
    ),
    "a rename onto a file with a pending change replaces it": (
        [(0.0, "modified", "b"), (0.2, "renamed!", "a", "b")],
        ["moved b<-a"],
    ),
    "a rename onto a file created in the window is two rows": (
        [(0.0, "created", "b"), (0.2, "renamed!", "a", "b")],
        ["created b", "moved b<-a"],
    ),
    "a moved file written to is still moved": (
        [(0.0, "renamed", "a", "b"), (0.3, "modified", "b")],
        ["moved b<-a"],
    ),
    "a path deleted then renamed onto: moved, from the new source": (
        [(0.0, "deleted", "b"), (0.2, "renamed", "a", "b")],
        ["moved b<-a"],
    ),
    "moved twice within the window: two rows, each from where it was": (
        [(0.0, "renamed", "a", "b"), (0.2, "renamed", "b", "c")],
        ["moved b<-a", "moved c<-b"],
    ),
    "atomic save through a temporary name: modified, the temporary name never shows": (
        [(0.0, "created", "main.py.x7Gq2a"), (0.1, "renamed!", "main.py.x7Gq2a", "main.py")],
        ["modified main.py"],
    ),
    "a new file saved through a temporary name: created": (
        [(0.0, "created", "new.txt.x7Gq2a"), (0.1, "renamed", "new.txt.x7Gq2a", "new.txt")],
        ["created new.txt"],
    ),
    "a temporary name only counts within its window": (
        [(0.0, "created", "a.part"), (1.5, "renamed!", "a.part", "a")],
        ["created a.part", "moved a<-a.part"],  # a slow atomic save: replays right
    ),
    "atomic save from an ignored name (foo.tmp, .foo.swp): modified": (
        [(0.0, "arrived!", "notes.txt")],
        ["modified notes.txt"],
    ),
    "a file saved for the first time from an ignored name: created": (
        [(0.0, "arrived", "fresh.txt")],
        ["created fresh.txt"],
    ),
    "vim, backupcopy=no: the original renamed to foo~ (ignored), a new foo written": (
        # foo -> foo~ is a rename to an ignored name: the source is deleted.
        [(0.0, "deleted", "foo"), (0.1, "created", "foo"), (0.2, "modified", "foo")],
        ["modified foo"],
    ),
    "JetBrains safe write: foo moved to an ignored name, the ignored temporary onto foo": (
        [(0.0, "deleted", "Main.kt"), (0.0, "arrived", "Main.kt")],
        ["modified Main.kt"],
    ),
}


@pytest.mark.parametrize(("steps", "rows"), CASES.values(), ids=CASES.keys())
def test_cases(steps: list[Step], rows: list[str]) -> None:
    assert run(steps) == rows


def test_with_no_window_a_safe_write_can_stay_two_rows() -> None:
    steps: list[Step] = [(0.0, "deleted", "Main.kt"), (0.0, "arrived", "Main.kt")]
    assert run(steps, window=0.0) == ["deleted Main.kt", "created Main.kt"]


def test_a_renamed_directory_takes_its_pending_rows_along_after_its_own_row() -> None:
    rows: list[str] = []

    def emit(path: bytes, p: Pending) -> None:
        source = f"<-{p.source.decode()}" if p.source is not None else ""
        rows.append(f"{p.kind} {path.decode()}{source}")

    coalescer = Coalescer(WINDOW, emit)
    other = Root(b"/s", "/s", "s")
    for path in (b"/r/d/x", b"/r/d/sub/y", b"/r/dx", b"/r/e"):
        coalescer.change(path, CREATED, ROOT, is_dir=False, mono=0.0, wall=0.0)
    coalescer.change(b"/r/d/z", DELETED, ROOT, is_dir=False, mono=0.0, wall=0.0)
    coalescer.change(b"/r/d/b", MOVED, ROOT, is_dir=False, mono=0.0, wall=0.0, source=b"/r/d/a")
    coalescer.change(b"/r/w", MOVED, ROOT, is_dir=False, mono=0.0, wall=0.0, source=b"/r/d/v")
    # What the tree does: the directory's own row, then its pending rows move along.
    coalescer.change(b"/s/moved", MOVED, other, is_dir=True, mono=0.1, wall=0.1, source=b"/r/d")
    coalescer.rekey(b"/r/d", b"/s/moved", other)
    assert b"/r/d/x" not in coalescer and b"/s/moved/x" in coalescer
    coalescer.flush(math.inf)
    assert rows == [
        "created /r/dx",  # only shares a prefix: stays, in its place
        "created /r/e",
        "moved /r/w<-/r/d/v",  # moved out before the directory moved: its old source
        "moved /s/moved<-/r/d",
        # After the directory's move, which takes their old paths along; sources renamed.
        "created /s/moved/x",
        "created /s/moved/sub/y",
        "deleted /s/moved/z",
        "moved /s/moved/b<-/s/moved/a",
    ]
    # Replayed after what was there before, the rows give what is on disk.
    before = ["created /r/d", "created /r/d/a", "created /r/d/z", "created /r/d/v"]
    changes = []
    for row in before + rows:
        kind, _, rest = row.partition(" ")
        path, _, source = rest.partition("<-")
        changes.append(Change(kind, path.encode(), source.encode() or None))
    assert replay(changes) == {
        b"/r/dx", b"/r/e", b"/r/w", b"/s/moved", b"/s/moved/x", b"/s/moved/sub/y",
        b"/s/moved/b",
    }


def test_emit_below_writes_what_a_renamed_directory_replaces() -> None:
    rows: list[str] = []
    coalescer = Coalescer(WINDOW, lambda path, p: rows.append(f"{p.kind} {path.decode()}"))
    for path in (b"/r/out/x", b"/r/out", b"/r/outer", b"/r/other"):
        coalescer.change(path, DELETED, ROOT, is_dir=False, mono=0.0, wall=0.0)
    coalescer.emit_below(b"/r/out")
    assert rows == ["deleted /r/out/x", "deleted /r/out"]
    assert len(coalescer) == 2


def test_replay_rule() -> None:
    state = Replay()
    for change in (
        Change("created", b"/r/d"),
        Change("created", b"/r/d/f"),
        Change("created", b"/r/d/sub/g"),  # its directory has no row of its own
        Change("modified", b"/r/x"),
        Change("moved", b"/r/e", b"/r/d"),
        Change("moved", b"/r/y", b"/r/x"),
        Change("moved", b"/r/z", None),  # from before sources were kept
        Change("deleted", b"/r/e"),  # exactly that path
    ):
        state.apply(change)
    assert state.present == {b"/r/e/f", b"/r/e/sub/g", b"/r/y", b"/r/z"}


def test_deadlines_and_flush_by_watermark() -> None:
    rows: list[str] = []
    coalescer = Coalescer(WINDOW, lambda path, p: rows.append(path.decode()))
    assert coalescer.next_deadline() is None
    coalescer.change(b"a", MODIFIED, ROOT, is_dir=False, mono=10.0, wall=100.0)
    coalescer.change(b"b", MODIFIED, ROOT, is_dir=False, mono=10.5, wall=100.5)
    assert coalescer.next_deadline() == 11.0
    coalescer.flush(10.99)
    assert rows == []
    coalescer.flush(11.0)
    assert rows == ["a"] and coalescer.next_deadline() == 11.5 and len(coalescer) == 1


def test_event_time_is_when_the_recorded_kind_was_seen() -> None:
    seen: list[float] = []
    coalescer = Coalescer(WINDOW, lambda path, p: seen.append(p.at))
    coalescer.change(b"a", CREATED, ROOT, is_dir=False, mono=0.0, wall=100.0)
    coalescer.change(b"a", MODIFIED, ROOT, is_dir=False, mono=0.5, wall=100.5)  # still created
    coalescer.change(b"b", MODIFIED, ROOT, is_dir=False, mono=0.0, wall=200.0)
    coalescer.change(b"b", DELETED, ROOT, is_dir=False, mono=0.5, wall=200.5)  # now deleted
    coalescer.flush(math.inf)
    assert seen == [100.0, 200.5]
