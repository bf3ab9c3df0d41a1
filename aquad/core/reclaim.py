"""Elastic memory: devices lend, take back, drain; leases move away in time.

A device's leasable capacity is no longer fixed at startup. A tenant lends
spare memory of its own GPU (`lend`) and takes it back (`unlend`); the
operator, or the tenant whose home device it is, takes capacity back
(`reclaim`); the operator empties a device (`drain`) and opens it again
(`undrain`); on the cuda backend a watcher reclaims by itself when a GPU's
own processes grow into aquad's share.

Taking capacity back lowers it at once and closes the device to new leases.
If leases then exceed it, the cheapest to move are chosen (least recently
granted or moved first, then the smallest) until they cover the excess, and
each holder is told (`reclaim` event) with a deadline. A holder moves a lease
by asking for a replacement (`move`: the placer's next-best device, the
closed one excluded), copying, and releasing the old one. Whatever frees
memory on the device counts: a move, a plain release, a tenant that dies.
At the deadline, chosen leases still there are fenced: on the host backend
the segment is truncated and unlinked (a late writer faults, nobody's bytes
are corrupted) and its charge returns; on the cuda backend the memory cannot
be revoked, so it stays allocated, charged and unusable by anyone until its
holder releases it or exits. No dead or deaf borrower holds a reclaim up.

This module decides and accounts; the arbiter calls it and owns the state it
touches (pools, lease table, tenants, backend, events).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aqua_protocol import ErrorCode, ProtocolError

from .leases import LeaseRecord

if TYPE_CHECKING:
    from .arbiter import Arbiter
    from .tenants import Tenant

# Entries each list of a report carries at most (the counts are exact): a
# reclaim of thousands of leases must not make a multi-megabyte event.
MAX_REPORT_ENTRIES = 1000


@dataclass
class Reclaim:
    id: int
    device: int
    requested: int  # bytes of capacity asked back
    taken: int  # bytes of capacity actually taken (never below zero)
    requester: bytes | None  # connection told when it ends; None: the daemon itself
    started: float
    deadline: float
    drain: bool = False
    pending: dict[str, str] = field(default_factory=dict)  # lease id -> tenant id
    replacements: dict[str, dict[str, Any]] = field(default_factory=dict)  # old id -> where to
    moved: list[dict[str, Any]] = field(default_factory=list)
    released: list[dict[str, Any]] = field(default_factory=list)
    fenced: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"moved": 0, "released": 0,
                                                            "fenced": 0})
    moved_bytes: int = 0

    def record(self, kind: str, entry: dict[str, Any]) -> None:
        self.counts[kind] += 1
        items = getattr(self, kind)
        if len(items) < MAX_REPORT_ENTRIES:
            items.append(entry)


def choose(leases: list[LeaseRecord], over: int) -> list[LeaseRecord]:
    """The leases to move so that at least `over` bytes leave: cheapest
    first, the least recently granted or moved (the coldest context), then
    the smallest (least to copy). Fenced ones are already out of reach."""
    picked, total = [], 0
    for lease in sorted((l for l in leases if not l.fenced),
                        key=lambda l: (l.created_at, l.charged)):
        if total >= over:
            break
        picked.append(lease)
        total += lease.charged
    return picked


def shortfall(free: int, capacity: int, used: int, headroom: int) -> int:
    """Bytes of a GPU's capacity aquad must give back when the GPU has only
    `free` bytes left (NVML) while aquad may still allocate `capacity -
    used` more of its share and keeps `headroom` below free: what the GPU's
    own processes took into aquad's share. 0 when nothing was taken."""
    unallocated = max(0, capacity - used)
    return max(0, unallocated + headroom - free)


class Elastic:
    def __init__(self, arbiter: Arbiter) -> None:
        self._arb = arbiter
        self.base = {dev: pool.capacity for dev, pool in arbiter.pools.items()}
        self.lent: dict[int, dict[str, int]] = {}  # device -> tenant id -> bytes
        self.drained: set[int] = set()
        self.active: dict[int, Reclaim] = {}  # by device
        self.by_lease: dict[str, Reclaim] = {}  # leases under notice
        self._ids = itertools.count(1)

    # --- requests -----------------------------------------------------------

    def reclaim(self, device: int, nbytes: int, deadline_s: float,
                requester: bytes | None, *, drain: bool = False) -> dict[str, Any]:
        arb = self._arb
        self.check_idle(device)
        pool = arb.pools[device]
        now = arb.clock()
        before = pool.capacity
        pool.set_capacity(before - pool.round_up(nbytes) if nbytes < before else 0)
        pool.closed = True  # also while it is done at once: set before choosing
        r = Reclaim(next(self._ids), device, nbytes, before - pool.capacity, requester, now,
                    now + deadline_s, drain)
        chosen = choose(arb.leases.on_device(device), pool.over)
        by_tenant: dict[str, list[str]] = {}
        for lease in chosen:
            r.pending[lease.id] = lease.tenant
            self.by_lease[lease.id] = r
            by_tenant.setdefault(lease.tenant, []).append(lease.id)
        self.active[device] = r
        arb.stats.reclaims += 1
        arb.stats.reclaimed_bytes += r.taken
        self._tell(by_tenant, "reclaim", lambda ids: {
            "reclaim": r.id, "device": device, "deadline_s": deadline_s, "leases": ids})
        reply = {"reclaim": r.id, "device": device, "requested_bytes": nbytes,
                 "taken_bytes": r.taken, "capacity_bytes": pool.capacity,
                 "over_bytes": pool.over, "deadline_s": deadline_s,
                 "leases": [{"lease": l.id, "tenant": l.tenant, "nbytes": l.nbytes}
                            for l in chosen[:MAX_REPORT_ENTRIES]]}
        if not pool.over:
            reply["state"] = "done"
            reply["report"] = self._finish(r, "done", tell=False)
        else:
            reply["state"] = "pending"
        return reply

    def check_idle(self, device: int) -> None:
        current = self.active.get(device)
        if current is not None:
            raise ProtocolError(ErrorCode.BUSY,
                                f"reclaim {current.id} of device {device} is in progress",
                                details={"reclaim": current.id})

    def undrain(self, device: int) -> dict[str, Any]:
        """Capacity back to what the device started with plus what is lent
        on it now; a reclaim in progress there ends as cancelled."""
        arb = self._arb
        current = self.active.get(device)
        if current is not None:
            self._finish(current, "cancelled")
        self.drained.discard(device)
        pool = arb.pools[device]
        pool.set_capacity(self.base[device] + sum(self.lent.get(device, {}).values()))
        pool.closed = False
        return {"device": device, "capacity_bytes": pool.capacity, "free_bytes": pool.free}

    def lend(self, tenant: Tenant, device: int, nbytes: int) -> dict[str, Any]:
        arb = self._arb
        pool = arb.pools[device]
        nbytes -= nbytes % pool.granule
        if nbytes <= 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"lend: less than one granule ({pool.granule} bytes)")
        can_lend = getattr(arb.backend, "can_lend", None)
        why = can_lend(device, nbytes, pool.free) if can_lend is not None else None
        if why:
            raise ProtocolError(ErrorCode.OUT_OF_MEMORY, f"cannot lend on device {device}: {why}")
        mine = self.lent.setdefault(device, {})
        mine[tenant.id] = mine.get(tenant.id, 0) + nbytes
        pool.set_capacity(pool.capacity + nbytes)
        self._progress(device)
        return {"device": device, "lent_bytes": mine[tenant.id],
                "capacity_bytes": pool.capacity, "free_bytes": pool.free}

    def unlend(self, tenant: Tenant, device: int, nbytes: int, deadline_s: float) -> dict[str, Any]:
        mine = self.lent.get(device, {})
        have = mine.get(tenant.id, 0)
        if not have:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"unlend: tenant {tenant.id} lends nothing on device {device}")
        self.check_idle(device)  # before the books change
        amount = min(have, nbytes)
        reply = self.reclaim(device, amount, deadline_s, tenant.conn)
        if have > amount:
            mine[tenant.id] = have - amount
        else:
            del mine[tenant.id]
        reply["lent_bytes"] = mine.get(tenant.id, 0)
        return reply

    def move(self, tenant: Tenant, lease: LeaseRecord) -> dict[str, Any]:
        """A replacement for a lease under notice, on the next-best device."""
        arb = self._arb
        r = self.by_lease.get(lease.id)
        if r is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"move: lease {lease.id} is not being reclaimed")
        done = r.replacements.get(lease.id)
        new = None if done is None else arb.leases.owned(done["lease"], tenant.id)
        if new is None:
            near = lease.near if lease.near >= 0 else tenant.devices[0]
            # Not checked against the tenant's quotas or lease limit: it holds
            # both for one copy, and the old one goes by the deadline either way.
            new = arb.grant(tenant, lease.nbytes, near)
            r.replacements[lease.id] = {"lease": new.id, "device": new.device,
                                        "tier": new.tier.label}
        return arb.lease_reply(new) | {"replaces": lease.id}

    # --- what the arbiter reports -----------------------------------------

    def freed(self, lease: LeaseRecord) -> None:
        """A lease is gone (released, moved, its tenant dropped, fenced)."""
        r = self.by_lease.pop(lease.id, None)
        if r is not None:
            r.pending.pop(lease.id, None)
            entry = {"lease": lease.id, "tenant": lease.tenant, "nbytes": lease.nbytes}
            to = r.replacements.get(lease.id)
            if to is not None:
                r.record("moved", entry | {"to": to})
                r.moved_bytes += lease.nbytes
                self._arb.stats.moved_bytes += lease.nbytes
            else:
                r.record("released", entry)
        self._progress(lease.device)

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self.active.values()), default=None)

    def tick(self) -> None:
        now = self._arb.clock()
        for r in [r for r in self.active.values() if r.deadline <= now]:
            self._fence(r)

    # --- internals ----------------------------------------------------------

    def _progress(self, device: int) -> None:
        r = self.active.get(device)
        if r is not None and not self._arb.pools[device].over:
            self._finish(r, "fenced" if r.counts["fenced"] else "done")

    def _fence(self, r: Reclaim) -> None:
        arb = self._arb
        by_tenant: dict[str, list[str]] = {}
        held: set[str] = set()
        for lease_id, tenant_id in list(r.pending.items()):
            lease = arb.leases.owned(lease_id, tenant_id)
            if lease is None or lease_id not in r.pending:
                continue  # gone meanwhile, or enough was freed: no need
            r.pending.pop(lease_id, None)
            self.by_lease.pop(lease_id, None)
            # Recorded first: freeing it may end the reclaim (_progress).
            entry = {"lease": lease_id, "tenant": tenant_id, "nbytes": lease.nbytes,
                     "quarantined": False}
            r.record("fenced", entry)
            revoked = arb.fence(lease)  # frees it (host) or holds it (cuda)
            entry["quarantined"] = not revoked
            by_tenant.setdefault(tenant_id, []).append(lease_id)
            if not revoked:
                held.add(lease_id)
        self._tell(by_tenant, "fenced", lambda ids: {
            "reclaim": r.id, "device": r.device, "leases": ids,
            "held": [i for i in ids if i in held]})
        if self.active.get(r.device) is r:
            self._finish(r, "fenced" if r.counts["fenced"] else "done")

    def _tell(self, by_tenant: dict[str, list[str]], event: str,
              data: Callable[[list[str]], dict[str, Any]]) -> None:
        """Each tenant (still here) the `event` about its leases `by_tenant`."""
        for tenant_id, ids in by_tenant.items():
            tenant = self._arb.tenants.get(tenant_id)
            if tenant is not None:
                self._arb.emit_event(tenant.conn, event, data(ids))

    def _finish(self, r: Reclaim, state: str, *, tell: bool = True) -> dict[str, Any]:
        arb = self._arb
        del self.active[r.device]
        for lease_id in r.pending:
            self.by_lease.pop(lease_id, None)
        r.pending.clear()
        pool = arb.pools[r.device]
        if r.drain and state != "cancelled":
            self.drained.add(r.device)
        pool.closed = r.device in self.drained
        report: dict[str, Any] = {
            "reclaim": r.id, "device": r.device, "state": state,
            "requested_bytes": r.requested, "taken_bytes": r.taken,
            "capacity_bytes": pool.capacity, "over_bytes": pool.over,
            "moved": r.moved, "released": r.released, "fenced": r.fenced,
            "moved_count": r.counts["moved"], "released_count": r.counts["released"],
            "fenced_count": r.counts["fenced"], "moved_bytes": r.moved_bytes,
            "elapsed_s": round(arb.clock() - r.started, 6)}
        if tell and r.requester is not None:
            arb.emit_event(r.requester, "reclaim_done", report)
        arb.reclaims_done.append(report)
        return report

    def view(self) -> list[dict[str, Any]]:
        """Per device: base, lent, drained, reclaim in progress (status)."""
        out = []
        for dev in sorted(self.base):
            r = self.active.get(dev)
            out.append({"device": dev, "base_bytes": self.base[dev],
                        "lent_bytes": sum(self.lent.get(dev, {}).values()),
                        "drained": dev in self.drained,
                        "reclaim": None if r is None else {
                            "reclaim": r.id, "pending": len(r.pending),
                            "deadline_in_s": round(max(0.0, r.deadline - self._arb.clock()),
                                                   3)}})
        return out
