"""Copies over the server's links, in virtual time.

Each GPU has an NVLink port and a PCIe x16 link, each with a separate
engine per direction. A copy occupies the sending side's outbound direction
and the receiving side's inbound one for latency + bytes / bandwidth; copies
that share a direction queue behind each other (FIFO). Every byte is counted
per (source, destination) pair, so conservation can be checked.
"""

from __future__ import annotations

from collections import defaultdict

from ..core.topology import Tier
from .hardware import Server


class Fabric:
    def __init__(self, server: Server) -> None:
        self.server = server
        self._busy: dict[tuple[str, int, str], float] = defaultdict(float)
        self.bytes: dict[tuple[int, int], int] = defaultdict(int)  # (src, dst) -> bytes
        self.busy_s: dict[str, float] = defaultdict(float)  # per tier: seconds copying

    def tier(self, src: int, dst: int) -> str:
        host = self.server.host_device
        if src == host or dst == host:
            return "host"
        link = self.server.link(src, dst)
        return "nvlink" if link is not None and link.tier == Tier.NVLINK else "peer"

    def copy(self, src: int, dst: int, nbytes: int, at: float) -> float:
        """Start a copy no earlier than `at`; returns when it completes."""
        if src == dst or nbytes < 0:
            raise ValueError(f"bad copy {src}->{dst} of {nbytes} bytes")
        host = self.server.host_device
        tier = self.tier(src, dst)
        if tier == "nvlink":
            port, bw = "nvlink", self.server.nvlink
        else:
            # Host copies and GPU pairs without NVLink cross PCIe (the latter
            # through the root complex or the host, at PCIe speed at best).
            port, bw = "pcie", self.server.pcie
        ends = [(port, src, "out")] if src != host else []
        if dst != host:
            ends.append((port, dst, "in"))
        start = max([at, *(self._busy[e] for e in ends)])
        seconds = self.server.copy_latency_s + nbytes / bw
        done = start + seconds
        for e in ends:
            self._busy[e] = done
        self.bytes[src, dst] += nbytes
        self.busy_s[tier] += seconds
        return done
