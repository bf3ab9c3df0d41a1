"""Counters of what the arbiter did, for operators (metrics, `aquactl top`).

Plain integers and bucket counts bumped where things happen, so keeping
them costs a few attribute increments per request; nothing here formats,
locks or allocates per event. The shell copies them into a snapshot now and
then (aquad/metrics.py) and the exporter renders that off the daemon's
thread. Counters only grow: a tenant that leaves takes nothing with it.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Upper bounds in seconds, for control-path latencies (microseconds to a
# status of many leases) and for slice waits (a hand-over to many quanta).
REQUEST_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0)
WAIT_BUCKETS = (1e-4, 1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Buckets:
    """A histogram as cumulative-free bucket counts: observe() is one bisect
    and two additions. counts[i] holds observations <= bounds[i] and above
    the previous bound; the last slot is +Inf."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> Buckets:
        out = Buckets(self.bounds)
        out.counts = list(self.counts)
        out.sum = self.sum
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(slots=True)
class Stats:
    # leases
    lease_grants: Counter[str] = field(default_factory=Counter)  # by tier label
    granted_bytes: Counter[str] = field(default_factory=Counter)  # charged, by tier label
    lease_frees: int = 0
    freed_bytes: int = 0
    adoptions: int = 0
    # GPU time
    slice_grants: int = 0
    handovers: int = 0  # grants to a tenant that had to queue (sent as events)
    preemptions: int = 0
    revocations: int = 0
    slice_waits: Buckets = field(default_factory=lambda: Buckets(WAIT_BUCKETS))
    # tenants
    tenant_joins: int = 0
    tenant_drops: Counter[str] = field(default_factory=Counter)  # by reason
    # elastic memory (core/reclaim.py)
    reclaims: int = 0
    reclaimed_bytes: int = 0
    moved_bytes: int = 0

    def copy(self) -> Stats:
        """A copy that the loop can hand to another thread."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).copy() for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Counter | Buckets)})

    def view(self) -> dict[str, Any]:
        """The counters as plain JSON (status's `counters`): per-label
        counts summed, histograms left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, Buckets):
                out[f.name] = sum(value.values()) if isinstance(value, Counter) else value
        return out


class RequestStats:
    """Per op: latency buckets, and errors by code. Op names are the
    protocol's (validated) or "invalid" for a frame that named none, so the
    labels stay bounded whatever peers send."""

    __slots__ = ("latency", "errors")

    def __init__(self) -> None:
        self.latency: dict[str, Buckets] = {}
        self.errors: Counter[tuple[str, str]] = Counter()  # (op, code) -> count

    def observe(self, op: str, seconds: float) -> None:
        buckets = self.latency.get(op)
        if buckets is None:
            buckets = self.latency[op] = Buckets(REQUEST_BUCKETS)
        buckets.observe(seconds)

    def error(self, op: str, code: str) -> None:
        self.errors[op, code] += 1

    def copy(self) -> RequestStats:
        out = RequestStats()
        out.latency = {op: b.copy() for op, b in self.latency.items()}
        out.errors = Counter(self.errors)
        return out
