"""Choose the device a lease lives on.

A tenant computing on device `near` offloads to the producer with the best
link to it: NVLink peers first (widest link first), then PCIe peers, then the
host tier. Among equals, the one with the most free memory (spreading load),
then the lowest id so the choice is deterministic. The tenant's own home
devices come last within a tier: their memory is what it is trying to free.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from .allocator import GranuleAllocator
from .topology import Tier, Topology

MAX_RANKINGS = 1024  # (consumer, home devices) pairs remembered


class Placer:
    """The placement rule for one topology. It runs on every grant, so each
    (consumer, home devices) pair's ranking of producers is worked out once:
    groups of equally good devices, best group first, ids ascending within
    a group. What is left per grant is the free-memory tie-break."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._ranks: dict[tuple[int, tuple[int, ...]], tuple[tuple[int, ...], ...]] = {}

    def __call__(self, pools: Mapping[int, GranuleAllocator], nbytes: int, near: int,
                 home: Collection[int] = ()) -> int | None:
        """Device id for a lease of `nbytes` for a tenant on `near`, or None."""
        key = (near, tuple(home))  # no copy when home is a tuple already
        groups = self._ranks.get(key)
        if groups is None:
            if len(self._ranks) >= MAX_RANKINGS:
                self._ranks.clear()  # tenants come and go: keep what is asked now
            groups = self._ranks[key] = self._rank(*key)
        for group in groups:
            best, most = None, -1
            for dev in group:
                pool = pools[dev]
                free = pool.capacity - pool.used
                if free > most and pool.fits(nbytes):
                    best, most = dev, free
            if best is not None:
                return best
        return None

    def _rank(self, near: int, home: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        by_key: dict[tuple[Any, ...], list[int]] = {}
        for dev in self.topology.devices:
            link = self.topology.link(near, dev.id)
            by_key.setdefault((link.tier, dev.id in home, -link.bandwidth), []).append(dev.id)
        return tuple(tuple(sorted(by_key[k])) for k in sorted(by_key))


def tier_of(topology: Topology, near: int, device: int) -> Tier:
    return topology.link(near, device).tier
