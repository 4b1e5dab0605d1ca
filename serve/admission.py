"""What the ingress lets in, and for how long: a bound on image requests in flight, per-key rate
limits, and each request's deadline.

- :class:`Admission`: at most ``limit`` image requests at the ingress at once (reading their body,
  waiting on the stages, encoding PNGs). One more is answered 503 + Retry-After at once, so the
  ingress replica never holds more than it can finish, and its own cheap routes (``/healthz``,
  ``/readyz``) never wait behind image requests: the replica's slots (``max_ongoing_requests``)
  are set well above this limit.
- :class:`RateLimiter`: a token bucket per API key (rate per minute, burst), 429 + Retry-After.
- :func:`deadline_s`: how long a request may take end to end, from the steps it asks for.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from serve.http_errors import ApiError, overloaded


class Admission:
    """A counter, not a queue: a request is admitted or refused at once (the queueing happens in
    front of each stage, bounded by its ``max_queued_requests``)."""

    def __init__(self, limit: int, retry_after_s: float = 1.0):
        if limit < 1:
            raise ValueError(f"the ingress must admit at least one image request, got {limit}")
        self.limit, self.retry_after_s = limit, retry_after_s
        self.in_flight = 0

    def enter(self) -> None:
        # The ingress's event loop is single-threaded: no lock needed between check and increment.
        if self.in_flight >= self.limit:
            raise overloaded(503, self.retry_after_s)
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by API key: ``per_minute`` requests a minute on average, ``burst`` at once."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0 or burst < 1:
            raise ValueError("a rate limit needs per_minute > 0 and burst >= 1")
        self.rate, self.burst, self.clock = per_minute / 60.0, burst, clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> None:
        """Spend one token of ``key``'s bucket, or raise 429 with the seconds until one is back."""
        with self._lock:
            now = self.clock()
            bucket = self._buckets.setdefault(key, _Bucket(float(self.burst), now))
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return
            wait = (1 - bucket.tokens) / self.rate
        raise ApiError(
            429,
            "Rate limit reached for requests with this API key; retry after the time in Retry-After.",
            None,
            "rate_limit_exceeded",
            "requests",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


@dataclass(frozen=True)
class DeadlinePolicy:
    """``fixed_s`` when set; else ``base_s + per_step_s * steps`` (the diffusion steps the request
    runs, across its stages), at most ``max_s``. The serve configs' ``request_timeout_s`` is set
    above ``max_s``, so the ingress answers in OpenAI's shape before the proxy cuts the line."""

    fixed_s: Optional[float] = None
    base_s: float = 30.0
    per_step_s: float = 0.5
    max_s: float = 300.0

    def deadline_s(self, steps: int) -> float:
        if self.fixed_s is not None:
            return self.fixed_s
        return min(self.max_s, self.base_s + self.per_step_s * steps)


def deadline_exceeded(seconds: float) -> ApiError:
    """504: the request ran past its deadline and its stage work was cancelled. 504 rather than
    503 because nothing was refused: the server took the request and could not finish it in time;
    OpenAI's clients retry both."""
    return ApiError(504, f"The request did not finish within its deadline of {seconds:.0f} s and was cancelled; retry, or ask for fewer steps or images.",
                    None, "timeout", "server_error")  # fmt: skip
