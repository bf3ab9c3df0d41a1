"""`status` at scale: totals kept on grant and free, leases paged by cursor.

The arbiter-level tests drive an Arbiter over a HostBackend with a fake
clock (World, from test_arbiter); the daemon-level ones go through aquad,
the client's lease walk and aquactl.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import aqua
import aqua_protocol
from aqua_protocol import ErrorCode, ProtocolError
from aqua_protocol import messages as m

from .test_arbiter import G, World

A, B, C = b"conn-A", b"conn-B", b"conn-C"


@pytest.fixture
def big(tmp_path: Path) -> World:
    world = World(tmp_path, count=2, capacity=2048 * G)
    yield world
    world.arb.shutdown()


def grant(w: World, conn: bytes, count: int, near: int = 0) -> list[str]:
    return [w.lease(conn, 1, near=near)["lease"] for _ in range(count)]


def release(w: World, conn: bytes, lease_id: str) -> None:
    w.call(conn, m.Release(lease=lease_id))


def walk(w: World, **filters) -> list[str]:
    """Every lease id the pages list, following `next` to the end."""
    seen, after = [], None
    while True:
        page = w.call(A, m.Status(after=after, **filters))
        seen += [l["id"] for l in page["leases"]]
        after = page["next"]
        if after is None:
            return seen


def test_bare_status_lists_the_leases_in_grant_order_with_no_next(big):
    big.hello(A)
    ids = grant(big, A, 5)
    s = big.call(A, m.Status())
    assert [l["id"] for l in s["leases"]] == ids
    assert s["next"] is None
    assert s["schema"] == 1


def test_bare_status_lists_at_most_one_page(big):
    big.hello(A, devices=(0, 1))
    ids = grant(big, A, 1000) + grant(big, A, 50, near=1)
    s = big.call(A, m.Status())
    assert [l["id"] for l in s["leases"]] == ids[:m.MAX_STATUS_LEASES]
    assert s["next"] is not None
    assert sum(d["leases"] for d in s["devices"]) == 1050  # the totals count them all


def test_the_summary_has_no_leases_and_the_same_totals(big):
    big.hello(A)
    big.hello(B, devices=(1,))
    grant(big, A, 3)
    grant(big, B, 2, near=1)
    full, summary = big.call(A, m.Status()), big.call(A, m.Status(leases=False))
    assert "leases" not in summary and "next" not in summary
    for key in ("devices", "tenants", "quotas", "slices", "links"):
        assert summary[key] == full[key]
    assert [t["leases"] for t in summary["tenants"]] == [3, 2]
    assert [t["leased_bytes"] for t in summary["tenants"]] == [3 * G, 2 * G]
    leases = list(big.arb.leases)
    assert [d["leases"] for d in summary["devices"]] == \
        [sum(l.device == d for l in leases) for d in (0, 1)]


@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_pages_cover_every_lease_exactly_once(big, limit):
    big.hello(A, devices=(0, 1))
    big.hello(B, devices=(1, 0))
    ids = []
    for i in range(120):
        ids += grant(big, A if i % 3 else B, 1, near=i % 2)
    seen, after = [], None
    while True:
        page = big.call(A, m.Status(after=after, limit=limit))
        assert len(page["leases"]) <= limit
        seen += [l["id"] for l in page["leases"]]
        after = page["next"]
        if after is None:
            break
    assert seen == ids


def test_a_walk_meets_each_surviving_lease_once_while_leases_come_and_go(big):
    big.hello(A)
    rng = random.Random(7)
    live = grant(big, A, 300)
    gone = set()
    seen, after = [], None
    while True:
        page = big.call(A, m.Status(after=after, limit=25))
        seen += [l["id"] for l in page["leases"]]
        after = page["next"]
        if after is None:
            break
        for lease_id in rng.sample([l for l in live if l not in gone], 10):
            release(big, A, lease_id)
            gone.add(lease_id)
        live += grant(big, A, 5)  # granted during the walk: may or may not be seen
    assert len(seen) == len(set(seen))
    survivors = [l for l in live[:300] if l not in gone]
    assert set(survivors) <= set(seen)
    assert not set(seen) - set(live)


def test_freed_entries_make_short_pages_but_never_an_early_end(big):
    big.hello(A)
    ids = grant(big, A, 600)
    for lease_id in ids[:580]:
        release(big, A, lease_id)  # not compacted yet: the index still holds them
    page = big.call(A, m.Status(limit=5))
    assert page["leases"] == [] and page["next"] is not None  # 20 entries read, all freed
    assert walk(big) == ids[580:]
    big.arb.maintain()  # compacts: the next walk reads no freed entries
    page = big.call(A, m.Status(limit=5))
    assert [l["id"] for l in page["leases"]] == ids[580:585]


def test_filters_by_tenant_device_and_both(big):
    big.hello(A, devices=(0, 1))
    big.hello(B, devices=(0, 1))
    by = {}
    for i in range(60):
        conn, near = (A, B)[i % 2], (i // 2) % 2
        lease_id = grant(big, conn, 1, near=near)[0]
        by[lease_id] = (big.arb.tenants.by_conn(conn).id, big.arb.leases.owned(
            lease_id, big.arb.tenants.by_conn(conn).id).device)
    ta, tb = big.arb.tenants.by_conn(A).id, big.arb.tenants.by_conn(B).id
    for tenant in (ta, tb, None):
        for device in (0, 1, None):
            want = [l for l, (t, d) in by.items()
                    if tenant in (None, t) and device in (None, d)]
            filters = {k: v for k, v in (("tenant", tenant), ("device", device)) if v is not None}
            assert walk(big, **filters) == want
            for limit in (1, 4):
                got, after = [], None
                while True:
                    page = big.call(A, m.Status(after=after, limit=limit, **filters))
                    got += [l["id"] for l in page["leases"]]
                    assert all((tenant in (None, l["tenant"])) and (device in (None, l["device"]))
                               for l in page["leases"])
                    after = page["next"]
                    if after is None:
                        break
                assert got == want
    assert walk(big, tenant="t999") == []


def test_an_unknown_device_filter_is_refused(big):
    big.hello(A)
    with pytest.raises(ProtocolError) as info:
        big.call(A, m.Status(device=7))
    assert info.value.code is ErrorCode.NO_SUCH_DEVICE


@pytest.mark.parametrize("args", [{"limit": 0}, {"limit": 1001}, {"after": "x1"},
                                  {"after": ""}, {"tenant": "A"}, {"leases": 1},
                                  {"device": -1}])
def test_bad_status_arguments_are_refused(args):
    frame = msgpack.packb({"v": 1, "id": 1, "op": "status", "args": args})
    with pytest.raises(ProtocolError) as info:
        m.decode_request(frame)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_defaults_are_not_sent_so_old_daemons_understand_new_clients():
    frame = m.encode_request(1, m.Status())
    assert msgpack.unpackb(frame)["args"] == {}
    assert msgpack.unpackb(m.encode_request(1, m.Status(leases=False)))["args"] == \
        {"leases": False}
    assert m.decode_request(frame).args == m.Status()


def test_totals_kept_on_grant_and_free_agree_with_a_scan(big):
    big.hello(A, devices=(0, 1))
    big.hello(B, devices=(1, 0))
    rng = random.Random(3)
    held: dict[bytes, list[str]] = {A: [], B: []}
    for step in range(400):
        conn = rng.choice((A, B))
        if held[conn] and rng.random() < 0.45:
            release(big, conn, held[conn].pop(rng.randrange(len(held[conn]))))
        else:
            size = rng.choice((1, G, 3 * G + 5))
            held[conn].append(big.lease(conn, size, near=rng.choice((0, 1)))["lease"])
        if step % 50 == 0:
            big.arb.maintain()
        leases = list(big.arb.leases)
        s = big.call(A, m.Status(leases=False))
        for t in s["tenants"]:
            mine = [l for l in leases if l.tenant == t["id"]]
            assert t["leases"] == len(mine)
            assert t["leased_bytes"] == sum(l.charged for l in mine)
        for d in s["devices"]:
            assert d["leases"] == sum(l.device == d["id"] for l in leases)
    big.call(B, m.Bye())
    s = big.call(A, m.Status(leases=False))
    assert [t["id"] for t in s["tenants"]] == [big.arb.tenants.by_conn(A).id]
    assert walk(big) == held[A]


# --- through aquad, the client and aquactl --------------------------------


def ctl(daemon, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket, *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out


def test_client_walk_and_aquactl_page_through_every_lease(start_daemon):
    daemon = start_daemon("--host-devices", "2x256MiB")
    with aqua.connect("many", [0, 1], socket=daemon.socket) as c:
        ids = [c._conn.request(aqua_protocol.Lease(nbytes=1, near=i % 2)).lease
               for i in range(1100)]
        assert [l["id"] for l in c.iter_leases()] == ids
        assert [l["id"] for l in c.iter_leases(device=1)] == ids[1::2]
        assert [l["id"] for l in c.iter_leases(tenant=c.id, device=0)] == ids[0::2]
        assert "leases" not in c.status(leases=False)
        assert len(c.status()["leases"]) == m.MAX_STATUS_LEASES

        out = ctl(daemon, "leases", "--all", "--json")
        assert "\n" not in out.stdout.rstrip("\n") and ": " not in out.stdout  # compact
        assert [l["id"] for l in json.loads(out.stdout)] == ids
        out = ctl(daemon, "leases", "--json", "--pretty")
        assert out.stdout.startswith("[\n  {")
        assert [l["id"] for l in json.loads(out.stdout)] == ids[:m.MAX_STATUS_LEASES]
        out = ctl(daemon, "leases", "--device", "1", "--all", "--json")
        assert [l["id"] for l in json.loads(out.stdout)] == ids[1::2]

        table = ctl(daemon, "status").stdout
        assert "1100 lease(s)" in table
        assert sum(lease_id in table for lease_id in ids) == 50
        assert f"... and {1100 - 50} more (aquactl leases --all)" in table
        table = ctl(daemon, "leases", "--device", "0").stdout
        assert f"... and {550 - 50} more" in table
        table = ctl(daemon, "leases", "--all").stdout
        assert sum(lease_id in table for lease_id in ids) == 1100 and "more" not in table

        doc = json.loads(ctl(daemon, "status", "--json").stdout)
        assert [l["id"] for l in doc["leases"]] == ids[:m.MAX_STATUS_LEASES]
        assert doc["next"] is not None


def test_aquactl_filters_belong_to_the_leases_view(start_daemon):
    daemon = start_daemon()
    out = subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket,
                          "status", "--all"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "aquactl leases" in out.stderr
    assert os.path.exists(daemon.socket)
