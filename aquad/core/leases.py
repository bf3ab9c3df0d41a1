"""Lease table: every lease, its owner, where it lives and what it costs.

Besides the leases themselves it keeps what `status` reports, up to date on
every grant and free: bytes and counts per tenant and per device, and the
leases in grant order (all, per tenant, per device) for paging. A `status`
summary then costs nothing per lease, and a page of leases costs its own
length, whatever the table holds.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
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
    seq: int = 0  # grant order, set by LeaseTable.add; what paging cursors name
    capability: str = ""  # the owner's proof for `adopt` after a restart ("": none)
    near: int = -1  # the device it was placed for (a move places its replacement so)
    # Fenced by a reclaim but not revocable (cuda): held, unusable, until released.
    fenced: bool = False


class GrantOrder:
    """Lease ids in grant order, seekable by sequence number.

    Append-only lists (seqs only grow, so they stay sorted) with lazy
    deletion: a freed lease is skipped when a page is read and dropped at
    the next compaction. Frees therefore cost O(1) on the request path."""

    def __init__(self) -> None:
        self._seqs: list[int] = []
        self._ids: list[str] = []
        self.dead = 0

    def __len__(self) -> int:
        return len(self._ids) - self.dead

    def add(self, seq: int, lease_id: str) -> None:
        self._seqs.append(seq)
        self._ids.append(lease_id)

    def discard(self) -> None:
        self.dead += 1

    def scan(self, after: int) -> Iterator[tuple[int, str]]:
        """(seq, id) of every entry granted after `after`, dead ones included."""
        start = bisect_right(self._seqs, after)
        for i in range(start, len(self._ids)):
            yield self._seqs[i], self._ids[i]

    def compact(self, alive: Callable[[str], bool]) -> None:
        keep = [(s, i) for s, i in zip(self._seqs, self._ids) if alive(i)]
        self._seqs = [s for s, _ in keep]
        self._ids = [i for _, i in keep]
        self.dead = 0


@dataclass
class Page:
    leases: list[LeaseRecord]
    next: int | None  # seq to pass as `after` for the rest; None: nothing follows


class LeaseTable:
    def __init__(self) -> None:
        self._leases: dict[str, LeaseRecord] = {}
        self._seq = 0
        self._all = GrantOrder()
        self._by_tenant: dict[str, GrantOrder] = {}
        self._by_device: dict[int, GrantOrder] = {}
        self.tenant_bytes: Counter[str] = Counter()
        self.device_count: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[LeaseRecord]:
        return iter(list(self._leases.values()))

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._leases

    def add(self, lease: LeaseRecord) -> None:
        assert lease.id not in self._leases
        self._seq += 1
        lease.seq = self._seq
        self._leases[lease.id] = lease
        for order in (self._all, self._by_tenant.setdefault(lease.tenant, GrantOrder()),
                      self._by_device.setdefault(lease.device, GrantOrder())):
            order.add(lease.seq, lease.id)
        self.tenant_bytes[lease.tenant] += lease.charged
        self.device_count[lease.device] += 1

    def owned(self, lease_id: str, tenant_id: str) -> LeaseRecord | None:
        """The lease if `tenant_id` owns it. Someone else's lease and a lease
        that does not exist look the same, so ids cannot be probed."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.tenant != tenant_id:
            return None
        return lease

    def pop(self, lease_id: str) -> LeaseRecord:
        lease = self._leases.pop(lease_id)
        self._all.discard()
        tenant_order = self._by_tenant[lease.tenant]
        tenant_order.discard()
        if not tenant_order:  # a departed tenant leaves no index behind
            del self._by_tenant[lease.tenant]
        self._by_device[lease.device].discard()
        self.tenant_bytes[lease.tenant] -= lease.charged
        if not self.tenant_bytes[lease.tenant]:
            del self.tenant_bytes[lease.tenant]
        self.device_count[lease.device] -= 1
        return lease

    def page(self, after: int, limit: int, *, tenant: str | None = None,
             device: int | None = None) -> Page:
        """Up to `limit` live leases granted after seq `after`, oldest first,
        of `tenant` and on `device` where given. Reads at most 4 x `limit`
        entries, so a page's cost is bounded even when most entries it passes
        are freed or filtered out: a short page with a `next` is no end."""
        order = self._order(tenant, device)
        leases: list[LeaseRecord] = []
        budget = 4 * limit
        last = after
        for seq, lease_id in order.scan(after):
            if budget == 0 or len(leases) == limit:
                return Page(leases, last)
            budget -= 1
            last = seq
            lease = self._leases.get(lease_id)
            if lease is None or lease.seq != seq:
                continue
            if (tenant is None or lease.tenant == tenant) and \
                    (device is None or lease.device == device):
                leases.append(lease)
        return Page(leases, None)

    def _order(self, tenant: str | None, device: int | None) -> GrantOrder:
        """The smallest index that holds every lease the filters let through."""
        empty = GrantOrder()
        candidates = [self._all]
        if tenant is not None:
            candidates.append(self._by_tenant.get(tenant, empty))
        if device is not None:
            candidates.append(self._by_device.get(device, empty))
        return min(candidates, key=lambda o: len(o._ids))

    def on_device(self, device: int) -> list[LeaseRecord]:
        """Every live lease on `device`, oldest first (a reclaim's candidates)."""
        order = self._by_device.get(device, GrantOrder())
        return [lease for seq, lease_id in order.scan(0)
                if (lease := self._leases.get(lease_id)) is not None and lease.seq == seq]

    def compact(self) -> None:
        """Drop freed entries from the indexes once they are half dead: off
        the request path (Arbiter.maintain), amortised O(1) per free."""
        alive = self._leases.__contains__
        for order in (self._all, *self._by_tenant.values(), *self._by_device.values()):
            if order.dead > 64 and order.dead * 2 > len(order._ids):
                order.compact(alive)
