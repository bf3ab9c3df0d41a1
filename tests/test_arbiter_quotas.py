"""Quotas and operator-set weights, through the Arbiter (fake clock, real
HostBackend in a tmp directory, peers of several uids and groups)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aqua.ctl import quotas_table, render_status
from aqua_protocol import ErrorCode, ProtocolError
from aqua_protocol.messages import Bye, Hello, Lease, Release
from aquad.core.arbiter import Limits
from aquad.core.quotas import Quota, QuotaPolicy, Share
from aquad.core.tenants import Peer
from aquad.core.weights import WeightPolicy

from .test_arbiter import CAP, G, World, _pid_of

ALICE, BOB, CAROL = 2001, 2002, 2003  # uids
TEAM, OTHERS = 3001, 3002  # gids: Alice and Bob are in TEAM, Carol is not

POLICY = QuotaPolicy(
    default=Quota(bytes=8 * G, leases=3, tenants=2, name="quota.default"),
    uids={CAROL: Quota(bytes=Share(50), leases=3, tenants=3, name="quota.uid.2003")},
    groups={TEAM: Quota(tenants=3, bytes=12 * G, name="quota.group.team")})

GID = {ALICE: TEAM, BOB: TEAM, CAROL: OTHERS}


def world(tmp_path: Path, quotas: QuotaPolicy = POLICY, **limits) -> World:
    w = World(tmp_path, limits=Limits(quotas=quotas, **limits))
    # Under test are the quotas, not whether this process may chown to a uid.
    w.backend.check_owner = lambda peer: None
    return w


def peer(conn: bytes, uid: int) -> Peer:
    return Peer(_pid_of(conn), uid, GID[uid])


def hello(w: World, conn: bytes, uid: int, name: str = "t",
          weight: float | None = None) -> dict:
    return w.call(conn, Hello(tenant=name, devices=[0], weight=weight), peer=peer(conn, uid))


def lease(w: World, conn: bytes, uid: int, nbytes: int) -> dict:
    return w.call(conn, Lease(nbytes=nbytes), peer=peer(conn, uid))


def used(w: World, uid: int) -> dict:
    (row,) = [r for r in w.arb.status()["quotas"]["uids"] if r["uid"] == uid]
    return row["used"]


@pytest.fixture
def w(tmp_path: Path) -> World:
    world_ = world(tmp_path)
    yield world_
    world_.arb.shutdown()


A1, A2, A3, B1, C1, C2 = (f"conn-{n}".encode() for n in ("a1", "a2", "a3", "b1", "c1", "c2"))


def test_byte_quota_refuses_names_itself_and_changes_nothing(w):
    hello(w, A1, ALICE)
    lease(w, A1, ALICE, 6 * G)
    lease(w, A1, ALICE, G + 1)  # charged 2 granules: the quota counts what devices count
    err = w.refused(ErrorCode.LIMIT_EXCEEDED, A1, Lease(nbytes=1), peer=peer(A1, ALICE))
    assert err.details == {"quota": "quota.default", "resource": "bytes", "limit": 8 * G,
                           "used": 8 * G, "requested": G}
    for words in ("quota.default", f"uid {ALICE}", str(8 * G), "bytes"):
        assert words in err.message
    # Another uid still gets memory, up to its own quota.
    hello(w, C1, CAROL)
    assert lease(w, C1, CAROL, CAP)["nbytes"] == CAP  # quota.uid: half of 2 x CAP
    w.refused(ErrorCode.LIMIT_EXCEEDED, C1, Lease(nbytes=1), peer=peer(C1, CAROL))
    w.check()


def test_out_of_memory_comes_before_the_byte_quota(w):
    # Placement first: no device could hold it, whatever the quota says.
    hello(w, A1, ALICE)
    w.refused(ErrorCode.OUT_OF_MEMORY, A1, Lease(nbytes=CAP + 1), peer=peer(A1, ALICE))


def test_lease_quota_counts_a_uids_tenants_together(w):
    hello(w, A1, ALICE)
    hello(w, A2, ALICE)
    first = lease(w, A1, ALICE, 1)["lease"]
    lease(w, A1, ALICE, 1)
    lease(w, A2, ALICE, 1)
    err = w.refused(ErrorCode.LIMIT_EXCEEDED, A2, Lease(nbytes=1), peer=peer(A2, ALICE))
    assert (err.details["resource"], err.details["limit"], err.details["used"]) == (
        "leases", 3, 3)
    hello(w, B1, BOB)
    lease(w, B1, BOB, 1)  # Bob's leases are his own
    w.call(A1, Release(lease=first), peer=peer(A1, ALICE))
    lease(w, A2, ALICE, 1)
    w.check()


def test_tenant_quota_and_another_uid_still_registers(w):
    hello(w, A1, ALICE)
    hello(w, A2, ALICE)
    err = w.refused(ErrorCode.LIMIT_EXCEEDED, A3, Hello(tenant="t", devices=[0]),
                    peer=peer(A3, ALICE))
    assert err.details["resource"] == "tenants" and "quota.default" in err.message
    hello(w, C1, CAROL)
    hello(w, C2, CAROL)
    w.call(A2, Bye(), peer=peer(A2, ALICE))
    hello(w, A3, ALICE)  # the slot came back
    w.check()


def test_group_quota_sums_its_members(w):
    hello(w, A1, ALICE)
    hello(w, A2, ALICE)
    hello(w, B1, BOB)  # the team's third tenant
    err = w.refused(ErrorCode.LIMIT_EXCEEDED, b"conn-b2", Hello(tenant="t", devices=[0]),
                    peer=Peer(_pid_of(b"conn-b2"), BOB, TEAM))
    assert err.details == {"quota": "quota.group.team", "resource": "tenants", "limit": 3,
                           "used": 3, "requested": 1}
    assert f"group {TEAM}" in err.message
    # Bytes: each member is under its uid's 8 granules, the team's 12 are full.
    lease(w, A1, ALICE, 7 * G)
    lease(w, B1, BOB, 5 * G)
    err = w.refused(ErrorCode.LIMIT_EXCEEDED, B1, Lease(nbytes=1), peer=peer(B1, BOB))
    assert (err.details["quota"], err.details["used"]) == ("quota.group.team", 12 * G)
    hello(w, C1, CAROL)  # outside the group
    lease(w, C1, CAROL, 5 * G)
    (team,) = w.arb.status()["quotas"]["groups"]
    assert team == {"gid": TEAM, "quota": "quota.group.team",
                    "limit": {"tenants": 3, "leases": None, "bytes": 12 * G},
                    "used": {"tenants": 3, "leases": 2, "bytes": 12 * G}}
    w.check()


def test_dropping_a_tenant_gives_its_usage_back(w):
    hello(w, A1, ALICE)
    hello(w, A2, ALICE)
    lease(w, A1, ALICE, 4 * G)
    lease(w, A1, ALICE, 4 * G)
    assert used(w, ALICE) == {"tenants": 2, "leases": 2, "bytes": 8 * G}
    w.arb.drop_tenant(w.arb.tenants.by_conn(A1).id)  # died: pidfd
    assert used(w, ALICE) == {"tenants": 1, "leases": 0, "bytes": 0}
    lease(w, A2, ALICE, 8 * G)
    w.advance(Limits().heartbeat_timeout_s + 1)
    assert len(w.arb.expire()) == 1  # went silent
    # Nothing held, nothing named in the config: the uid leaves the table.
    assert [r["uid"] for r in w.arb.status()["quotas"]["uids"]] == [CAROL]
    (team,) = w.arb.status()["quotas"]["groups"]
    assert team["used"] == {"tenants": 0, "leases": 0, "bytes": 0}
    w.check()


def test_status_lists_the_default_named_uids_and_users(w):
    hello(w, A1, ALICE)
    lease(w, A1, ALICE, 3)
    quotas = w.arb.status()["quotas"]
    assert quotas["default"] == {"tenants": 2, "leases": 3, "bytes": 8 * G}
    assert quotas["uids"] == [
        {"uid": ALICE, "quota": "quota.default",
         "limit": {"tenants": 2, "leases": 3, "bytes": 8 * G},
         "used": {"tenants": 1, "leases": 1, "bytes": G}},
        {"uid": CAROL, "quota": "quota.uid.2003",  # named, so listed while idle
         "limit": {"tenants": 3, "leases": 3, "bytes": CAP},
         "used": {"tenants": 0, "leases": 0, "bytes": 0}}]
    assert w.arb.status()["tenants"][0]["gid"] == TEAM


def test_default_quotas_are_shares_of_the_daemon(tmp_path):
    # Limits() is the daemon's default: half the capacity, a quarter of the slots.
    w = World(tmp_path, limits=Limits(max_tenants=8))
    w.hello(b"conn-1")
    w.hello(b"conn-2")
    w.refused(ErrorCode.LIMIT_EXCEEDED, b"conn-3", Hello(tenant="t", devices=[0]))
    w.lease(b"conn-1", CAP)
    err = w.refused(ErrorCode.LIMIT_EXCEEDED, b"conn-2", Lease(nbytes=1))
    assert err.details["limit"] == CAP and err.details["quota"] == "quota.default"
    assert w.arb.status()["quotas"]["default"] == {"tenants": 2, "leases": 16_384,
                                                   "bytes": CAP}
    w.arb.shutdown()


# --- weights ----------------------------------------------------------------------------


WEIGHTS = WeightPolicy(default=1.0, uids={ALICE: 4.0}, tenants={"small": 2.0})


@pytest.mark.parametrize("uid, name, asked, granted", [
    (ALICE, "big", None, 4.0),  # the policy's weight
    (ALICE, "big", 100.0, 4.0),  # asking for more gets the policy's
    (ALICE, "big", 0.5, 0.5),  # asking for less gets it
    (ALICE, "small", None, 2.0),  # the name lowers Alice's weight
    (BOB, "small", None, 1.0),  # ... but never raises Bob's
    (BOB, "big", 3.0, 1.0),
])
def test_weights_come_from_the_policy(tmp_path, uid, name, asked, granted):
    w = World(tmp_path, limits=Limits(quotas=POLICY, weights=WEIGHTS))
    w.backend.check_owner = lambda peer: None
    reply = hello(w, A1, uid, name, weight=asked)
    assert reply["weight"] == granted
    assert w.arb.status()["tenants"][0]["weight"] == granted
    assert w.arb.scheduler.runners[reply["tenant_id"]].weight == granted
    w.arb.shutdown()


# --- property: quota books always match a scan, and hold -------------------------------

UIDS = [ALICE, BOB, CAROL]
CONNS = [f"conn-p{i}".encode() for i in range(6)]
sizes = st.integers(1, 6 * G) | st.integers(1, 6).map(lambda n: n * G)
ops = st.lists(st.one_of(
    st.tuples(st.just("hello"), st.sampled_from(CONNS), st.sampled_from(UIDS)),
    st.tuples(st.just("lease"), st.sampled_from(CONNS), sizes),
    st.tuples(st.just("lease"), st.sampled_from(CONNS), sizes),
    st.tuples(st.just("lease"), st.sampled_from(CONNS), sizes),
    st.tuples(st.just("release"), st.sampled_from(CONNS), st.integers(0, 20)),
    st.tuples(st.just("drop"), st.sampled_from(CONNS), st.just(0)),
), min_size=5, max_size=40)
# Usually every connection says hello first (some are refused), so leases happen.
scripts = st.tuples(st.lists(st.sampled_from(UIDS), min_size=len(CONNS), max_size=len(CONNS)),
                    ops).map(lambda p: [("hello", c, u) for c, u in zip(CONNS, p[0])] + p[1])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(scripts)
def test_random_workloads_never_exceed_a_quota(tmp_path_factory, script):
    w = world(tmp_path_factory.mktemp("shm"))
    for kind, conn, arg in script:
        before = w.arb.status()
        tenant = w.arb.tenants.by_conn(conn)
        try:
            if kind == "hello":
                hello(w, conn, arg)
            elif tenant is None:
                continue
            elif kind == "lease":
                lease(w, conn, tenant.peer.uid, arg)
            elif kind == "release" and tenant.leases:
                lid = sorted(tenant.leases)[arg % len(tenant.leases)]
                w.call(conn, Release(lease=lid), peer=tenant.peer)
            elif kind == "drop":
                w.arb.drop_tenant(tenant.id)
            event(f"{kind} done")
        except ProtocolError as exc:
            event(f"{kind} refused: {exc.details.get('quota', '')} "
                  f"{exc.details.get('resource', exc.code.value)}")
            assert exc.code in (ErrorCode.LIMIT_EXCEEDED, ErrorCode.OUT_OF_MEMORY,
                                ErrorCode.ALREADY_REGISTERED), exc
            after = w.arb.status()
            assert dict(after, tenants=None) == dict(before, tenants=None)
        w.check()
        quotas = w.arb.status()["quotas"]
        for row in quotas["uids"] + quotas["groups"]:
            for resource, limit in row["limit"].items():
                assert limit is None or row["used"][resource] <= limit, row
    w.arb.shutdown()
    assert w.arb.status()["quotas"]["uids"] == [
        {"uid": CAROL, "quota": "quota.uid.2003",
         "limit": {"tenants": 3, "leases": 3, "bytes": CAP},
         "used": {"tenants": 0, "leases": 0, "bytes": 0}}]


def test_aquactl_draws_use_against_each_quota(w):
    hello(w, A1, ALICE)
    lease(w, A1, ALICE, 3 * G)
    status = w.arb.status()
    lines = quotas_table(status).splitlines()
    assert lines[0].split() == ["QUOTA", "FOR", "FROM", "TENANTS", "LEASES", "BYTES"]
    assert " ".join(lines[2].split()) == (f"uid {ALICE} quota.default 1 / 2 1 / 3 "
                                          f"192.0 KiB / 512.0 KiB")
    assert " ".join(lines[3].split()) == (f"uid {CAROL} quota.uid.2003 0 / 3 0 / 3 "
                                          f"0 B / 1.0 MiB")
    assert " ".join(lines[4].split()) == (f"group {TEAM} quota.group.team 1 / 3 1 / none "
                                          f"192.0 KiB / 768.0 KiB")
    assert " ".join(lines[5].split()) == "other uids quota.default - / 2 - / 3 - / 512.0 KiB"
    assert "QUOTA FOR" in render_status(status)
    # A daemon from before quotas: no table, no error.
    assert quotas_table({k: v for k, v in status.items() if k != "quotas"}) == ""
