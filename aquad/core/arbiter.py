"""The arbiter: aquad's decisions as one deterministic object.

No sockets, no tasks, no wall clock. The server shell feeds it decoded
requests with the connection's kernel-reported credentials and sends back what
it returns; timers and process-death watchers call `expire` and
`drop_tenant`. Tests and the simulator drive the very same object with a fake
clock. Every handler either completes or raises ProtocolError before it
changes anything, so a refused request leaves no trace.
"""

from __future__ import annotations

import base64
import collections
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aqua_protocol import ErrorCode, ProtocolError
from aqua_protocol import messages as m

from ..backends.base import Backend, BackendError
from .adoption import JournaledLease, Orphan, RandomTokens
from .allocator import GranuleAllocator
from .leases import LeaseRecord, LeaseTable
from .limits import Limits
from .placer import Placer, tier_of
from .quotas import Quotas
from .reclaim import Elastic, shortfall
from .scheduler import Action, Grant, Preempt, Scheduler
from .stats import Stats
from .tenants import Peer, Tenant, TenantRegistry
from .topology import Device

# Ops that may change what the scheduler (or a reclaim) owes anyone: after
# their reply the shell sends events and re-arms its timer.
_RESCHEDULES = frozenset({m.Bye, m.Turn, m.TurnDone, m.TurnYield, m.Reclaim, m.Drain,
                          m.Undrain, m.Lend, m.Unlend})


class LeaseIds(RandomTokens):
    """Unguessable lease ids: 144 random bits each. Ids are not secret (status
    lists them to operators): what protects a lease is the ownership check on
    every request."""

    BYTES = 18  # a multiple of 3: each id is whole base64 characters

    def encode(self, raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode()

    def __call__(self) -> str:
        return "L" + super().__call__()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: the connection, its kernel credentials, and the
    tenant registered on it (looked up once, before the handler runs)."""

    conn: bytes
    peer: Peer
    tenant: Tenant | None

    @property
    def registered(self) -> Tenant:
        # Ops that need hello never reach their handler without a tenant.
        assert self.tenant is not None
        return self.tenant


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a request did: its result, and what the shell must act on."""

    result: dict[str, Any]
    registered: Tenant | None = None  # a tenant joined on this connection
    gone: Tenant | None = None  # the connection's tenant left (bye)
    reschedule: bool = False  # events to send, the timer to re-arm


class Arbiter:
    def __init__(
        self,
        backend: Backend,
        *,
        clock: Callable[[], float],
        limits: Limits = Limits(),
        journal: Any = None,
    ) -> None:
        self.backend = backend
        self.topology = backend.topology()
        self._place = Placer(self.topology)
        self.pools = {
            d.id: GranuleAllocator(d.capacity, backend.granule) for d in self.topology.devices
        }
        self.tenants = TenantRegistry()
        self.scheduler = Scheduler([d.id for d in self.topology.devices], clock=clock,
                                   quantum=limits.quantum_s, grace=limits.grace_s)
        self._events: list[tuple[bytes, str, dict[str, Any]]] = []
        self.leases = LeaseTable()
        self.quotas = Quotas(limits.quotas, max_tenants=limits.max_tenants,
                             capacity=sum(p.capacity for p in self.pools.values()))
        self.limits = limits
        self.clock = clock
        self._new_id = LeaseIds()
        self.started_at = clock()
        self.closing = False
        # Where grants and frees are recorded so that a restarted daemon can
        # give leases back to their owners (aquad/journal.py); None: nothing
        # outlives the daemon (the cuda backend, the simulator).
        self.journal = journal
        self._new_capability = RandomTokens()
        self.orphans: dict[str, Orphan] = {}  # a predecessor's leases, by id
        self.stats = Stats()
        # What happened to slices, for operators watching (`subscribe`): a
        # list the shell drains, or None when nobody drains it (simulator).
        self.notes: list[tuple[str, dict[str, Any]]] | None = None
        # Who may reclaim any device and drain it: root and the daemon's own uid.
        self.operators = frozenset({0, os.geteuid()})
        self.elastic = Elastic(self)
        self.reclaims_done: collections.deque[dict[str, Any]] = collections.deque(maxlen=64)
        # Per op, its handler (named after the op): the arbiter's every op
        # but the shell's own (`subscribe`).
        self._handlers: dict[type, Callable[[Caller, Any], dict[str, Any]]] = {
            cls: getattr(self, f"_{cls.op}") for cls in m.OPS.values() if not cls.shell}

    # --- entry points from the shell ---------------------------------------

    def handle(self, conn: bytes, peer: Peer, request: m.Request) -> Outcome:
        """Run one validated request; returns what it did (the result and its
        effects) or raises ProtocolError, having changed nothing."""
        try:
            if self.closing:
                raise ProtocolError(ErrorCode.SHUTTING_DOWN, "aquad is shutting down")
            tenant = self.tenants.by_conn(conn)
            if tenant is not None:
                if tenant.peer.pid != peer.pid:
                    # A routing id reused by another process: never serve it.
                    raise ProtocolError(ErrorCode.PERMISSION_DENIED,
                                        "connection does not belong to this tenant")
                tenant.last_seen = self.clock()
                if self.orphans and not tenant.adopted:
                    self._end_adoption(tenant, request.args)
            elif request.args.needs_tenant:
                raise ProtocolError(ErrorCode.NOT_REGISTERED,
                                    f"send hello before {request.op!r}")
            result = self._handlers[type(request.args)](Caller(conn, peer, tenant), request.args)
        except ProtocolError as exc:
            exc.request_id = request.id
            raise
        after = self.tenants.by_conn(conn)
        return Outcome(result,
                       registered=after if tenant is None and after is not None else None,
                       gone=tenant if tenant is not None and after is None else None,
                       reschedule=type(request.args) in _RESCHEDULES or bool(self._events))

    def drop_tenant(self, tenant_id: str, *, may_live: bool = False) -> Tenant | None:
        """Forget a tenant (it left, died or went silent) and free its leases.
        `may_live`: its process may still run and map them (it went silent,
        or only its connection closed), so the backend quarantines first
        (see Backend.quarantine)."""
        tenant = self.tenants.remove(tenant_id)
        if tenant is not None:
            if may_live:
                self.backend.quarantine(tenant.peer)
            for lease_id in list(tenant.leases):
                self._free(tenant, lease_id)
            self.quotas.charge(tenant.peer, tenants=-1)
            self._emit(self.scheduler.remove(tenant_id))
        return tenant

    def maintain(self) -> None:
        """Deferred work; call when no reply is waiting to go out."""
        if self.journal is not None:
            self.journal.flush()
        self.backend.maintain()
        self.leases.compact()

    def tick(self) -> None:
        """Act on the clock: quantum ends, overdue yields, reclaim deadlines."""
        self._emit(self.scheduler.tick())
        if self.elastic.active:
            self.elastic.tick()

    def next_deadline(self) -> float | None:
        """Clock time at which tick() has work, or None."""
        due = [self.scheduler.next_deadline()]
        if self.elastic.active:
            due.append(self.elastic.next_deadline())
        return min((t for t in due if t is not None), default=None)

    def emit_event(self, conn: bytes, name: str, data: dict[str, Any]) -> None:
        self._events.append((conn, name, data))

    def watch_memory(self, free: dict[int, int], headroom: int,
                     deadline_s: float = m.DEFAULT_DEADLINE_MS / 1000) -> list[dict[str, Any]]:
        """GPUs whose own processes took memory (NVML's `free` per device
        below what aquad may still allocate there plus `headroom`): reclaim
        the difference, unless a reclaim runs there already. Returns the
        replies of the reclaims started."""
        started = []
        for device, nbytes in sorted(free.items()):
            pool = self.pools.get(device)
            if pool is None or device in self.elastic.active:
                continue
            want = shortfall(nbytes, pool.capacity, pool.used, headroom)
            if want >= pool.granule and pool.capacity:
                started.append(self.elastic.reclaim(device, want, deadline_s, None))
        return started

    def take_events(self) -> list[tuple[bytes, str, dict[str, Any]]]:
        """Events for tenants produced since the last call: (conn, name, data)."""
        events, self._events = self._events, []
        return events

    def expire(self) -> list[Tenant]:
        """Drop tenants whose heartbeats stopped; returns who was dropped."""
        stale = self.tenants.stale(self.clock(), self.limits.heartbeat_timeout_s)
        for tenant in stale:
            self.drop_tenant(tenant.id, may_live=True)
        return stale

    def shutdown(self) -> list[bytes]:
        """Refuse further work, free everything; returns connections to tell."""
        self.closing = True
        conns = [t.conn for t in self.tenants]
        for tenant in self.tenants:
            self.drop_tenant(tenant.id)
        for orphan in list(self.orphans.values()):
            self._free_orphan(orphan)
        self._events.clear()  # everyone gets the farewell instead
        self.backend.close()
        if self.journal is not None:
            self.journal.close()  # nothing left to adopt
        return conns

    # --- leases of a predecessor (see core/adoption.py) --------------------

    def keep_orphan(self, grant: JournaledLease, segment: Any, grace_s: float) -> bool:
        """At startup: hold a crashed predecessor's lease for its owner for
        `grace_s`; False if this daemon's devices cannot hold it."""
        pool = self.pools.get(grant.device)
        if pool is None or not pool.fits(grant.nbytes):
            return False
        self.orphans[grant.lease] = Orphan(grant, segment, pool.allocate(grant.nbytes),
                                           self.clock() + grace_s)
        return True

    def expire_orphans(self) -> list[Orphan]:
        """Free the orphans whose grace period ended; returns them."""
        now = self.clock()
        expired = [o for o in self.orphans.values() if o.deadline <= now]
        for orphan in expired:
            self._free_orphan(orphan)
        return expired

    def _end_adoption(self, tenant: Tenant, args: m.Op) -> None:
        """A reconnected tenant adopts all it still holds right after hello;
        its first other request ends that, and the remaining orphans of the
        same process and tenant name (leases it released while no daemon
        answered, or whose free was not journaled yet) are freed then
        instead of at the grace's end."""
        if isinstance(args, m.Adopt):
            return
        tenant.adopted = True
        mine = (tenant.peer.pid, tenant.name)
        for orphan in [o for o in self.orphans.values()
                       if (o.grant.pid, o.grant.tenant) == mine]:
            self._free_orphan(orphan)

    def _free_orphan(self, orphan: Orphan) -> None:
        del self.orphans[orphan.grant.lease]
        self.backend.destroy(orphan.segment)
        self.pools[orphan.grant.device].free_bytes(orphan.charged)
        if self.journal is not None:
            self.journal.freed(orphan.grant.lease)

    # --- handlers -----------------------------------------------------------

    def _hello(self, caller: Caller, args: m.Hello) -> dict[str, Any]:
        peer = caller.peer
        if caller.tenant is not None:
            raise ProtocolError(ErrorCode.ALREADY_REGISTERED,
                                "this connection is already registered")
        self._check_devices("hello", args.devices)
        if len(self.tenants) >= self.limits.max_tenants:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                                f"aquad serves at most {self.limits.max_tenants} tenants")
        why = self.backend.check_owner(peer)
        if why:
            raise ProtocolError(ErrorCode.PERMISSION_DENIED, why)
        self._check_quota(peer, tenants=1)
        weight = self.limits.weights.grant(peer.uid, args.tenant, args.weight)
        tenant = self.tenants.add(args.tenant, caller.conn, peer, tuple(args.devices),
                                  weight, self.clock())
        self.quotas.charge(peer, tenants=1)
        self.scheduler.add(tenant.id, tenant.devices, tenant.weight)
        return {
            "tenant_id": tenant.id,
            "protocol": m.PROTOCOL_VERSION,
            "backend": self.backend.name,
            "weight": tenant.weight,
            "heartbeat_interval_s": self.limits.heartbeat_interval_s,
            "heartbeat_timeout_s": self.limits.heartbeat_timeout_s,
            "devices": [self._device_status(d) for d in self.topology.devices],
        }

    def _heartbeat(self, caller: Caller, args: m.Heartbeat) -> dict[str, Any]:
        return {}

    def _bye(self, caller: Caller, args: m.Bye) -> dict[str, Any]:
        tenant = caller.registered
        freed = sum(self._owned(l, tenant).nbytes for l in tenant.leases)
        self.drop_tenant(tenant.id)
        return {"released_bytes": freed}

    def _lease(self, caller: Caller, args: m.Lease) -> dict[str, Any]:
        tenant = caller.registered
        near = tenant.devices[0] if args.near is None else args.near
        self._device(near)
        self._check_lease_count(tenant)
        device = self._placed(tenant, args.nbytes, near)
        self._check_quota(tenant.peer, leases=1,
                          nbytes=self.pools[device].round_up(args.nbytes))
        return self.lease_reply(self._grant(tenant, device, args.nbytes, near))

    def grant(self, tenant: Tenant, nbytes: int, near: int) -> LeaseRecord:
        """A lease placed as `lease` places it, without its quota and count
        checks (a move's replacement): out_of_memory if nothing has room."""
        return self._grant(tenant, self._placed(tenant, nbytes, near), nbytes, near)

    def _placed(self, tenant: Tenant, nbytes: int, near: int) -> int:
        """The device a lease of `nbytes` near `near` goes on; out_of_memory if none."""
        device = self._place(self.pools, nbytes, near, tenant.devices)
        if device is None:
            raise self._out_of_memory(nbytes)
        return device

    def _check_lease_count(self, tenant: Tenant) -> None:
        if len(tenant.leases) >= self.limits.max_leases_per_tenant:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"tenant holds {len(tenant.leases)} leases; the limit is "
                f"{self.limits.max_leases_per_tenant}")

    def _grant(self, tenant: Tenant, device: int, nbytes: int, near: int) -> LeaseRecord:
        pool = self.pools[device]
        try:
            segment = self.backend.create(device, nbytes, tenant.peer)
        except BackendError as exc:
            raise ProtocolError(ErrorCode.OUT_OF_MEMORY, str(exc)) from None
        charged = pool.allocate(nbytes)
        self.quotas.charge(tenant.peer, leases=1, nbytes=charged)
        lease = LeaseRecord(self._new_id(), tenant.id, device, nbytes, charged,
                            tier_of(self.topology, near, device), segment, self.clock(),
                            near=near)
        if self.journal is not None:
            lease.capability = self._new_capability()
        self._add(lease, tenant)
        self.stats.lease_grants[lease.tier.label] += 1
        self.stats.granted_bytes[lease.tier.label] += charged
        return lease

    def _out_of_memory(self, nbytes: int) -> ProtocolError:
        largest = max((p.free for p in self.pools.values() if not p.closed), default=0)
        total = sum(p.free for p in self.pools.values() if not p.closed)
        return ProtocolError(
            ErrorCode.OUT_OF_MEMORY,
            f"no device can hold {nbytes} bytes: largest free is {largest} "
            f"bytes on one device, {total} bytes free in all",
            details={"requested_bytes": nbytes, "largest_free_bytes": largest,
                     "total_free_bytes": total})

    def _adopt(self, caller: Caller, args: m.Adopt) -> dict[str, Any]:
        tenant = caller.registered
        orphan = self.orphans.get(args.lease)
        # A wrong secret, another uid's lease, one freed or never granted:
        # one answer, so neither ids nor secrets can be probed.
        if (orphan is None or orphan.grant.uid != caller.peer.uid
                or not hmac.compare_digest(orphan.grant.capability, args.capability)):
            raise ProtocolError(ErrorCode.NO_SUCH_LEASE,
                                f"no lease {args.lease} awaits adoption by this tenant")
        self._check_lease_count(tenant)
        del self.orphans[args.lease]
        grant = orphan.grant
        # Not checked against the quota: it was within it when granted, and
        # refusing now would only free memory its owner is using.
        self.quotas.charge(tenant.peer, leases=1, nbytes=orphan.charged)
        lease = LeaseRecord(grant.lease, tenant.id, grant.device, grant.nbytes, orphan.charged,
                            tier_of(self.topology, tenant.devices[0], grant.device),
                            orphan.segment, self.clock(), capability=grant.capability,
                            near=tenant.devices[0])
        self._add(lease, tenant)  # journaled for its new owner
        self.stats.adoptions += 1
        return self.lease_reply(lease)

    def _add(self, lease: LeaseRecord, tenant: Tenant) -> None:
        """Book a lease to its tenant, in the journal too where there is one."""
        if self.journal is not None:
            peer = tenant.peer
            self.journal.granted(JournaledLease(lease.id, lease.segment.name, lease.nbytes,
                                                lease.device, peer.uid, peer.gid, peer.pid,
                                                lease.capability, tenant.name))
        self.leases.add(lease)
        tenant.leases.add(lease.id)

    def _release(self, caller: Caller, args: m.Release) -> dict[str, Any]:
        tenant = caller.registered
        lease = self._owned(args.lease, tenant)
        self._free(tenant, lease.id)
        return {"released_bytes": lease.nbytes}

    def _lease_info(self, caller: Caller, args: m.LeaseInfo) -> dict[str, Any]:
        return self.lease_reply(self._owned(args.lease, caller.registered))

    def _status(self, caller: Caller, args: m.Status) -> dict[str, Any]:
        if not args.leases:
            return self.status(leases=False)
        if args.device is not None:
            self._device(args.device)
        return self.status(tenant=args.tenant, device=args.device,
                           after=0 if args.after is None else int(args.after), limit=args.limit)

    # --- elastic memory (core/reclaim.py) -------------------------------------

    def _may_reclaim(self, caller: Caller, device: int, op: str) -> None:
        """The operator may take back any device; a tenant only its home ones."""
        self._device(device)
        if caller.peer.uid in self.operators:
            return
        tenant = caller.tenant
        if op == "reclaim" and tenant is not None and device in tenant.devices:
            return
        raise ProtocolError(ErrorCode.PERMISSION_DENIED,
                            f"{op} of device {device} is for the operator (uid "
                            f"{' or '.join(map(str, sorted(self.operators)))})"
                            + (" or a tenant whose home device it is" if op == "reclaim"
                               else ""))

    def _reclaim(self, caller: Caller, args: m.Reclaim) -> dict[str, Any]:
        self._may_reclaim(caller, args.device, "reclaim")
        return self.elastic.reclaim(args.device, args.nbytes, args.deadline_ms / 1000,
                                    caller.conn)

    def _drain(self, caller: Caller, args: m.Drain) -> dict[str, Any]:
        self._may_reclaim(caller, args.device, "drain")
        pool = self.pools[args.device]
        return self.elastic.reclaim(args.device, max(pool.capacity, 1),
                                    args.deadline_ms / 1000, caller.conn, drain=True)

    def _undrain(self, caller: Caller, args: m.Undrain) -> dict[str, Any]:
        self._may_reclaim(caller, args.device, "undrain")
        return self.elastic.undrain(args.device)

    def _home(self, caller: Caller, device: int, op: str) -> Tenant:
        tenant = caller.registered
        self._device(device)
        if device not in tenant.devices:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{op}: device {device} is not a home device of tenant "
                                f"{tenant.id} ({list(tenant.devices)})")
        return tenant

    def _lend(self, caller: Caller, args: m.Lend) -> dict[str, Any]:
        return self.elastic.lend(self._home(caller, args.device, "lend"), args.device,
                                 args.nbytes)

    def _unlend(self, caller: Caller, args: m.Unlend) -> dict[str, Any]:
        return self.elastic.unlend(self._home(caller, args.device, "unlend"), args.device,
                                   args.nbytes, args.deadline_ms / 1000)

    def _move(self, caller: Caller, args: m.Move) -> dict[str, Any]:
        tenant = caller.registered
        return self.elastic.move(tenant, self._owned(args.lease, tenant))

    def fence(self, lease: LeaseRecord) -> bool:
        """A reclaim's deadline passed with `lease` still in place. True: the
        backend revoked the memory (host: truncated and unlinked) and the
        lease is freed; False: it cannot be revoked (cuda), so it stays
        charged and unusable until its holder releases it or exits."""
        fence = getattr(self.backend, "fence", None)
        if fence is not None and fence(lease.segment):
            holder = self.tenants.get(lease.tenant)
            assert holder is not None  # a lease dies with its tenant
            self._free(holder, lease.id)
            return True
        lease.fenced = True
        return False

    def _turn(self, caller: Caller, args: m.Turn) -> dict[str, Any]:
        tenant = caller.registered
        if args.devices is not None:
            self._check_devices("turn", args.devices)
            outside = sorted(set(args.devices) - set(tenant.devices))
            if outside:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"turn: devices {outside} are not among the tenant's home devices "
                    f"{list(tenant.devices)}")
        return self._turn_reply(tenant, self.scheduler.want(tenant.id, args.devices))

    def _turn_done(self, caller: Caller, args: m.TurnDone) -> dict[str, Any]:
        self._emit(self.scheduler.done(caller.registered.id))
        return {}

    def _turn_yield(self, caller: Caller, args: m.TurnYield) -> dict[str, Any]:
        tenant = caller.registered
        return self._turn_reply(tenant, self.scheduler.yield_(tenant.id, args.slice))

    def _turn_reply(self, tenant: Tenant, actions: list[Action]) -> dict[str, Any]:
        self._emit(actions, replying_to=tenant.id)
        runner = self.scheduler.runners[tenant.id]
        if runner.state == "holding":
            return {"state": "granted", "slice": runner.slice, "devices": list(runner.devices),
                    "quantum_s": max(0.0, runner.quantum_end - self.clock())}
        return {"state": "queued", "devices": list(runner.devices)}

    def _emit(self, actions: list[Action], replying_to: str | None = None) -> None:
        """Events for tenants, counted and noted for operators; `replying_to`
        learns of its own grant from the reply, not an event."""
        stats, notes = self.stats, self.notes
        for action in actions:
            tenant = self.tenants.get(action.tenant)
            if tenant is None:
                continue
            # The operators' note is built only where someone reads notes:
            # this runs on every hand-over.
            extra: dict[str, Any]
            if isinstance(action, Grant):
                stats.slice_grants += 1
                waited = self.scheduler.runners[action.tenant].waits[-1]
                stats.slice_waits.observe(waited)
                devices = list(action.devices)
                kind, extra = "slice_granted", {"devices": devices, "waited_s": round(waited, 6)}
                event = "grant", {"slice": action.slice, "devices": devices,
                                  "quantum_s": action.quantum}
            elif isinstance(action, Preempt):
                stats.preemptions += 1
                kind, extra = "slice_preempted", {}
                event = "preempt", {"slice": action.slice, "grace_s": action.grace}
            else:
                stats.revocations += 1
                kind, extra = "slice_revoked", {"reason": action.reason}
                event = "revoked", {"slice": action.slice, "reason": action.reason}
            if notes is not None:
                notes.append((kind, {"tenant": tenant.id, "name": tenant.name,
                                     "slice": action.slice, **extra}))
            if isinstance(action, Grant):
                if action.tenant == replying_to:
                    continue
                stats.handovers += 1
            self._events.append((tenant.conn, *event))

    # --- helpers -------------------------------------------------------------

    def _device(self, device: int) -> None:
        if device not in self.pools:
            raise ProtocolError(
                ErrorCode.NO_SUCH_DEVICE,
                f"no device {device}; devices are {sorted(self.pools)}")

    def _check_devices(self, op: str, devices: list[int]) -> None:
        for dev in devices:
            self._device(dev)
        if len(set(devices)) != len(devices):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{op}: duplicate device ids")

    def _owned(self, lease_id: str, tenant: Tenant) -> LeaseRecord:
        lease = self.leases.owned(lease_id, tenant.id)
        if lease is None:
            raise ProtocolError(ErrorCode.NO_SUCH_LEASE,
                                f"tenant {tenant.id} holds no lease {lease_id}")
        return lease

    def _check_quota(self, peer: Peer, **wanted: int) -> None:
        refusal = self.quotas.refusal(peer, **wanted)
        if refusal is not None:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, refusal.message,
                                details=refusal.details)

    def _free(self, tenant: Tenant, lease_id: str) -> None:
        lease = self.leases.pop(lease_id)
        tenant.leases.discard(lease_id)
        self.backend.destroy(lease.segment)
        self.pools[lease.device].free_bytes(lease.charged)
        self.quotas.charge(tenant.peer, leases=-1, nbytes=-lease.charged)
        self.stats.lease_frees += 1
        self.stats.freed_bytes += lease.charged
        if self.journal is not None:
            self.journal.freed(lease_id)
        if self.elastic.active:
            self.elastic.freed(lease)

    @staticmethod
    def lease_reply(lease: LeaseRecord) -> dict[str, Any]:
        reply = {"lease": lease.id, "device": lease.device, "nbytes": lease.nbytes,
                 "tier": lease.tier.label, "handle": lease.segment.handle}
        if lease.capability:
            reply["capability"] = lease.capability  # the owner's alone: never in status
        return reply

    def _device_status(self, dev: Device) -> dict[str, Any]:
        pool = self.pools[dev.id]
        return {"id": dev.id, "name": dev.name, "backend": dev.backend,
                "capacity_bytes": pool.capacity, "leased_bytes": pool.used,
                "free_bytes": pool.free, "granule_bytes": pool.granule}

    def status(self, *, leases: bool = True, tenant: str | None = None,
               device: int | None = None, after: int = 0,
               limit: int = m.MAX_STATUS_LEASES) -> dict[str, Any]:
        """The `status` reply; its schema is documented in docs/status-schema.md.
        Nothing in it but the page of leases grows with the number of leases:
        the totals are kept up to date by the lease table."""
        now = self.clock()
        out = {
            "schema": 1,
            "daemon": {"protocol": m.PROTOCOL_VERSION, "backend": self.backend.name,
                       "uptime_s": round(now - self.started_at, 3)},
            "devices": [dict(self._device_status(d),
                             leases=self.leases.device_count.get(d.id, 0))
                        for d in self.topology.devices],
            "tenants": [self._tenant_status(t, now)
                        for t in sorted(self.tenants, key=lambda t: int(t.id[1:]))],
            "slices": self.scheduler.view(),
            "links": [
                {"consumer": a, "producer": b, "tier": link.tier.label,
                 "bandwidth_gbps": round(link.bandwidth / 1e9, 3), "nvlinks": link.nvlinks}
                for (a, b), link in sorted(self.topology.links.items())
            ],
            "quotas": self.quotas.view(),
            "elastic": self.elastic.view(),
            "counters": self.stats.view(),
        }
        if leases:
            page = self.leases.page(after, limit, tenant=tenant, device=device)
            out["leases"] = [self._lease_status(l, now) for l in page.leases]
            out["next"] = None if page.next is None else str(page.next)
        return out

    def _tenant_status(self, t: Tenant, now: float) -> dict[str, Any]:
        return {"id": t.id, "name": t.name, "pid": t.peer.pid, "uid": t.peer.uid,
                "gid": t.peer.gid, "devices": list(t.devices), "weight": t.weight,
                "leased_bytes": self.leases.tenant_bytes.get(t.id, 0), "leases": len(t.leases),
                "connected_s": round(now - t.registered_at, 3),
                "idle_s": round(now - t.last_seen, 3)}

    @staticmethod
    def _lease_status(l: LeaseRecord, now: float) -> dict[str, Any]:
        return {"id": l.id, "tenant": l.tenant, "device": l.device, "nbytes": l.nbytes,
                "charged_bytes": l.charged, "tier": l.tier.label,
                "age_s": round(now - l.created_at, 3)}
