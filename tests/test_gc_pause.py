"""The cyclic garbage collector is paused while batches ship, and resumed exactly once the
last of overlapping runs ends (tables may ship at once on one event loop)."""

from __future__ import annotations

import gc

from host_agent.sync.engine import cyclic_gc_paused


def test_overlapping_pauses_resume_the_collector_only_when_the_last_ends() -> None:
    assert gc.isenabled()
    first = cyclic_gc_paused()
    second = cyclic_gc_paused()
    first.__enter__()
    assert not gc.isenabled()
    second.__enter__()
    first.__exit__(None, None, None)  # the first run ends while the second still ships
    assert not gc.isenabled()
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
    try:
        with cyclic_gc_paused():
            raise RuntimeError("the connection failed")
    except RuntimeError:
        pass
    assert gc.isenabled()
