"""The simulator's memory backend: accounting only.

The arbiter asks a backend to make the memory behind a lease; in virtual time
there is no memory to make, so segments are bare records. Everything else a
lease goes through (validation, placement, allocator, lease table, owner
checks) is the daemon's own code.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from aquad.backends.cuda import GRANULE
from aquad.core.tenants import Peer
from aquad.core.topology import Topology


@dataclass
class SimSegment:
    id: int
    device: int
    nbytes: int

    @property
    def handle(self) -> dict[str, Any]:
        return {"kind": "sim", "segment": self.id, "nbytes": self.nbytes}


class SimBackend:
    name = "sim"
    granule = GRANULE

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._ids = itertools.count(1)
        self.live: dict[int, SimSegment] = {}

    def topology(self) -> Topology:
        return self._topology

    def check_owner(self, peer: Peer) -> str | None:
        return None

    def quarantine(self, owner: Peer) -> None:
        pass  # no memory behind the records

    def check_capacity(self) -> str | None:
        return None

    def remove_stale(self) -> int:
        return 0

    def create(self, device: int, nbytes: int, owner: Peer) -> SimSegment:
        seg = SimSegment(next(self._ids), device, nbytes)
        self.live[seg.id] = seg
        return seg

    def destroy(self, segment: SimSegment) -> None:
        del self.live[segment.id]

    def fence(self, segment: SimSegment) -> bool:
        return True  # records only: revoking is free (destroy() forgets it)

    def maintain(self) -> None:
        pass

    def close(self) -> None:
        self.live.clear()
