"""Devices and the links between them, as plain data.

Backends discover this (the host backend makes it up, the cuda backend asks
NVML); the placer and the simulator only read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Tier(IntEnum):
    """Where lease memory sits relative to the tenant's device; lower is better."""

    NVLINK = 0  # peer GPU over NVLink
    PEER = 1  # peer GPU over PCIe peer-to-peer
    HOST = 2  # host DRAM (over PCIe for a GPU tenant)
    # The tenant's own GPU: the fastest memory, but the memory it is paging
    # out to make room in, so the last resort (it helps only when aquad holds
    # spare memory there that the tenant could not otherwise use).
    LOCAL = 3

    @property
    def label(self) -> str:
        return _TIER_LABELS[self]  # on every grant's reply: not name.lower()


_TIER_LABELS = {tier: tier.name.lower() for tier in Tier}


@dataclass(frozen=True)
class Device:
    id: int
    backend: str  # "host" or "cuda"
    capacity: int  # bytes aquad may lease out on this device
    name: str = ""


@dataclass(frozen=True)
class Link:
    tier: Tier
    bandwidth: float  # bytes/s, one direction; 0 when unknown
    nvlinks: int = 0  # NVLinks in the link (nvidia-smi's NV<n>); 0 if none or unknown


@dataclass
class Topology:
    devices: list[Device]
    # (consumer device, producer device) -> link; missing pairs are HOST tier.
    links: dict[tuple[int, int], Link] = field(default_factory=dict)

    def device(self, device_id: int) -> Device | None:
        for d in self.devices:
            if d.id == device_id:
                return d
        return None

    def link(self, consumer: int, producer: int) -> Link:
        link = self.links.get((consumer, producer))
        if link is not None:
            return link
        if consumer == producer:
            dev = self.device(consumer)
            if dev is not None and dev.backend == "cuda":
                return LOCAL_LINK
        return HOST_LINK


HOST_LINK = Link(Tier.HOST, 0.0)
LOCAL_LINK = Link(Tier.LOCAL, 0.0)
