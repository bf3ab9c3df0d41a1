"""Lease table: every lease, its owner, where it lives and what it costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .topology import Tier


@dataclass
class LeaseRecord:
    id: str
    tenant: str
    device: int
    nbytes: int  # what the tenant asked for (and may touch)
    charged: int  # what the device's pool was charged (granule multiple)
    tier: Tier
    segment: Any  # the backend's object for the backing memory
    created_at: float
    capability: str = ""  # the owner's proof for `adopt` after a restart ("": none)


class LeaseTable:
    def __init__(self) -> None:
        self._leases: dict[str, LeaseRecord] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self):
        return iter(list(self._leases.values()))

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._leases

    def add(self, lease: LeaseRecord) -> None:
        assert lease.id not in self._leases
        self._leases[lease.id] = lease

    def owned(self, lease_id: str, tenant_id: str) -> LeaseRecord | None:
        """The lease if `tenant_id` owns it. Someone else's lease and a lease
        that does not exist look the same, so ids cannot be probed."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.tenant != tenant_id:
            return None
        return lease

    def pop(self, lease_id: str) -> LeaseRecord:
        return self._leases.pop(lease_id)
