"""Token buckets: a rate per client with a burst allowance, as plain arithmetic on a clock.

A bucket holds up to `burst` tokens and gains `rate` tokens per second. Each request takes one;
when none is left the request is refused and told how long until the next token (the value of
the Retry-After header). The clock is passed in, so tests need no sleeping.

Buckets are keyed by a string the caller chooses (the HTTP API uses a digest of the bearer
token, never the token itself). They are used from the server's event loop only, hence no lock.
"""

from __future__ import annotations

import math
from typing import NamedTuple

MAX_KEYS = 1024  # a bound on memory if many distinct keys ever appear: the oldest are dropped


class Bucket(NamedTuple):
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, Bucket] = {}

    def take(self, key: str, *, now: float) -> float:
        """0.0 if the request may go ahead, else the seconds until it could."""
        bucket = self._buckets.pop(key, None) or Bucket(float(self.burst), now)
        # A clock that went backwards refills nothing rather than going negative.
        tokens = min(float(self.burst), bucket.tokens + max(0.0, now - bucket.stamp) * self.rate)
        if tokens >= 1.0:
            self._store(key, Bucket(tokens - 1.0, now))
            return 0.0
        self._store(key, Bucket(tokens, now))
        return (1.0 - tokens) / self.rate

    def _store(self, key: str, bucket: Bucket) -> None:
        # Re-inserting moves the key to the end, so the first key is the least recently used.
        if len(self._buckets) >= MAX_KEYS:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[key] = bucket


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds (RFC 9110 10.2.3); round up so a retry is not early."""
    return str(max(1, math.ceil(seconds)))
