"""The file change collector on real directories, real inotify and a real SQLite file."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import subprocess
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
import watchdog.observers.inotify_c as inotify_c
from structlog.testing import capture_logs

from host_agent.collectors.filesystem import FileChangeCollector
from host_agent.config import FilesystemCollectorConfig
from host_agent.store.queue import WriteQueue
from host_agent.store.tables import FILE_CHANGES

from .conftest import QueueLimit, Rows, StartCollector, StartLimited, inotify_fds, read_rows

COLUMNS = {
    "event_time", "event_time_iso", "event_type", "file_path", "file_path_relative",
    "file_name", "file_extension", "file_size", "is_symlink", "monitored_root", "project_name",
    "created_at", "file_path_raw",
}  # fmt: skip


def by_path(rows: Rows) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["file_path_relative"], []).append(row["event_type"])
    return found


def only(rows: Rows, relative: str) -> dict[str, Any]:
    matching = [r for r in rows if r["file_path_relative"] == relative]
    assert len(matching) == 1, matching
    return matching[0]


def has(relative: str, *event_types: str) -> Any:
    def check(rows: Rows) -> bool:
        return by_path(rows).get(relative) == list(event_types)

    return check


def touch(path: Path | bytes, data: bytes = b"") -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


async def test_each_event_type_fills_every_column(
    start_collector: StartCollector, root: Path
) -> None:
    (root / "proj" / ".git").mkdir(parents=True)
    (root / "proj" / "src").mkdir()
    (root / "notes").mkdir()
    before = int(time.time())
    run = await start_collector()

    (root / "proj" / "src" / "app.py").write_text("print('hi')\n")
    (root / "notes" / "README").write_text("x")
    os.symlink("app.py", root / "proj" / "src" / "link.py")
    (root / "newdir").mkdir()
    rows = await run.wait_rows(lambda rows: len(rows) >= 4)

    app = only(rows, "proj/src/app.py")
    assert set(app) >= COLUMNS
    assert app["event_type"] == "created"
    assert app["file_path"] == str(root / "proj" / "src" / "app.py")
    assert app["file_name"] == "app.py"
    assert app["file_extension"] == ".py"
    assert app["file_size"] == 12
    assert app["is_symlink"] == 0
    assert app["monitored_root"] == str(root)
    assert app["project_name"] == "proj"  # nearest directory holding .git
    assert app["file_path_raw"] is None
    assert before <= app["event_time"] <= app["created_at"] <= time.time() + 1
    parsed = datetime.fromisoformat(app["event_time_iso"])
    offset = parsed.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    assert int(parsed.timestamp()) == app["event_time"]

    readme = only(rows, "notes/README")
    assert readme["file_extension"] is None
    assert readme["project_name"] == "root"  # no .git above it: the root's name

    link = only(rows, "proj/src/link.py")
    assert (link["event_type"], link["is_symlink"], link["file_size"]) == ("created", 1, 6)

    newdir = only(rows, "newdir")
    assert (newdir["event_type"], newdir["file_size"], newdir["file_extension"]) == (
        "created",
        None,
        None,
    )

    (root / "proj" / "src" / "app.py").write_text("print('hello')\n")
    rows = await run.wait_rows(has("proj/src/app.py", "created", "modified"))
    assert rows[-1]["file_size"] == 15

    os.utime(root / "notes" / "README", (1, 1))  # metadata only: still a change
    await run.wait_rows(has("notes/README", "created", "modified"))
    os.chmod(root / "notes", 0o700)  # a directory's metadata: noise, no row
    os.utime(root / "proj" / "src", (1, 1))

    (root / "proj" / "src" / "app.py").unlink()
    (root / "proj" / "src" / "link.py").unlink()
    (root / "newdir").rmdir()
    rows = await run.wait_rows(has("newdir", "created", "deleted"))
    rows = await run.wait_rows(has("proj/src/link.py", "created", "deleted"))
    rows = await run.wait_rows(has("proj/src/app.py", "created", "modified", "deleted"))
    deleted = [r for r in rows if r["event_type"] == "deleted"]
    assert {r["file_path_relative"]: (r["file_size"], r["is_symlink"]) for r in deleted} == {
        "proj/src/app.py": (None, 0),
        "proj/src/link.py": (None, 1),
        "newdir": (None, 0),
    }
    # Creating and deleting entries changed directories' times: never a row.
    assert not [r for r in rows if r["file_path_relative"] in ("proj", "proj/src", "notes")]
    assert run.collector.errors == 0


async def test_moves(start_collector: StartCollector, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "incoming").mkdir(parents=True)
    (outside / "incoming" / "x.txt").write_text("x")
    (outside / "incoming" / "deep").mkdir()
    (outside / "incoming" / "deep" / "y.txt").write_text("y")
    (root / "a.txt").write_text("a")
    (root / "sub").mkdir()
    (root / "olddir" / "inner").mkdir(parents=True)
    (root / "olddir" / "inner" / "f.txt").write_text("f")
    (root / "leaving.txt").write_text("bye")
    run = await start_collector()

    os.rename(root / "a.txt", root / "sub" / "b.txt")
    os.rename(root / "olddir", root / "newdir")
    os.rename(root / "leaving.txt", outside / "leaving.txt")
    os.rename(outside / "incoming", root / "incoming")
    rows = await run.wait_rows(has("incoming/deep/y.txt", "created"))
    rows = await run.wait_rows(lambda rows: len(rows) >= 7)

    assert by_path(rows) == {
        "sub/b.txt": ["moved"],
        "newdir": ["moved"],  # one row for a moved directory, none for its content
        "leaving.txt": ["deleted"],  # moved out of the roots
        "incoming": ["created"],  # moved in: created, with everything inside
        "incoming/x.txt": ["created"],
        "incoming/deep": ["created"],
        "incoming/deep/y.txt": ["created"],
    }
    moved = only(rows, "sub/b.txt")
    assert moved["file_path"] == str(root / "sub" / "b.txt")
    assert moved["file_size"] == 1
    assert only(rows, "newdir")["file_size"] is None

    # Watches followed the moved directories: new files get their new paths.
    (root / "newdir" / "inner" / "g.txt").write_text("g")
    (root / "incoming" / "deep" / "z.txt").write_text("z")
    rows = await run.wait_rows(has("incoming/deep/z.txt", "created"))
    await run.wait_rows(has("newdir/inner/g.txt", "created"))

    # A directory moved out: everything known inside it is gone, as with rm -r.
    os.rename(root / "newdir", outside / "newdir")
    rows = await run.wait_rows(has("newdir/inner/g.txt", "created", "deleted"))
    paths = by_path(rows)
    assert paths["newdir"] == ["moved", "deleted"]
    assert paths["newdir/inner"] == ["deleted"]
    assert paths["newdir/inner/f.txt"] == ["deleted"]
    # ...and is no longer watched.
    (outside / "newdir" / "after.txt").write_text("a")
    (root / "sentinel").write_text("s")
    rows = await run.wait_rows(has("sentinel", "created"))
    assert not [r for r in rows if "after.txt" in r["file_path"]]


async def test_a_directory_renamed_before_its_creation_is_processed_keeps_its_content(
    start_collector: StartCollector, root: Path, hold_reader: threading.Event
) -> None:
    run = await start_collector()
    (root / "tmpdir" / "sub").mkdir(parents=True)
    (root / "tmpdir" / "sub" / "inside.txt").write_text("i")
    os.rename(root / "tmpdir", root / "final")
    hold_reader.set()
    rows = await run.wait_rows(has("final/sub/inside.txt", "created"))
    touch(root / "final" / "sub" / "later.txt")  # and it is watched at its new place
    rows = await run.wait_rows(has("final/sub/later.txt", "created"))
    assert by_path(rows) == {
        "final": ["created"],  # born and renamed within the window: no row for "tmpdir"
        "final/sub": ["created"],
        "final/sub/inside.txt": ["created"],
        "final/sub/later.txt": ["created"],
    }


async def test_ignored_trees_cost_no_watch_and_give_no_rows(
    start_collector: StartCollector, root: Path
) -> None:
    for d in (
        "src/pkg",
        "docs",
        "node_modules/a/b/c",
        "node_modules/d",
        ".git/objects/00",
        ".git/refs/heads",
        ".venv/lib/python3.11",
        "src/__pycache__",
    ):
        (root / d).mkdir(parents=True)
    run = await start_collector()
    assert run.inotify_fd is not None

    def inode(relative: str) -> int:
        return (root / relative).stat().st_ino

    expected = {inode("."), inode("src"), inode("src/pkg"), inode("docs")}
    assert run.watched_inodes() == expected
    assert run.collector.watches == 4

    (root / "node_modules" / "a" / "b" / "c" / "index.js").write_text("x")
    (root / ".git" / "objects" / "00" / "abc").write_text("x")
    (root / ".git" / "index.lock").write_text("x")
    (root / "src" / "pkg" / "mod.py.swp").write_text("x")
    (root / "src" / "pkg" / ".mod.py.swo").write_text("x")
    (root / "src" / "pkg" / "mod.py___jb_tmp___").write_text("x")
    (root / "src" / "pkg" / "mod.py~").write_text("x")
    (root / "src" / "__pycache__" / "mod.pyc").write_text("x")
    (root / "build" / "node_modules" / "deep").mkdir(parents=True)
    (root / "build" / "node_modules" / "deep" / "x.js").write_text("x")
    (root / "build" / "out.o").write_text("x")
    (root / "src" / "sentinel.py").write_text("s")
    rows = await run.wait_rows(has("src/sentinel.py", "created"))
    rows = await run.wait_rows(has("build/out.o", "created"))

    assert by_path(rows) == {
        "build": ["created"],
        "build/out.o": ["created"],
        "src/sentinel.py": ["created"],
    }
    assert run.watched_inodes() == expected | {inode("build")}


async def test_a_burst_of_2000_files_loses_nothing(
    start_collector: StartCollector, root: Path
) -> None:
    (root / "burst").mkdir()
    run = await start_collector()
    names = [f"burst/file_{i:04d}.txt" for i in range(2000)]

    def create() -> None:
        for name in names:
            touch(root / name, b"data")

    await asyncio.to_thread(create)
    rows = await run.wait_rows(lambda rows: len(rows) >= 2000, within=20)
    counts = Counter((r["event_type"], r["file_path_relative"]) for r in rows)
    assert counts == Counter(("created", name) for name in names)
    assert all(r["file_size"] == 4 for r in rows)
    assert run.collector.found_at_start == 1  # "burst" itself, there at the first start
    assert run.collector.events_recorded == 2001


async def test_queue_overflow_is_recovered_by_a_rescan(
    start_collector: StartCollector,
    root: Path,
    inotify_queue_limit: QueueLimit,
    request: pytest.FixtureRequest,
) -> None:
    (root / "keep").mkdir()
    (root / "gone").mkdir()
    for i in range(20):
        (root / "keep" / f"k{i}").write_text("k")
        (root / "gone" / f"g{i}").write_text("g")
    inotify_queue_limit.set(32)
    try:
        run = await start_collector()
    finally:
        inotify_queue_limit.restore()  # our instance keeps its small queue

    # Hold watchdog's reader inside its first callback so the kernel queue (32 events) must
    # overflow; the kernel then drops events and queues IN_Q_OVERFLOW.
    gate: threading.Event = request.getfixturevalue("hold_reader")

    def storm() -> None:
        (root / "new").mkdir()
        for i in range(300):
            touch(root / "new" / f"n{i}")
        for i in range(20):
            with open(root / "keep" / f"k{i}", "a") as f:
                f.write("more")
            os.remove(root / "gone" / f"g{i}")

    with capture_logs() as logs:
        await asyncio.to_thread(storm)
        gate.set()
        expected = (
            {("created", "new")}
            | {("created", f"new/n{i}") for i in range(300)}
            | {("modified", f"keep/k{i}") for i in range(20)}
            | {("deleted", f"gone/g{i}") for i in range(20)}
        )
        rows = await run.wait_rows(
            lambda rows: {(r["event_type"], r["file_path_relative"]) for r in rows} >= expected,
            within=20,
        )
    assert run.collector.overflows >= 1
    assert any(log["event"] == "fs.events_lost" for log in logs)
    assert {(r["event_type"], r["file_path_relative"]) for r in rows} == expected
    # The rescan re-placed the watches: the tree is still watched afterwards.
    (root / "new" / "after").write_text("a")
    await run.wait_rows(has("new/after", "created"))


async def test_watch_limit_logs_one_clear_message_and_keeps_watching(
    start_collector: StartCollector, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b", "c", "d"):
        (root / name).mkdir()
    real_add_watch = inotify_c.inotify_add_watch
    placed = 0

    def limited(fd: int, path: bytes, mask: int) -> Any:
        # Behaves as the kernel does at fs.inotify.max_user_watches: new watches get ENOSPC.
        nonlocal placed
        if placed >= 2 and b"host-agent-fence" not in path:
            ctypes.set_errno(errno.ENOSPC)
            return -1
        placed += 1
        return real_add_watch(fd, path, mask)

    monkeypatch.setattr(inotify_c, "inotify_add_watch", limited)
    with capture_logs() as logs:
        run = await start_collector()
        (root / "e").mkdir()  # a new directory cannot be watched either: no second message
        inodes = run.watched_inodes()
        by_inode = {os.stat(root / n).st_ino: n for n in (".", "a", "b", "c", "d")}
        assert {by_inode.get(i) for i in inodes} - {"a", "b", "c", "d"} == {"."}
        assert len(inodes) == 2
        watched = next(by_inode[i] for i in inodes if by_inode[i] != ".")
        (root / watched / "file.txt").write_text("x")
        await run.wait_rows(has(f"{watched}/file.txt", "created"))
        await run.wait_rows(has("e", "created"))

    warnings = [log for log in logs if log["event"] == "fs.watch_limit_reached"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["sysctl"] == "fs.inotify.max_user_watches"
    assert "sudo sysctl fs.inotify.max_user_watches=" in warnings[0]["fix"]
    assert run.collector.watch_limit_hits == 4
    assert run.collector.errors == 0


async def test_directories_refused_at_the_watch_limit_are_watched_once_it_is_raised(
    limited_collector: StartLimited, root: Path
) -> None:
    """The kernel's own limit, lowered to one watch (the root's) in the collector's user
    namespace: raising it must be enough, with no overflow and no restart."""
    (root / "a").mkdir()
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a" / "old.txt").write_text("old")
    (root / "b" / "gone.txt").write_text("gone")
    child = await limited_collector(watches=1, retry_seconds=0.1)

    def inode(relative: str) -> int:
        return (root / relative).stat().st_ino

    started = child.events("fs.watching")[0]
    assert (started["watches"], started["unwatched"], started["watch_limit_hits"]) == (1, 3, 3)
    assert child.watched_inodes() == {inode(".")}
    [warning] = child.events("fs.watch_limit_reached")
    assert warning["level"] == "warning"
    assert warning["retry_seconds"] == 0.1
    assert "asked for again every 0.1 s" in warning["detail"]
    assert "next rescan" not in warning["detail"]

    # Changes in the unwatched directories, not seen as they happen.
    (root / "a" / "new.txt").write_text("new")
    (root / "a" / "old.txt").write_text("changed")
    (root / "b" / "gone.txt").unlink()
    (root / "b" / "deep" / "x.txt").write_text("x")
    (root / "b" / "deep" / "sub").mkdir()
    (root / "b" / "deep" / "sub" / "y.txt").write_text("y")
    (root / "top.txt").write_text("t")  # the root is watched
    await child.wait_rows(has("top.txt", "created"))
    # Retries go on while the limit holds, and are refused.
    status = await child.wait_status(lambda status: status["watch_limit_hits"] >= 6)
    assert (status["watches"], status["unwatched"]) == (1, 3)
    assert by_path(await child.rows()) == {"top.txt": ["created"]}

    await child.command("limit 100")  # as `sysctl fs.inotify.max_user_watches=...` would
    expected = {
        "top.txt": ["created"],
        "a/new.txt": ["created"],
        "a/old.txt": ["modified"],
        "b/gone.txt": ["deleted"],
        "b/deep/x.txt": ["created"],
        "b/deep/sub": ["created"],
        "b/deep/sub/y.txt": ["created"],
    }
    await child.wait_rows(lambda rows: by_path(rows).keys() >= expected.keys())
    status = await child.wait_status(lambda status: status["unwatched"] == 0)
    assert status["watches"] == 5
    assert child.watched_inodes() == {inode(d) for d in (".", "a", "b", "b/deep", "b/deep/sub")}
    assert len(child.events("fs.watch_limit_cleared")) == 1
    # Watched now: a change is an event, and nothing was recorded twice.
    (root / "b" / "deep" / "sub" / "z.txt").write_text("z")
    rows = await child.wait_rows(has("b/deep/sub/z.txt", "created"))
    assert by_path(rows) == expected | {"b/deep/sub/z.txt": ["created"]}
    assert (await child.command("status"))["errors"] == 0
    await child.stop()


async def test_names_that_are_not_utf8(start_collector: StartCollector, root: Path) -> None:
    run = await start_collector()
    base = os.fsencode(root)
    os.mkdir(base + b"/d\xff")
    touch(base + b"/d\xff/caf\xe9.txt", b"abc")
    touch(base + b"/na\xc3\xafve.txt")  # valid UTF-8 ("naïve.txt")
    rows = await run.wait_rows(lambda rows: len(rows) >= 3)

    directory = only(rows, "d\\xff")
    assert directory["file_path"] == str(root) + "/d\\xff"
    assert directory["file_path_raw"] == base + b"/d\xff"
    weird = only(rows, "d\\xff/caf\\xe9.txt")
    assert weird["file_name"] == "caf\\xe9.txt"
    assert weird["file_extension"] == ".txt"
    assert weird["file_size"] == 3
    assert weird["file_path_raw"] == base + b"/d\xff/caf\xe9.txt"
    fine = only(rows, "naïve.txt")
    assert fine["file_path_raw"] is None
    os.remove(base + b"/d\xff/caf\xe9.txt")
    rows = await run.wait_rows(has("d\\xff/caf\\xe9.txt", "created", "deleted"))
    assert rows[-1]["file_path_raw"] == base + b"/d\xff/caf\xe9.txt"
    assert run.collector.errors == 0


async def test_new_directories_are_scanned_so_the_mkdir_p_race_loses_nothing(
    start_collector: StartCollector, root: Path
) -> None:
    # No coalescing window: a change seen both by a new directory's scan and by an event
    # that raced with it must still be one row.
    run = await start_collector(coalesce_ms=0)
    script = (
        'for i in $(seq 1 25); do mkdir -p "a$i/b/c/d" && : > "a$i/b/c/d/f" && : > "a$i/b/g"; done'
    )
    await asyncio.to_thread(subprocess.run, ["sh", "-c", script], cwd=root, check=True)
    expected = Counter(
        ("created", f"a{i}{suffix}")
        for i in range(1, 26)
        for suffix in ("", "/b", "/b/c", "/b/c/d", "/b/c/d/f", "/b/g")
    )
    rows = await run.wait_rows(lambda rows: len(rows) >= len(expected), within=20)
    touch(root / "sentinel")  # empty: one event, so one row even without coalescing
    rows = await run.wait_rows(has("sentinel", "created"))
    # Each exactly once: the scan and the events that raced with it are the same change.
    rows = [r for r in rows if r["file_path_relative"] != "sentinel"]
    assert Counter((r["event_type"], r["file_path_relative"]) for r in rows) == expected


async def test_editor_saves_are_one_modified_row(
    start_collector: StartCollector, root: Path
) -> None:
    for name in ("notes.txt", "main.py", "vimfile.txt", "Main.kt"):
        (root / name).write_text("original")
    run = await start_collector(coalesce_ms=500)

    # Write a temporary file with an ignored name, rename it over the original.
    (root / "notes.txt.tmp").write_text("new notes")
    os.replace(root / "notes.txt.tmp", root / "notes.txt")
    # The same with a temporary name nobody ignores (mkstemp-style).
    (root / "main.py.x7Gq2a").write_text("new code")
    os.replace(root / "main.py.x7Gq2a", root / "main.py")
    # vim with backupcopy=no: rename the original away, write a new one, drop the backup.
    os.rename(root / "vimfile.txt", root / "vimfile.txt~")
    (root / "vimfile.txt").write_text("new vim")
    os.remove(root / "vimfile.txt~")
    # JetBrains "safe write": write a temporary file, rename the original away, rename the
    # temporary file onto the original's name, drop the renamed original.
    (root / "Main.kt___jb_tmp___").write_text("new kotlin")
    os.rename(root / "Main.kt", root / "Main.kt___jb_old___")
    os.rename(root / "Main.kt___jb_tmp___", root / "Main.kt")
    os.remove(root / "Main.kt___jb_old___")
    # Saving a new file through a temporary one creates it.
    (root / ".fresh.txt.swp").write_text("fresh")
    os.replace(root / ".fresh.txt.swp", root / "fresh.txt")

    await run.wait_rows(lambda rows: len(rows) >= 5)
    (root / "sentinel").write_text("s")
    rows = await run.wait_rows(has("sentinel", "created"))
    assert by_path(rows) == {
        "notes.txt": ["modified"],
        "main.py": ["modified"],
        "vimfile.txt": ["modified"],
        "Main.kt": ["modified"],
        "fresh.txt": ["created"],
        "sentinel": ["created"],
    }
    assert only(rows, "notes.txt")["file_size"] == len("new notes")
    assert only(rows, "Main.kt")["file_size"] == len("new kotlin")


async def test_bursts_on_one_path_are_coalesced(
    start_collector: StartCollector, root: Path
) -> None:
    (root / "edited_then_deleted.txt").write_text("x")
    (root / "replaced.txt").write_text("x")
    run = await start_collector(coalesce_ms=500)

    def write_lines(name: str, mode: str, word: str) -> None:
        with open(root / name, mode) as f:
            for i in range(20):
                f.write(f"{word} {i}\n")
                f.flush()

    write_lines("log.txt", "w", "line")  # created + many writes
    await run.wait_rows(has("log.txt", "created"))
    write_lines("log.txt", "a", "more")  # many writes
    write_lines("edited_then_deleted.txt", "a", "edit")
    os.remove(root / "edited_then_deleted.txt")
    os.remove(root / "replaced.txt")
    (root / "replaced.txt").write_text("new")
    (root / "short_lived.txt").write_text("x")
    os.remove(root / "short_lived.txt")
    await run.wait_rows(has("log.txt", "created", "modified"))
    (root / "sentinel").write_text("s")
    rows = await run.wait_rows(has("sentinel", "created"))

    assert by_path(rows) == {
        "log.txt": ["created", "modified"],
        "edited_then_deleted.txt": ["deleted"],
        "replaced.txt": ["modified"],
        "short_lived.txt": ["created", "deleted"],  # recorded, not dropped
        "sentinel": ["created"],
    }
    log_rows = [r for r in rows if r["file_path_relative"] == "log.txt"]
    assert [r["file_size"] for r in log_rows] == [150, 300]  # sizes once each burst settled
    short_lived = [r for r in rows if r["file_path_relative"] == "short_lived.txt"]
    assert [r["file_size"] for r in short_lived] == [None, None]  # gone when written


async def test_stop_reads_what_the_kernel_still_holds_and_flushes_pending_rows(
    root: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db = tmp_path / "file_changes.db"
    writer = WriteQueue.start_for(db, FILE_CHANGES)
    settings = FilesystemCollectorConfig(enabled=True, roots=[root], coalesce_ms=60_000)
    collector = FileChangeCollector(settings, writer)
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await asyncio.wait_for(collector.ready.wait(), 10)

    # Keep watchdog's reader busy with the first event, so the others are still in the
    # kernel's queue when the stop begins; closing inotify then would discard them.
    gate: threading.Event = request.getfixturevalue("hold_reader")
    names = [f"late{i}.txt" for i in range(5)]
    for name in names:  # a one-minute window: only the stop writes these rows
        (root / name).write_text("x")
    stop.set()
    deadline = time.monotonic() + 5
    while not collector._stopping.is_set():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    gate.set()
    await asyncio.wait_for(task, 10)
    await asyncio.to_thread(writer.close)  # as the agent does once the collectors are done

    rows = await asyncio.to_thread(read_rows, db)
    assert [(r["event_type"], r["file_path_relative"]) for r in rows] == [
        ("created", name) for name in names
    ]
    assert collector.events_recorded == 5


async def test_missing_roots_are_skipped_and_picked_up_when_they_appear(
    start_collector: StartCollector,
    root: Path,
    tmp_path: Path,
) -> None:
    later = tmp_path / "later"
    with capture_logs() as logs:
        run = await start_collector(roots=[later, root], retry_seconds=0.1)
    missing = [log for log in logs if log["event"] == "fs.root_missing"]
    assert [log["root"] for log in missing] == [str(later)]
    (root / "a.txt").write_text("a")
    await run.wait_rows(has("a.txt", "created"))

    later.mkdir()
    deadline = time.monotonic() + 5
    while run.collector.watches < 2:
        assert time.monotonic() < deadline, "the new root was not picked up"
        await asyncio.sleep(0.02)
    (later / "b.txt").write_text("b")
    rows = await run.wait_rows(has("b.txt", "created"))
    assert only(rows, "b.txt")["monitored_root"] == str(later)
    assert only(rows, "b.txt")["project_name"] == "later"


async def test_disabled_or_rootless_collector_just_waits(tmp_path: Path) -> None:
    for settings in (
        FilesystemCollectorConfig(enabled=False, roots=[tmp_path]),
        FilesystemCollectorConfig(enabled=True, roots=[]),
    ):
        before = inotify_fds()
        writer = WriteQueue.start_for(tmp_path / "unused.db", FILE_CHANGES)
        collector = FileChangeCollector(settings, writer, structlog.get_logger())
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))
        await asyncio.wait_for(collector.ready.wait(), 5)
        assert inotify_fds() == before
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 5)
        writer.close()
    assert not (tmp_path / "unused.db").exists()
