"""Choose the device a lease lives on.

A tenant computing on device `near` offloads to the producer with the best
link to it: NVLink peers first (widest link first), then PCIe peers, then the
host tier. Among equals, the one with the most free memory (spreading load),
then the lowest id so the choice is deterministic. The tenant's own home
devices come last within a tier: their memory is what it is trying to free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .allocator import GranuleAllocator
from .topology import Tier, Topology


def place(
    topology: Topology,
    pools: Mapping[int, GranuleAllocator],
    nbytes: int,
    near: int,
    home: Iterable[int] = (),
) -> int | None:
    """Device id for a lease of `nbytes` for a tenant on `near`, or None."""
    home = frozenset(home)
    best: tuple | None = None
    best_id: int | None = None
    for dev in topology.devices:
        pool = pools[dev.id]
        if not pool.fits(nbytes):
            continue
        link = topology.link(near, dev.id)
        key = (int(link.tier), dev.id in home, -link.bandwidth, -pool.free, dev.id)
        if best is None or key < best:
            best, best_id = key, dev.id
    return best_id


def tier_of(topology: Topology, near: int, device: int) -> Tier:
    return topology.link(near, device).tier
