"""The one retry policy (host_agent.retry): its waits, for the loop, connects and collectors."""

from __future__ import annotations

import asyncio
import time

import pytest

from host_agent.retry import Backoff, RetryPolicy


def test_backoff_grows_exponentially_to_its_cap_with_full_jitter() -> None:
    policy = RetryPolicy(base=30, cap=900)
    assert [policy.ceiling(n) for n in range(0, 8)] == [0, 30, 60, 120, 240, 480, 900, 900]
    assert policy.ceiling(10_000) == 900  # no overflow after a very long outage
    assert policy.delay(10_000) <= 900
    for failures in (1, 3, 6):
        delays = [policy.delay(failures) for _ in range(2000)]
        ceiling = policy.ceiling(failures)
        assert all(0 <= d <= ceiling for d in delays)
        # Full jitter: spread over the whole range, not bunched at the ceiling.
        assert min(delays) < 0.05 * ceiling and max(delays) > 0.95 * ceiling
        assert 0.4 * ceiling < sum(delays) / len(delays) < 0.6 * ceiling


def test_without_jitter_the_wait_is_the_ceiling() -> None:
    policy = RetryPolicy(base=1, cap=30, jitter=False)
    assert [policy.delay(n) for n in range(0, 8)] == [0, 1, 2, 4, 8, 16, 30, 30]


def test_a_thread_backoff_starts_over_after_a_success() -> None:
    backoff = Backoff(RetryPolicy(base=1, cap=8, jitter=False))
    assert [backoff.failed() for _ in range(5)] == [1, 2, 4, 8, 8]
    backoff.succeeded()
    assert backoff.failed() == 1


async def test_retrying_stops_after_the_attempts_or_before_the_deadline() -> None:
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    policy = RetryPolicy(base=0.01, cap=0.02)
    with pytest.raises(ConnectionError):
        async for attempt in policy.retrying(attempts=4, retry_if=lambda _e: True):
            with attempt:
                await failing()
    assert calls == 4

    calls = 0
    slow = RetryPolicy(base=0.5, cap=0.5, jitter=False)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        async for attempt in slow.retrying(
            attempts=100, retry_if=lambda _e: True, deadline=time.monotonic() + 1.2
        ):
            with attempt:
                await failing()
    # Waits of 0.5 s: the third would end past the deadline, so it is not started.
    assert calls == 3
    assert time.monotonic() - started < 1.2
    await asyncio.sleep(0)
