"""Copies over the server's links, in virtual time.

Each GPU has an NVLink port and a PCIe x16 link, each with a separate copy
engine per direction. A copy occupies the sending side's outbound direction
and the receiving side's inbound one for latency + bytes / bandwidth. Copies
are booked into the earliest gap where all their directions are free, at or
after the time they may start: a page-in booked for later does not hold back
a page-out that can run now. A copy within one GPU (a lease on the tenant's
own GPU) runs at HBM speed, reading and writing the same memory. Every byte
is counted per (source, destination) pair, so conservation can be checked.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable

from aquad.core.topology import Tier

from .hardware import ServerSpec
from .workload import Costs

Port = tuple[str, int, str]  # (link kind, device, "in" | "out")


class Fabric:
    def __init__(self, server: ServerSpec, *, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.server = server
        self._clock = clock  # bookings that end before it can be forgotten
        self._hbm = server.gpu.hbm_bw * Costs.hbm_efficiency  # what the roofline assumes
        # Per port: sorted, disjoint busy intervals as parallel start/end lists.
        self._starts: dict[Port, list[float]] = defaultdict(list)
        self._ends: dict[Port, list[float]] = defaultdict(list)
        self.bytes: dict[tuple[int, int], int] = defaultdict(int)  # (src, dst) -> bytes
        self.busy_s: dict[str, float] = defaultdict(float)  # per tier: seconds copying

    def tier(self, src: int, dst: int) -> str:
        host = self.server.host_device
        if src == host or dst == host:
            return "host"
        if src == dst:
            return "local"
        link = self.server.link(src, dst)
        return "nvlink" if link is not None and link.tier == Tier.NVLINK else "peer"

    def copy(self, src: int, dst: int, nbytes: int, at: float) -> float:
        """Book a copy that may start at `at`; returns when it completes."""
        if nbytes < 0 or (src == dst == self.server.host_device):
            raise ValueError(f"bad copy {src}->{dst} of {nbytes} bytes")
        host = self.server.host_device
        tier = self.tier(src, dst)
        if tier == "local":
            # Read and write the same HBM: half its bandwidth each way.
            seconds = self.server.copy_latency_s + 2 * nbytes / self._hbm
            ports: list[Port] = [("hbm", src, "copy")]
        else:
            if tier == "nvlink":
                kind, bw = "nvlink", self.server.nvlink
            else:
                # Host copies and GPU pairs without NVLink cross PCIe (the
                # latter through the root complex or the host, at PCIe
                # speed at best).
                kind, bw = "pcie", self.server.pcie
            seconds = self.server.copy_latency_s + nbytes / bw
            ports = [(kind, src, "out")] if src != host else []
            if dst != host:
                ports.append((kind, dst, "in"))
        start = self._earliest(ports, at, seconds)
        for port in ports:
            self._book(port, start, start + seconds)
        self.bytes[src, dst] += nbytes
        self.busy_s[tier] += seconds
        return start + seconds

    def _earliest(self, ports: list[Port], at: float, seconds: float) -> float:
        """The first t >= at with [t, t + seconds) free on every port."""
        t = at
        moved = True
        while moved:
            moved = False
            for port in ports:
                starts, ends = self._starts[port], self._ends[port]
                # The first booking that ends after t is the only one that
                # can overlap [t, t + seconds) first.
                i = bisect.bisect_right(ends, t)
                if i < len(starts) and starts[i] < t + seconds:
                    t = ends[i]
                    moved = True
        return t

    def _book(self, port: Port, start: float, end: float) -> None:
        starts, ends = self._starts[port], self._ends[port]
        # Forget bookings that ended before now: no copy can start earlier.
        old = bisect.bisect_right(ends, self._clock())
        if old:
            del starts[:old], ends[:old]
        i = bisect.bisect_left(starts, start)
        starts.insert(i, start)
        ends.insert(i, end)
