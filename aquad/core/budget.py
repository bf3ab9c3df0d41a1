"""A budget of daemon time for requests anyone may send (status).

`status` needs no hello and its cost grows with what the daemon holds, so
without a budget one socket user could keep the daemon's only thread busy
answering it. Each uid has a bucket of seconds that refills at `rate`
seconds per second up to `burst`; a request runs only while the bucket is
not empty and is charged what it actually took. All uids together draw on
a shared bucket as well, so many users cannot add up to the whole core.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float


class TimeBudget:
    def __init__(self, *, clock: Callable[[], float], rate: float = 0.1, burst: float = 0.25,
                 total_rate: float = 0.25, max_keys: int = 4096) -> None:
        self._clock = clock
        self.rate, self.burst = rate, burst
        self.total_rate = total_rate
        self._max_keys = max_keys
        self._buckets: dict[int, _Bucket] = {}
        self._total = _Bucket(burst * 2, clock())

    def _refill(self, bucket: _Bucket, rate: float, cap: float, now: float) -> None:
        bucket.level = min(cap, bucket.level + (now - bucket.at) * rate)
        bucket.at = now

    def retry_after(self, key: int) -> float:
        """0 if a request of `key` may run now, else seconds until it may."""
        now = self._clock()
        self._refill(self._total, self.total_rate, self.burst * 2, now)
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._refill(bucket, self.rate, self.burst, now)
            if bucket.level >= self.burst:
                del self._buckets[key]  # full again: nothing to remember
                bucket = None
        wait = 0.0
        if bucket is not None and bucket.level <= 0:
            wait = -bucket.level / self.rate
        if self._total.level <= 0:
            wait = max(wait, -self._total.level / self.total_rate)
        return wait

    def charge(self, key: int, seconds: float) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                # Bounded memory: forget the fullest (they are nearly refilled).
                fullest = max(self._buckets, key=lambda k: self._buckets[k].level)
                del self._buckets[fullest]
            bucket = self._buckets[key] = _Bucket(self.burst, self._clock())
        bucket.level -= seconds
        self._total.level -= seconds
