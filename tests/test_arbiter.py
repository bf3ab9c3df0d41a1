"""Unit tests for aquad/core/arbiter.py: the Arbiter driven directly.

A fake clock and the real HostBackend writing into a pytest tmp directory (never
/dev/shm); no sockets, no processes.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import stat
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aqua_protocol import ErrorCode, ProtocolError
from aqua_protocol import messages as m
from aqua_protocol.messages import (
    Bye,
    Heartbeat,
    Hello,
    Lease,
    LeaseInfo,
    Release,
    Request,
    Status,
)
from aquad.backends.host import HostBackend
from aquad.core.arbiter import Arbiter, LeaseIds, Limits
from aquad.core.quotas import UNLIMITED
from aquad.core.tenants import Peer

G = 64 * 1024  # HostBackend's default granule
CAP = 16 * G  # per device
UID, GID = os.getuid(), os.getgid()


def fake_clock(start: float = 1000.0):
    now = start

    def clock() -> float:
        return now

    def advance(dt: float) -> None:
        nonlocal now
        now += dt

    return clock, advance


# Every tenant here has one uid: quotas would cut the placement tests short.
# Quotas have their own tests (test_arbiter_quotas.py).
OPEN = Limits(quotas=UNLIMITED)


class World:
    """An Arbiter over a HostBackend in `shm_dir`, with a fake clock."""

    def __init__(self, shm_dir: Path, *, count: int = 2, capacity: int = CAP,
                 limits: Limits = OPEN) -> None:
        self.dir = shm_dir
        self.prefix = f"aqua-{secrets.token_hex(5)}-"
        self.backend = HostBackend(count, capacity, prefix=self.prefix, granule=G,
                                   shm_dir=str(shm_dir))
        self.clock, self.advance = fake_clock()
        self.arb = Arbiter(self.backend, clock=self.clock, limits=limits)
        self._ids = itertools.count(1)
        self.last_rid = 0

    def call(self, conn: bytes, op: m.Op, pid: int = 0, *, peer: Peer | None = None) -> dict:
        self.last_rid = next(self._ids)
        peer = peer or Peer(pid or _pid_of(conn), UID, GID)
        return self.arb.handle(conn, peer, Request(self.last_rid, op)).result

    def refused(self, code: ErrorCode, conn: bytes, op: m.Op, pid: int = 0,
                **kw) -> ProtocolError:
        """The request fails with `code`, carries its id, and changes nothing."""
        before, files = self.arb.status(), self.files()
        with pytest.raises(ProtocolError) as info:
            self.call(conn, op, pid, **kw)
        err = info.value
        assert err.code is code, (err.code, err.message)
        assert err.request_id == self.last_rid
        assert self.arb.status() == before
        assert self.files() == files
        self.check()
        return err

    def hello(self, conn: bytes, name: str = "t", devices=(0,), **kw) -> dict:
        return self.call(conn, Hello(tenant=name, devices=list(devices)), **kw)

    def lease(self, conn: bytes, nbytes: int, near: int | None = None) -> dict:
        return self.call(conn, Lease(nbytes=nbytes, near=near))

    def files(self) -> set[str]:
        """Lease segments: the files in the directory but the backend's spare
        files, made ahead for the next grants."""
        self.arb.maintain()  # destroyed segments are unlinked by deferred work
        return set(os.listdir(self.dir)) - self.backend.spares

    def check(self) -> None:
        """Invariants between pools, lease table, tenants, files and status()."""
        arb = self.arb
        leases = list(arb.leases)
        assert sum(p.used for p in arb.pools.values()) == sum(l.charged for l in leases)
        for dev, pool in arb.pools.items():
            assert pool.used == sum(l.charged for l in leases if l.device == dev)
            assert pool.used + pool.free == pool.capacity
        assert self.files() == {l.segment.name for l in leases}
        owned = set()
        for t in arb.tenants:
            for lid in t.leases:
                assert arb.leases.owned(lid, t.id) is not None
            owned |= t.leases
        assert owned == {l.id for l in leases}
        s = arb.status()
        assert sum(d["leased_bytes"] for d in s["devices"]) == sum(
            t["leased_bytes"] for t in s["tenants"])
        assert sum(d["leases"] for d in s["devices"]) == len(s["leases"]) == len(leases)
        # Quota use is counted on grant and free; a scan must agree.
        for row in s["quotas"]["uids"]:
            assert row["used"] == self.usage([t for t in arb.tenants if t.peer.uid == row["uid"]])
        assert {r["uid"] for r in s["quotas"]["uids"]} >= {t.peer.uid for t in arb.tenants}
        for row in s["quotas"]["groups"]:
            assert row["used"] == self.usage([t for t in arb.tenants if t.peer.gid == row["gid"]])

    def usage(self, tenants: list) -> dict:
        leases = [self.arb.leases.owned(lid, t.id) for t in tenants for lid in t.leases]
        return {"tenants": len(tenants), "leases": len(leases),
                "bytes": sum(l.charged for l in leases)}


def _pid_of(conn: bytes) -> int:
    # Each fake connection belongs to its own fake process.
    return 10_000 + int.from_bytes(conn[-2:], "big")


A, B, C = b"conn-A", b"conn-B", b"conn-C"


@pytest.fixture
def w(tmp_path: Path) -> World:
    world = World(tmp_path)
    yield world
    world.arb.shutdown()
    assert world.files() == set()


def _minimal(cls: type[m.Op]) -> m.Op:
    """A valid instance of any op (for ops this file does not know by name)."""
    known = {Lease: Lease(nbytes=1), Release: Release(lease="L" + "x" * 22),
             LeaseInfo: LeaseInfo(lease="L" + "x" * 22),
             Hello: Hello(tenant="t", devices=[0])}
    if cls in known:
        return known[cls]
    values = {}
    for f in msgspec.inspect.type_info(cls).fields:
        if f.required:
            t = f.type
            values[f.name] = [0] if isinstance(t, msgspec.inspect.ListType) else \
                "0" if isinstance(t, msgspec.inspect.StrType) else t.ge or 0
    return cls(**values)


# --- hello --------------------------------------------------------------------------


def test_hello_registers(w):
    reply = w.hello(A, "llama", devices=(1, 0))
    assert reply["tenant_id"] == "t1"
    assert reply["protocol"] == m.PROTOCOL_VERSION
    assert reply["backend"] == "host"
    assert reply["heartbeat_timeout_s"] == Limits().heartbeat_timeout_s
    assert reply["heartbeat_interval_s"] == Limits().heartbeat_interval_s
    assert [d["id"] for d in reply["devices"]] == [0, 1]
    (t,) = w.arb.status()["tenants"]
    assert (t["id"], t["name"], t["pid"], t["uid"], t["devices"], t["leased_bytes"]) == (
        "t1", "llama", _pid_of(A), UID, [1, 0], 0)
    assert w.hello(B, "other")["tenant_id"] == "t2"


def test_second_hello_on_same_conn_is_refused(w):
    w.hello(A)
    w.refused(ErrorCode.ALREADY_REGISTERED, A, Hello(tenant="again", devices=[1]))
    assert len(w.arb.tenants) == 1


def test_same_process_may_register_two_connections(w):
    w.hello(A)
    w.hello(B, pid=_pid_of(A))
    assert len(w.arb.tenants) == 2


@pytest.mark.parametrize("cls", [c for c in m.OPS.values() if c.needs_tenant],
                         ids=lambda c: c.op)
def test_ops_before_hello_are_refused(w, cls):
    err = w.refused(ErrorCode.NOT_REGISTERED, A, _minimal(cls))
    assert cls.op in err.message


def test_status_needs_no_hello(w):
    assert w.call(A, Status())["tenants"] == []
    assert len(w.arb.tenants) == 0


@pytest.mark.parametrize("devices", [[2], [0, 7], [1023]])
def test_hello_with_unknown_device(w, devices):
    err = w.refused(ErrorCode.NO_SUCH_DEVICE, A, Hello(tenant="t", devices=devices))
    assert "[0, 1]" in err.message  # says which devices exist


def test_hello_with_duplicate_devices(w):
    w.refused(ErrorCode.BAD_REQUEST, A, Hello(tenant="t", devices=[0, 0]))


# --- lease / release ------------------------------------------------------------------


def test_lease_charges_pool_and_creates_private_file(w):
    w.hello(A, devices=(0,))
    reply = w.lease(A, G + 1)
    assert set(reply) >= {"lease", "device", "nbytes", "tier", "handle"}
    assert reply["nbytes"] == G + 1
    assert reply["tier"] == "host"
    # All host devices are one tier; the home device comes last.
    assert reply["device"] == 1
    handle = reply["handle"]
    assert handle["kind"] == "posix_shm" and handle["nbytes"] == G + 1
    name = handle["name"]
    assert re.fullmatch(re.escape(w.prefix) + "[0-9a-f]{24}", name)
    path = w.dir / name
    st_ = os.stat(path)
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert st_.st_uid == UID
    assert st_.st_size == G + 1
    assert w.arb.pools[1].used == 2 * G and w.arb.pools[0].used == 0
    s = w.arb.status()
    (lease,) = s["leases"]
    assert (lease["id"], lease["tenant"], lease["device"], lease["nbytes"]) == (
        reply["lease"], "t1", 1, G + 1)
    assert lease["charged_bytes"] == 2 * G
    assert s["tenants"][0]["leased_bytes"] == 2 * G
    assert s["devices"][1]["leased_bytes"] == 2 * G
    assert s["devices"][1]["free_bytes"] == CAP - 2 * G
    w.check()


def test_memory_belongs_to_the_peer_uid(w):
    other = Peer(_pid_of(A), UID + 4321, GID + 4321)
    if os.geteuid() != 0:
        # An unprivileged daemon cannot make memory for another user.
        w.refused(ErrorCode.PERMISSION_DENIED, A, Hello(tenant="t", devices=[0]),
                  peer=other)
        return
    w.hello(A, peer=other)
    name = w.lease(A, G)["handle"]["name"]
    st_ = os.stat(w.dir / name)
    assert (st_.st_uid, st_.st_gid) == (other.uid, other.gid)
    assert stat.S_IMODE(st_.st_mode) == 0o600


def test_lease_ids_are_valid_on_the_wire(w):
    w.hello(A)
    lid = w.lease(A, 1)["lease"]
    frame = m.encode_request(1, Release(lease=lid))
    assert m.decode_request(frame).args.lease == lid


def test_lease_near_and_home(w):
    w.hello(A, devices=(1,))
    assert w.lease(A, 1)["device"] == 0  # non-home first
    assert w.lease(A, 1, near=0)["device"] == 0
    # Only the home device has room left: it is used rather than refusing.
    w.lease(A, CAP - 2 * G)  # fills device 0
    assert w.lease(A, G)["device"] == 1
    w.check()


def test_release_returns_every_byte_and_deletes_the_file(w):
    w.hello(A)
    r1 = w.lease(A, 3 * G + 5)
    r2 = w.lease(A, 1)
    assert w.call(A, Release(lease=r1["lease"])) == {"released_bytes": 3 * G + 5}
    w.arb.maintain()
    assert not (w.dir / r1["handle"]["name"]).exists()
    assert (w.dir / r2["handle"]["name"]).exists()
    w.call(A, Release(lease=r2["lease"]))
    assert all(p.used == 0 for p in w.arb.pools.values())
    assert w.files() == set()
    assert w.arb.status()["leases"] == []
    w.refused(ErrorCode.NO_SUCH_LEASE, A, Release(lease=r1["lease"]))
    w.check()


def test_lease_info_describes_own_lease(w):
    w.hello(A)
    reply = w.lease(A, 1000)
    assert w.call(A, LeaseInfo(lease=reply["lease"])) == reply


def test_other_tenants_lease_looks_nonexistent(w):
    w.hello(A)
    w.hello(B)
    lid = w.lease(A, G)["lease"]
    missing = "L" + "Q" * 22
    for op in (Release, LeaseInfo):
        foreign = w.refused(ErrorCode.NO_SUCH_LEASE, B, op(lease=lid))
        absent = w.refused(ErrorCode.NO_SUCH_LEASE, B, op(lease=missing))
        assert foreign.message.replace(lid, "<id>") == absent.message.replace(missing, "<id>")
        assert foreign.details == absent.details
    # A still owns it.
    assert w.call(A, LeaseInfo(lease=lid))["lease"] == lid
    assert w.call(A, Release(lease=lid))["released_bytes"] == G


def test_peer_pid_must_match_the_tenant(w):
    w.hello(A)
    lid = w.lease(A, G)["lease"]
    w.advance(3.0)
    intruder = _pid_of(A) + 1
    for op in (Heartbeat(), Lease(nbytes=1), Release(lease=lid), LeaseInfo(lease=lid), Bye(),
               Status(), Hello(tenant="x", devices=[0])):
        w.refused(ErrorCode.PERMISSION_DENIED, A, op, pid=intruder)
    # The intruder did not keep the tenant alive either.
    assert w.arb.status()["tenants"][0]["idle_s"] == 3.0
    assert w.call(A, LeaseInfo(lease=lid))["lease"] == lid


def test_out_of_memory_says_what_is_free(w):
    w.hello(A)
    assert w.lease(A, CAP - 3 * G)["device"] == 1  # non-home first: 3 granules left
    assert w.lease(A, CAP - 5 * G)["device"] == 0  # does not fit on 1: 5 granules left
    s = w.arb.status()
    free = sorted(d["free_bytes"] for d in s["devices"])
    largest, total = free[-1], sum(free)
    err = w.refused(ErrorCode.OUT_OF_MEMORY, A, Lease(nbytes=largest + 1))
    assert str(largest) in err.message and str(total) in err.message
    assert err.details == {"requested_bytes": largest + 1, "largest_free_bytes": largest,
                           "total_free_bytes": total}
    # Exactly the largest free amount still fits.
    w.lease(A, largest)
    w.check()


def test_out_of_memory_even_when_total_free_would_do(w):
    # Leases are never split across devices.
    w.hello(A)
    w.refused(ErrorCode.OUT_OF_MEMORY, A, Lease(nbytes=CAP + 1))
    w.lease(A, CAP)


def test_backend_failure_is_out_of_memory_and_changes_nothing(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    world = World(shm)
    world.hello(A)
    shm.rmdir()  # every create() now fails
    before = world.arb.status()
    with pytest.raises(ProtocolError) as info:
        world.lease(A, G)
    assert info.value.code is ErrorCode.OUT_OF_MEMORY
    assert world.arb.status() == before
    assert all(p.used == 0 for p in world.arb.pools.values())


def test_lease_near_unknown_device(w):
    w.hello(A)
    err = w.refused(ErrorCode.NO_SUCH_DEVICE, A, Lease(nbytes=1, near=5))
    assert "5" in err.message


def test_max_leases_per_tenant(tmp_path):
    world = World(tmp_path, limits=Limits(max_leases_per_tenant=2))
    world.hello(A)
    world.hello(B)
    lid = world.lease(A, 1)["lease"]
    world.lease(A, 1)
    err = world.refused(ErrorCode.LIMIT_EXCEEDED, A, Lease(nbytes=1))
    assert "2" in err.message
    world.lease(B, 1)  # the limit is per tenant
    world.call(A, Release(lease=lid))
    world.lease(A, 1)
    world.check()
    world.arb.shutdown()


def test_max_tenants(tmp_path):
    world = World(tmp_path, limits=Limits(max_tenants=2, quotas=UNLIMITED))
    world.hello(A)
    world.hello(B)
    world.refused(ErrorCode.LIMIT_EXCEEDED, C, Hello(tenant="c", devices=[0]))
    world.call(B, Bye())
    world.hello(C)
    assert [t["name"] for t in world.arb.status()["tenants"]] == ["t", "t"]
    world.arb.shutdown()


# --- lifetime ---------------------------------------------------------------------------


def test_expire_drops_silent_tenants_and_frees_their_leases(w):
    timeout = Limits().heartbeat_timeout_s
    w.hello(A)
    w.hello(B)
    a_lease = w.lease(A, 2 * G)
    w.lease(B, G)
    w.advance(timeout - 1)
    w.call(B, Heartbeat())
    w.advance(1)  # A exactly at the timeout: not yet
    assert w.arb.expire() == []
    w.advance(0.01)
    dropped = w.arb.expire()
    assert [t.name for t in dropped] == ["t"] and dropped[0].conn == A
    w.arb.maintain()
    assert not (w.dir / a_lease["handle"]["name"]).exists()
    assert [t["id"] for t in w.arb.status()["tenants"]] == ["t2"]
    w.check()
    w.refused(ErrorCode.NOT_REGISTERED, A, Heartbeat())
    # B stays as long as it talks; any request counts.
    for op in (Heartbeat(), Lease(nbytes=1), Status()):
        w.advance(timeout)
        w.call(B, op)
        assert w.arb.expire() == []
    w.advance(timeout + 0.5)
    assert [t.conn for t in w.arb.expire()] == [B]
    assert w.files() == set()
    assert all(p.used == 0 for p in w.arb.pools.values())


def test_expire_honours_configured_timeout(tmp_path):
    world = World(tmp_path, limits=Limits(heartbeat_timeout_s=0.5))
    world.hello(A)
    world.advance(0.6)
    assert len(world.arb.expire()) == 1
    world.arb.shutdown()


def test_drop_tenant_frees_leases(w):
    w.hello(A)
    w.hello(B)
    for _ in range(3):
        w.lease(A, G)
    b = w.lease(B, G)
    tenant = w.arb.drop_tenant("t1")
    assert tenant is not None and tenant.conn == A
    assert w.files() == {b["handle"]["name"]}
    assert sum(p.used for p in w.arb.pools.values()) == G
    assert w.arb.drop_tenant("t1") is None
    assert w.arb.drop_tenant("nobody") is None
    w.check()
    # The connection may register again, as a new tenant.
    assert w.hello(A)["tenant_id"] == "t3"


def test_bye_releases_everything(w):
    w.hello(A)
    w.lease(A, 10)
    w.lease(A, G + 3)
    assert w.call(A, Bye()) == {"released_bytes": G + 13}
    assert w.files() == set() and len(w.arb.tenants) == 0
    w.check()


def test_shutdown_frees_everything_and_refuses_further_requests(w):
    w.hello(A)
    w.hello(B)
    w.lease(A, G)
    w.lease(B, 2 * G)
    assert w.files()
    conns = w.arb.shutdown()
    assert sorted(conns) == [A, B]
    assert os.listdir(w.dir) == []  # spare files too
    assert all(p.used == 0 for p in w.arb.pools.values())
    assert len(w.arb.tenants) == 0 and len(w.arb.leases) == 0
    for conn, op in [(A, Heartbeat()), (A, Lease(nbytes=1)), (C, Status()),
                     (C, Hello(tenant="late", devices=[0]))]:
        w.refused(ErrorCode.SHUTTING_DOWN, conn, op)


# --- status ---------------------------------------------------------------------------


def test_status_schema_and_sums(w):
    w.hello(A, "alpha", devices=(0,))
    w.hello(B, "beta", devices=(1,))
    w.lease(A, 1)
    w.advance(2.0)
    w.lease(A, 3 * G)
    w.lease(B, G + 1)
    s = w.arb.status()
    assert s["schema"] == 1
    assert s["daemon"]["backend"] == "host" and s["daemon"]["uptime_s"] == 2.0
    for d in s["devices"]:
        assert {"id", "backend", "capacity_bytes", "leased_bytes", "free_bytes"} <= set(d)
        assert d["backend"] == "host" and d["capacity_bytes"] == CAP
        assert d["leased_bytes"] + d["free_bytes"] == d["capacity_bytes"]
    for t in s["tenants"]:
        assert {"id", "name", "pid", "leased_bytes"} <= set(t)
    for lease in s["leases"]:
        assert {"id", "tenant", "device", "nbytes"} <= set(lease)
    assert [t["name"] for t in s["tenants"]] == ["alpha", "beta"]
    assert [t["pid"] for t in s["tenants"]] == [_pid_of(A), _pid_of(B)]
    by_tenant = {t["id"]: t["leased_bytes"] for t in s["tenants"]}
    assert by_tenant == {"t1": G + 3 * G, "t2": 2 * G}
    total = sum(d["leased_bytes"] for d in s["devices"])
    assert total == sum(by_tenant.values()) == sum(l["charged_bytes"] for l in s["leases"])
    assert sum(d["free_bytes"] for d in s["devices"]) == 2 * CAP - total
    assert sorted(l["nbytes"] for l in s["leases"]) == [1, G + 1, 3 * G]
    assert [l["age_s"] for l in s["leases"]] == [2.0, 0.0, 0.0]
    for d in s["devices"]:
        assert d["leased_bytes"] == sum(
            l["charged_bytes"] for l in s["leases"] if l["device"] == d["id"])
    assert w.call(C, Status()) == s


def test_refused_requests_never_change_status(w):
    w.hello(A)
    w.hello(B)
    lid = w.lease(A, 2 * G)["lease"]
    w.lease(B, G)
    cases = [
        (ErrorCode.ALREADY_REGISTERED, A, Hello(tenant="x", devices=[0]), 0),
        (ErrorCode.NOT_REGISTERED, C, Lease(nbytes=1), 0),
        (ErrorCode.NOT_REGISTERED, C, Release(lease=lid), 0),
        (ErrorCode.NO_SUCH_DEVICE, C, Hello(tenant="x", devices=[9]), 0),
        (ErrorCode.BAD_REQUEST, C, Hello(tenant="x", devices=[1, 1]), 0),
        (ErrorCode.NO_SUCH_DEVICE, A, Lease(nbytes=1, near=2), 0),
        (ErrorCode.OUT_OF_MEMORY, A, Lease(nbytes=CAP + 1), 0),
        (ErrorCode.NO_SUCH_LEASE, B, Release(lease=lid), 0),
        (ErrorCode.NO_SUCH_LEASE, B, LeaseInfo(lease=lid), 0),
        (ErrorCode.PERMISSION_DENIED, A, Release(lease=lid), 4242),
        (ErrorCode.PERMISSION_DENIED, A, Bye(), 4242),
    ]
    for code, conn, op, pid in cases:
        w.refused(code, conn, op, pid)


# --- property: random workloads keep the books straight ---------------------------------

CONNS = [b"conn-0", b"conn-1", b"conn-2"]

hello_action = st.tuples(st.just("hello"), st.sampled_from(CONNS),
                         st.sets(st.integers(0, 2), min_size=1))
lease_action = st.tuples(st.just("lease"), st.sampled_from(CONNS), st.integers(1, 5 * G),
                         st.none() | st.integers(0, 3))
release_action = st.tuples(st.just("release"), st.sampled_from(CONNS), st.integers(0, 50))
actions = st.tuples(
    # Usually start with every connection registered, so leases happen.
    st.lists(hello_action, min_size=3, max_size=3),
    st.lists(
        st.one_of(
            lease_action, lease_action, lease_action, release_action, release_action,
            hello_action,
            st.tuples(st.just("steal"), st.sampled_from(CONNS), st.integers(0, 50)),
            st.tuples(st.just("bye"), st.sampled_from(CONNS)),
            st.tuples(st.just("drop"), st.sampled_from(CONNS)),
            st.tuples(st.just("tick"), st.floats(0, 4)),
        ),
        min_size=10, max_size=40,
    ),
).map(lambda parts: parts[0] + parts[1])


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(actions)
def test_random_workloads_keep_pools_leases_and_files_consistent(tmp_path_factory, script):
    world = World(tmp_path_factory.mktemp("shm"), count=3, capacity=4 * G,
                  limits=Limits(max_leases_per_tenant=6, heartbeat_timeout_s=5.0))
    arb = world.arb
    for action in script:
        kind, rest = action[0], action[1:]
        before, files = stable(arb.status()), world.files()
        try:
            if kind == "hello":
                conn, devices = rest
                world.hello(conn, devices=sorted(devices))
            elif kind == "lease":
                conn, nbytes, near = rest
                used = sum(p.used for p in arb.pools.values())
                reply = world.lease(conn, nbytes, near)
                granted = arb.pools[reply["device"]].round_up(nbytes)
                assert sum(p.used for p in arb.pools.values()) == used + granted
                assert (world.dir / reply["handle"]["name"]).exists()
                event("lease granted")
            elif kind in ("release", "steal"):
                conn, index = rest
                live = sorted(arb.leases, key=lambda l: l.id)
                if not live:
                    continue
                lease = live[index % len(live)]
                tenant = arb.tenants.by_conn(conn)
                mine = tenant is not None and lease.tenant == tenant.id
                if mine != (kind == "release"):
                    continue
                if kind == "steal":
                    with pytest.raises(ProtocolError) as info:
                        world.call(conn, Release(lease=lease.id))
                    code = ErrorCode.NO_SUCH_LEASE if tenant else ErrorCode.NOT_REGISTERED
                    assert info.value.code is code
                    assert lease.id in arb.leases
                    assert stable(arb.status()) == before and world.files() == files
                else:
                    world.call(conn, Release(lease=lease.id))
                    assert lease.id not in arb.leases
                    arb.maintain()
                    assert not (world.dir / lease.segment.name).exists()
                event(f"{kind} done")
            elif kind == "bye":
                world.call(rest[0], Bye())
            elif kind == "drop":
                tenant = arb.tenants.by_conn(rest[0])
                if tenant is not None:
                    arb.drop_tenant(tenant.id)
                    assert all(l.tenant != tenant.id for l in arb.leases)
            elif kind == "tick":
                world.advance(rest[0])
                for t in arb.expire():
                    assert all(l.tenant != t.id for l in arb.leases)
        except ProtocolError as exc:
            event(f"{kind} refused: {exc.code.value}")
            assert exc.code in {ErrorCode.NOT_REGISTERED, ErrorCode.ALREADY_REGISTERED,
                                ErrorCode.OUT_OF_MEMORY, ErrorCode.NO_SUCH_DEVICE,
                                ErrorCode.LIMIT_EXCEEDED}, exc
            # A refused request leaves no trace (bar proving its sender alive).
            assert stable(arb.status()) == before
            assert world.files() == files
        world.check()
    arb.shutdown()
    assert world.files() == set()
    assert all(p.used == 0 for p in arb.pools.values())


def stable(status: dict) -> dict:
    """status() without the tenants' idle time, which any request resets."""
    return dict(status, tenants=[{k: v for k, v in t.items() if k != "idle_s"}
                                 for t in status["tenants"]])


def test_lease_ids_are_random_well_formed_and_span_batches():
    ids = LeaseIds()
    drawn = [ids() for _ in range(3 * LeaseIds.BATCH + 7)]  # across refills
    assert len(set(drawn)) == len(drawn)
    assert all(m.LEASE_ID_RE.fullmatch(i) and len(i) == 25 for i in drawn)
    # 144 bits each: no id shares a long prefix with another by chance.
    assert len({i[:9] for i in drawn}) == len(drawn)


def test_a_request_reports_its_effects_for_the_shell_to_act_on(w):
    # The shell does not look at request types: the outcome says who joined,
    # who left, and when events and the timer need attention.
    def outcome(conn: bytes, op: m.Op):
        return w.arb.handle(conn, Peer(_pid_of(conn), UID, GID), Request(next(w._ids), op))

    joined = outcome(b"a", Hello(tenant="a", devices=[0]))
    assert joined.registered is not None and joined.registered.name == "a"
    assert joined.gone is None and not joined.reschedule
    leased = outcome(b"a", Lease(nbytes=G))
    assert leased.registered is None and leased.gone is None and not leased.reschedule
    assert outcome(b"a", m.Turn()).reschedule
    assert not outcome(b"b", m.Status(leases=False)).reschedule
    outcome(b"b", Hello(tenant="b", devices=[0]))
    waiting = outcome(b"b", m.Turn())
    assert waiting.result["state"] == "queued" and waiting.reschedule
    left = outcome(b"a", m.Bye())
    assert left.gone is not None and left.gone.name == "a" and left.reschedule
    # a's leaving granted b its slice: an event the shell must send now
    assert [name for _, name, _ in w.arb.take_events()] == ["grant"]
