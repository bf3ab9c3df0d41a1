"""Finished leases kept mapped for the next one of about the same size.

A fresh lease costs two round trips, an open and a map, and the kernel's
work on every page: it allocates and zeroes them when the lease is populated
and frees them when it is released. A consumer that pages out and in again
and again (offload + restore, an engine's per-request KV cache) pays that
each time; one kept lease pays it once, and every later page-out is a plain
copy. See bench/README.md ("End to end") for what it buys.

Only leases nothing in this process aliases any more are kept (no tensor or
buffer over the mapping), so no stale view can see the bytes of the lease's
next use. They stay this tenant's own leases at aquad (counted against its
quota, listed in `client.leases`): bounded by the client's `keep_bytes`,
handed back on a reclaim notice instead of moved, and released on close.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import Lease

MAX_KEPT = 8  # leases, whatever their sizes: a bound on descriptors and mappings too


class KeptLeases:
    """The client's kept leases, oldest first; thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # bytes; 0 keeps none
        self._kept: list[tuple[Lease, int | None]] = []  # (lease, near it was placed for)
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(lease.nbytes for lease, _ in self._kept)

    def put(self, lease: Lease, near: int | None) -> list[Lease]:
        """Keep `lease`; returns the leases the caller must release now:
        `lease` itself if it cannot be kept, else the oldest ones that no
        longer fit."""
        if lease.nbytes > self.limit:
            return [lease]
        with self._lock:
            self._kept.append((lease, near))
            out = []
            while len(self._kept) > MAX_KEPT or \
                    sum(kept.nbytes for kept, _ in self._kept) > self.limit:
                out.append(self._kept.pop(0)[0])
            return out

    def take(self, nbytes: int, near: int | None) -> Lease | None:
        """The smallest kept lease placed for `near` that holds `nbytes`
        without wasting more than as much again; None if there is none."""
        with self._lock:
            fits = [(lease.nbytes, i) for i, (lease, where) in enumerate(self._kept)
                    if where == near and nbytes <= lease.nbytes <= 2 * max(nbytes, 1)]
            if not fits:
                return None
            return self._kept.pop(min(fits)[1])[0]

    def remove(self, lease_id: str) -> Lease | None:
        with self._lock:
            for i, (lease, _) in enumerate(self._kept):
                if lease.id == lease_id:
                    return self._kept.pop(i)[0]
        return None

    def drain(self) -> list[Lease]:
        with self._lock:
            out, self._kept = [lease for lease, _ in self._kept], []
            return out
