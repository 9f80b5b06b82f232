"""The cyclic garbage collector is paused while batches ship, resumed exactly once the last of
overlapping runs ends (tables may ship at once on one event loop), and never paused for long:
a run that lasts collects every `GC_BREATH_SECONDS`."""

from __future__ import annotations

import gc
import weakref

import pytest

from host_agent.sync import engine
from host_agent.sync.engine import cyclic_gc_paused, gc_breathe


def test_overlapping_pauses_resume_the_collector_only_when_the_last_ends() -> None:
    assert gc.isenabled()
    first, second = cyclic_gc_paused(), cyclic_gc_paused()
    first.__enter__()
    second.__enter__()
    try:
        assert not gc.isenabled()
        first.__exit__(None, None, None)  # the first run ends while the second still ships
        assert not gc.isenabled()
    finally:
        second.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_collector_paused_by_someone_else_stays_paused() -> None:
    gc.disable()
    try:
        with cyclic_gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_while_shipping_still_resumes_the_collector() -> None:
    with pytest.raises(RuntimeError), cyclic_gc_paused():
        raise RuntimeError("the connection failed")
    assert gc.isenabled()


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def garbage_cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_a_long_pause_still_collects_cycles_every_breath(monkeypatch: pytest.MonkeyPatch) -> None:
    with cyclic_gc_paused():
        cycle = garbage_cycle()
        gc_breathe()  # the breath is not due yet: the cycle waits
        assert cycle() is not None
        monkeypatch.setattr(engine, "GC_BREATH_SECONDS", 0.0)
        gc_breathe()
        assert cycle() is None
    assert gc.isenabled()
