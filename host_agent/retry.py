"""The one retry policy: exponential backoff with full jitter, built on tenacity.

After the n-th consecutive failure the wait is a uniform draw from
`[0, min(cap, base * 2**(n-1))]` (full jitter: a fleet that failed together does not retry
together). `jitter=False` waits the ceiling itself, for loops where a steady rhythm matters
more than spreading (a collector's reconnects on one machine).

The same policy serves three kinds of caller:
- a coroutine retrying an operation a few times (`RetryPolicy.retrying`, tenacity's
  `AsyncRetrying`, with an optional deadline after which it stops waiting);
- a loop that counts its own failures between runs (`RetryPolicy.delay(failures)`);
- a worker thread reconnecting to something (`Backoff`: `failed()` returns how long to wait,
  `succeeded()` starts over).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
    wait_exponential,
    wait_random_exponential,
)


@dataclass(frozen=True)
class _Attempt:
    """The part of tenacity's RetryCallState its wait strategies read."""

    attempt_number: int


@dataclass(frozen=True)
class RetryPolicy:
    base: float
    cap: float
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap <= 0:
            raise ValueError("base and cap must be positive")

    @property
    def _wait(self) -> Any:
        kind = wait_random_exponential if self.jitter else wait_exponential
        return kind(multiplier=self.base, max=max(self.cap, self.base))

    def ceiling(self, failures: int) -> float:
        """The longest wait after `failures` consecutive failures (0 when healthy)."""
        if failures <= 0:
            return 0.0
        return float(min(max(self.cap, self.base), self.base * 2 ** min(failures - 1, 62)))

    def delay(self, failures: int) -> float:
        """How long to wait after `failures` consecutive failures (0 when healthy)."""
        if failures <= 0:
            return 0.0
        return float(self._wait(_Attempt(min(failures, 64))))

    def retrying(
        self,
        *,
        attempts: int,
        retry_if: Callable[[BaseException], bool],
        deadline: float | None = None,
        before_sleep: Callable[[RetryCallState], Any] | None = None,
    ) -> AsyncRetrying:
        """Up to `attempts` tries of an operation while `retry_if(error)` holds; with a
        `deadline` (time.monotonic()), no wait that would end past it is started."""
        stop: Any = stop_after_attempt(max(1, attempts))
        if deadline is not None:
            stop = stop_any(stop, stop_before_delay(max(0.0, deadline - time.monotonic())))
        return AsyncRetrying(
            stop=stop,
            wait=self._wait,
            retry=retry_if_exception(retry_if),
            reraise=True,
            before_sleep=before_sleep,
        )


class Backoff:
    """Consecutive-failure counter for a thread that retries something forever."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0

    def failed(self) -> float:
        """Count a failure; return how long to wait before the next try."""
        self.failures += 1
        return self.policy.delay(self.failures)

    def succeeded(self) -> None:
        self.failures = 0
