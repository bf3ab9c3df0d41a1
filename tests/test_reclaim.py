"""Elastic memory: reclaim, drain, lend, moves and fences.

First the sans-I/O core (the arbiter over a host backend in a private
directory, a fake clock), then real aquad and tenant processes: borrowers
that move and keep their bytes, a holder that ignores its notice and faults
at its first touch after the deadline, a dead borrower that holds nothing up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aqua_protocol as p
from aqua.client import Connection
from aqua_protocol import ErrorCode, ProtocolError
from aqua_protocol import messages as m
from aquad.backends.host import HostBackend
from aquad.core.arbiter import Arbiter, Limits
from aquad.core.quotas import UNLIMITED
from aquad.core.reclaim import choose, shortfall
from aquad.core.tenants import Peer

MiB = 2**20
ME = Peer(os.getpid(), os.getuid(), os.getgid())
OTHER = Peer(os.getpid(), 4242, 4242)  # not an operator of this daemon


class World:
    def __init__(self, tmp_path) -> None:
        self.now = 100.0
        self.dir = str(tmp_path)
        self.backend = HostBackend(2, 64 * MiB, prefix="aqua-0123456789-", shm_dir=self.dir)
        self.arb = Arbiter(self.backend, clock=lambda: self.now,
                           limits=Limits(quotas=UNLIMITED))

    def call(self, conn: bytes, op: m.Op, peer: Peer = ME) -> dict:
        return self.arb.handle(conn, peer, m.Request(1, op)).result

    def events(self, name: str | None = None) -> list[tuple[bytes, str, dict]]:
        return [e for e in self.arb.take_events() if name is None or e[1] == name]

    def path(self, reply: dict) -> str:
        return os.path.join(self.dir, reply["handle"]["name"])


@pytest.fixture
def w(tmp_path) -> World:
    world = World(tmp_path)
    world.call(b"A", m.Hello(tenant="a", devices=[0]))
    world.call(b"B", m.Hello(tenant="b", devices=[1]))
    return world


def lease_on(w: World, conn: bytes, nbytes: int, device: int) -> dict:
    reply = w.call(conn, m.Lease(nbytes=nbytes, near=1 - device))
    assert reply["device"] == device
    w.now += 1  # grant order is what "least recently used" reads
    return reply


# --- the core ----------------------------------------------------------------------


def test_reclaim_moves_the_coldest_leases_and_closes_the_device_meanwhile(w):
    old, mid, new = (lease_on(w, b"A", 16 * MiB, 1) for _ in range(3))
    reply = w.call(b"B", m.Reclaim(device=1, nbytes=40 * MiB, deadline_ms=1000))
    # 64 - 40 = 24 MiB stay; 48 are leased: the two oldest must go.
    assert reply["state"] == "pending" and reply["over_bytes"] == 24 * MiB
    assert [l["lease"] for l in reply["leases"]] == [old["lease"], mid["lease"]]
    [(conn, _, notice)] = w.events("reclaim")
    assert conn == b"A" and notice["leases"] == [old["lease"], mid["lease"]]
    assert notice["deadline_s"] == 1.0
    # Nothing new lands there while the reclaim runs, even where it fits.
    assert w.call(b"A", m.Lease(nbytes=MiB, near=0))["device"] == 0
    for lease in (old, mid):
        moved = w.call(b"A", m.Move(lease=lease["lease"]))
        assert moved["replaces"] == lease["lease"] and moved["device"] == 0
        assert w.call(b"A", m.Move(lease=lease["lease"]))["lease"] == moved["lease"]
        w.call(b"A", m.Release(lease=lease["lease"]))
    [(conn, _, report)] = w.events("reclaim_done")
    assert conn == b"B" and report["state"] == "done" and report["moved_count"] == 2
    assert {x["to"]["device"] for x in report["moved"]} == {0}
    assert report["fenced"] == [] and report["over_bytes"] == 0
    pool = w.arb.pools[1]
    assert (pool.capacity, pool.used, pool.closed) == (24 * MiB, 16 * MiB, False)
    assert w.arb.next_deadline() is None


def test_deadline_fences_what_did_not_move_and_nobody_else(w):
    deaf = lease_on(w, b"A", 32 * MiB, 1)
    other = lease_on(w, b"B", 8 * MiB, 0)  # another tenant, another device
    w.call(b"B", m.Drain(device=1, deadline_ms=500))
    w.events()
    assert w.arb.next_deadline() == pytest.approx(w.now + 0.5)
    w.now += 0.5
    w.arb.tick()
    path = w.path(deaf)
    assert not os.path.exists(path)  # unlinked at the deadline, not later
    [(conn, _, fenced)] = w.events("fenced")
    assert conn == b"A" and fenced["leases"] == [deaf["lease"]] and fenced["held"] == []
    report = w.arb.reclaims_done[-1]
    assert report["state"] == "fenced" and report["fenced_count"] == 1
    assert w.arb.pools[1].used == 0 and w.arb.pools[1].closed  # drained stays closed
    with pytest.raises(ProtocolError) as exc:
        w.call(b"A", m.Release(lease=deaf["lease"]))
    assert exc.value.code == ErrorCode.NO_SUCH_LEASE
    assert w.call(b"B", m.LeaseInfo(lease=other["lease"]))["device"] == 0
    assert os.path.exists(w.path(other))


def test_a_fenced_segment_is_truncated_before_it_goes(w, monkeypatch):
    lease = lease_on(w, b"A", 4 * MiB, 1)
    path = w.path(lease)
    sizes = []
    real_unlink = os.unlink

    def unlink(p, *a, **kw):
        if p == path:
            sizes.append(os.stat(p).st_size)
        return real_unlink(p, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    w.call(b"B", m.Reclaim(device=1, nbytes=64 * MiB, deadline_ms=10))
    w.now += 1
    w.arb.tick()
    assert sizes == [0]


def test_a_dead_borrower_holds_nothing_up(w):
    lease_on(w, b"A", 32 * MiB, 1)
    w.call(b"B", m.Reclaim(device=1, nbytes=64 * MiB, deadline_ms=60_000))
    w.events()
    w.arb.drop_tenant("t1")
    [(_, _, report)] = w.events("reclaim_done")
    assert report["state"] == "done" and report["released_count"] == 1
    assert w.arb.next_deadline() is None


def test_who_may_reclaim_drain_and_lend(w):
    w.call(b"C", m.Hello(tenant="c", devices=[0]), peer=OTHER)
    before = w.arb.status(leases=False)
    for op in (m.Reclaim(device=1, nbytes=MiB), m.Drain(device=0), m.Undrain(device=0)):
        with pytest.raises(ProtocolError) as exc:
            w.call(b"C", op, peer=OTHER)
        assert exc.value.code == ErrorCode.PERMISSION_DENIED
    with pytest.raises(ProtocolError) as exc:
        w.call(b"X", m.Reclaim(device=0, nbytes=MiB), peer=OTHER)  # unregistered
    assert exc.value.code == ErrorCode.PERMISSION_DENIED
    for op in (m.Lend(device=1, nbytes=MiB), m.Unlend(device=1, nbytes=MiB)):
        with pytest.raises(ProtocolError) as exc:
            w.call(b"C", op, peer=OTHER)
        assert exc.value.code == ErrorCode.BAD_REQUEST  # not its home device
    with pytest.raises(ProtocolError) as exc:
        w.call(b"C", m.Reclaim(device=7, nbytes=MiB), peer=OTHER)
    assert exc.value.code == ErrorCode.NO_SUCH_DEVICE
    assert w.arb.status(leases=False)["devices"] == before["devices"]
    # Its home device is its own to take back.
    assert w.call(b"C", m.Reclaim(device=0, nbytes=MiB), peer=OTHER)["state"] == "done"


def test_one_reclaim_per_device_at_a_time(w):
    lease_on(w, b"A", 32 * MiB, 1)
    first = w.call(b"B", m.Reclaim(device=1, nbytes=48 * MiB))
    with pytest.raises(ProtocolError) as exc:
        w.call(b"B", m.Drain(device=1))
    assert exc.value.code == ErrorCode.BUSY and exc.value.details == {"reclaim": first["reclaim"]}
    assert w.arb.pools[1].capacity == 16 * MiB  # the refused one changed nothing


def test_lend_and_unlend(w):
    got = w.call(b"A", m.Lend(device=0, nbytes=16 * MiB))
    assert got["capacity_bytes"] == 80 * MiB and got["lent_bytes"] == 16 * MiB
    with pytest.raises(ProtocolError) as exc:
        w.call(b"B", m.Unlend(device=1, nbytes=MiB))
    assert exc.value.code == ErrorCode.BAD_REQUEST  # lent nothing there
    for _ in range(4):
        w.call(b"B", m.Lease(nbytes=16 * MiB, near=1))  # fills device 0 (80 MiB)
    assert w.arb.pools[0].free == 16 * MiB
    back = w.call(b"A", m.Unlend(device=0, nbytes=1 << 40, deadline_ms=100))
    assert back["taken_bytes"] == 16 * MiB and back["lent_bytes"] == 0  # what it lent
    assert back["state"] == "done" and w.arb.pools[0].capacity == 64 * MiB


def test_undrain_gives_back_what_the_device_started_with_plus_lends(w):
    w.call(b"A", m.Lend(device=0, nbytes=8 * MiB))
    w.call(b"B", m.Drain(device=0))
    assert w.arb.pools[0].capacity == 0
    # B prefers device 0 (not its home) but it is drained.
    assert w.call(b"B", m.Lease(nbytes=MiB, near=1))["device"] == 1
    assert w.call(b"B", m.Undrain(device=0))["capacity_bytes"] == 72 * MiB
    assert w.call(b"B", m.Lease(nbytes=MiB, near=1))["device"] == 0


def test_move_only_for_a_lease_under_notice_and_out_of_memory_changes_nothing(w):
    lease = lease_on(w, b"A", 48 * MiB, 1)
    with pytest.raises(ProtocolError) as exc:
        w.call(b"A", m.Move(lease=lease["lease"]))
    assert exc.value.code == ErrorCode.BAD_REQUEST
    w.call(b"B", m.Lease(nbytes=32 * MiB, near=1))  # device 0 has 32 MiB left
    w.call(b"B", m.Reclaim(device=1, nbytes=64 * MiB))
    with pytest.raises(ProtocolError) as exc:
        w.call(b"A", m.Move(lease=lease["lease"]))
    assert exc.value.code == ErrorCode.OUT_OF_MEMORY
    assert len(w.arb.leases) == 2
    with pytest.raises(ProtocolError) as exc:
        w.call(b"B", m.Move(lease=lease["lease"]))  # not B's
    assert exc.value.code == ErrorCode.NO_SUCH_LEASE


def test_choose_and_shortfall():
    class L:
        def __init__(self, t, c, fenced=False):
            self.created_at, self.charged, self.fenced = t, c, fenced

    leases = [L(3, 10), L(1, 30), L(1, 20), L(0, 5, fenced=True)]
    assert [(l.created_at, l.charged) for l in choose(leases, 25)] == [(1, 20), (1, 30)]
    assert choose(leases, 0) == []
    assert shortfall(free=10 * MiB, capacity=40 * MiB, used=30 * MiB, headroom=MiB) == MiB
    assert shortfall(free=20 * MiB, capacity=40 * MiB, used=30 * MiB, headroom=MiB) == 0


def test_the_gpu_watcher_reclaims_what_the_gpus_own_processes_took(w):
    lease_on(w, b"A", 32 * MiB, 1)
    # Device 1 may still hand out 32 MiB, keeps 2 MiB headroom, and NVML says
    # 10 MiB are free: 24 MiB went to the GPU's own work.
    started = w.arb.watch_memory({1: 10 * MiB, 0: 200 * MiB}, headroom=2 * MiB)
    assert [(r["device"], r["taken_bytes"], r["state"]) for r in started] == \
        [(1, 24 * MiB, "done")]
    assert w.arb.pools[1].capacity == 40 * MiB
    started = w.arb.watch_memory({1: 0}, headroom=2 * MiB)  # now leases must go
    assert started[0]["state"] == "pending" and started[0]["over_bytes"] == 2 * MiB
    assert w.arb.watch_memory({1: 0}, headroom=2 * MiB) == []  # one at a time


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["reclaim", "drain", "undrain", "lend", "unlend", "move"]),
       st.dictionaries(st.sampled_from(["device", "nbytes", "deadline_ms", "lease", "x"]),
                       st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=70),
                                 st.booleans(), st.none(), st.floats())))
def test_elastic_requests_decode_or_fail_cleanly(op, args):
    import msgpack

    frame = msgpack.packb({"v": 1, "id": 7, "op": op, "args": args})
    try:
        req = m.decode_request(frame)
    except ProtocolError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST and exc.request_id == 7
    else:
        assert req.op == op


def test_random_cycles_lose_no_byte(tmp_path):
    """Reclaims, drains, lends and moves at random, in process, each lease's
    bytes kept in a file the test writes and checks (the segment itself)."""
    import random

    rng = random.Random(7)
    w = World(tmp_path)
    for i, conn in enumerate((b"A", b"B", b"C")):
        w.call(conn, m.Hello(tenant=f"t{i}", devices=[i % 2]))
    held: dict[bytes, dict[str, tuple[str, bytes]]] = {b"A": {}, b"B": {}, b"C": {}}

    def write(conn: bytes, reply: dict) -> None:
        data = rng.randbytes(64)
        with open(w.path(reply), "r+b") as f:
            f.write(data)
        held[conn][reply["lease"]] = (reply["handle"]["name"], data)

    for _ in range(200):
        conn = rng.choice(list(held))
        action = rng.random()
        if action < 0.5:
            try:
                write(conn, w.call(conn, m.Lease(nbytes=rng.randint(1, 8) * MiB)))
            except ProtocolError as exc:
                assert exc.code == ErrorCode.OUT_OF_MEMORY
        elif action < 0.6 and [l for l, (n, _) in held[conn].items() if n]:
            lid = rng.choice([l for l, (n, _) in held[conn].items() if n])
            w.call(conn, m.Release(lease=lid))
            del held[conn][lid]
        elif action < 0.75:
            dev = rng.randrange(2)
            try:
                w.call(b"A", m.Reclaim(device=dev, nbytes=rng.randint(1, 32) * MiB)
                       if rng.random() < 0.7 else m.Drain(device=dev))
            except ProtocolError as exc:
                assert exc.code == ErrorCode.BUSY
        elif action < 0.85:
            w.call(b"A", m.Undrain(device=rng.randrange(2)))
        # Every notice is honoured: move, copy, release.
        for target, _, data in w.events("reclaim"):
            for lid in data["leases"]:
                try:
                    new = w.call(target, m.Move(lease=lid))
                except ProtocolError as exc:
                    assert exc.code == ErrorCode.OUT_OF_MEMORY
                    w.call(target, m.Release(lease=lid))  # into the process
                    name, payload = held[target].pop(lid)
                    held[target][f"local-{lid}"] = ("", payload)
                    continue
                name, payload = held[target].pop(lid)
                with open(os.path.join(w.dir, name), "rb") as f:
                    assert f.read(len(payload)) == payload
                with open(w.path(new), "r+b") as f:
                    f.write(payload)
                held[target][new["lease"]] = (new["handle"]["name"], payload)
                w.call(target, m.Release(lease=lid))
        for leases in held.values():
            for name, payload in leases.values():
                if name:
                    with open(os.path.join(w.dir, name), "rb") as f:
                        assert f.read(len(payload)) == payload
        for pool in w.arb.pools.values():
            assert pool.used <= max(pool.capacity, 0) or pool.closed
    assert not [e for e in w.arb.reclaims_done if e["fenced_count"]]


# --- the cuda backend (fake runtime): GPU memory cannot be revoked ---------------------


def test_cuda_fence_quarantines_until_the_holder_releases(tmp_path):
    from tests.test_cuda import World as CudaWorld

    cw = CudaWorld(tmp_path)
    cw.call(b"A", m.Hello(tenant="a", devices=[0]))
    lease = cw.call(b"A", m.Lease(nbytes=64 * MiB, near=0))
    assert lease["device"] == 1
    live = len(cw.rt.allocs)
    cw.arb.handle(b"root", ME, m.Request(2, m.Drain(device=1, deadline_ms=10)))
    cw.arb.take_events()
    cw.now += 1
    cw.arb.tick()
    [fenced] = [e for e in cw.arb.take_events() if e[1] == "fenced"]
    assert fenced[2]["held"] == [lease["lease"]]
    report = cw.arb.reclaims_done[-1]
    assert report["fenced"][0]["quarantined"] and report["over_bytes"] == 64 * MiB
    cw.arb.maintain()
    assert len(cw.rt.allocs) == live  # still allocated: nobody else gets it
    assert cw.arb.pools[1].used == 64 * MiB
    cw.call(b"A", m.Release(lease=lease["lease"]))  # the holder unmapped: now it goes
    cw.arb.maintain()
    assert len(cw.rt.allocs) == live - 1 and cw.arb.pools[1].used == 0


def test_cuda_watcher_reads_nvml_free_memory(tmp_path):
    from tests.test_cuda import World as CudaWorld

    cw = CudaWorld(tmp_path)
    asked = []
    cw.backend._free_memory = lambda idx: asked.append(list(idx)) or {i: 0 for i in idx}
    assert cw.backend.gpu_free() == {0: 0, 1: 0} and asked == [[0, 1]]
    assert cw.backend.can_lend(0, 2 * MiB, 0) is not None  # no room on the GPU
    started = cw.arb.watch_memory(cw.backend.gpu_free(), cw.backend.headroom)
    assert {r["device"] for r in started} == {0, 1}
    assert all(cw.arb.pools[d].capacity == 0 for d in (0, 1))


# --- real processes ----------------------------------------------------------------

BORROWER = """
    import sys, torch, aqua
    client = aqua.connect(tenant="{name}", device=0)
    g = torch.Generator().manual_seed({seed})
    data = [torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=g) for _ in range(2)]
    saved = [client.offload(t) for t in data]
    pager_t = torch.randint(0, 256, (2 << 20,), dtype=torch.uint8, generator=g)
    expect = pager_t.clone()
    pager = aqua.TensorPager(client, [pager_t])
    pager.page_out()
    print([s.lease.device for s in saved], [e.lease.device for e in pager._entries], flush=True)
    sys.stdin.readline()
    pager.page_in()
    ok = all(torch.equal(s.restore(), t) for s, t in zip(saved, data)) and \\
        torch.equal(pager_t, expect)
    print(ok, client.moves, client.evictions, flush=True)
    pager.close()
    client.close()
"""


def drain(daemon, device: int, deadline_ms: int = 5000) -> dict:
    conn = Connection(daemon.socket)
    done: list[p.replies.ReclaimReport] = []
    conn.on_event = lambda ev: done.append(ev) if isinstance(ev, p.replies.ReclaimReport) else None
    try:
        reply = conn.request(p.Drain(device=device, deadline_ms=deadline_ms))
        if reply.report is not None:
            return msgspec.to_builtins(reply.report)
        assert conn.wait_for(lambda: bool(done), deadline_ms / 1000 + 10)
        return msgspec.to_builtins(done[0])
    finally:
        conn.close()


def test_borrowers_move_and_keep_their_bytes(daemon, tenants):
    borrowers = [tenants(daemon, BORROWER.format(name=f"b{i}", seed=i)) for i in range(2)]
    for b in borrowers:
        assert b.readline() == "[1, 1] [1]"  # the peer device, not home
    report = drain(daemon, 1)
    assert report["state"] == "done" and report["moved_count"] == 6
    assert report["fenced_count"] == 0 and {x["to"]["device"] for x in report["moved"]} == {0}
    for b in borrowers:
        b.send("")
        assert b.readline() == "True 3 0"
        assert b.finish()[0] == 0
    assert all(d["leased_bytes"] == 0 for d in daemon.status()["devices"])


def test_no_room_anywhere_moves_the_bytes_into_the_process(start_daemon, sockdir, tenants):
    config = os.path.join(sockdir, "aquad.toml")
    with open(config, "w") as f:
        f.write('[quota.default]\nbytes = "100%"\n')
    daemon = start_daemon("--config", config)
    b = tenants(daemon, BORROWER.format(name="b", seed=3))
    assert b.readline() == "[1, 1] [1]"
    filler = tenants(daemon, """
        import sys, aqua
        c = aqua.connect(tenant="filler", device=1)
        l = c.lease(63 << 20, near=1)
        print(l.device, flush=True)
        sys.stdin.readline()
    """)
    assert filler.readline() == "0"  # device 0 is full now
    report = drain(daemon, 1)
    assert report["state"] == "done" and report["released_count"] == 3
    b.send("")
    assert b.readline() == "True 0 3"
    filler.send("")


DEAF = """
    import mmap, os, sys, aqua
    client = aqua.connect(tenant="deaf", device=0)
    client._run_notices = lambda: None     # ignores every reclaim notice
    lease = client.lease(4 << 20, near=0)
    view = lease.buffer()
    view[:4] = b"deaf"
    print(lease.device, flush=True)
    sys.stdin.readline()
    view[0] = 1                            # a late write: faults, corrupts nothing
    print("wrote", flush=True)
"""


def test_a_holder_that_ignores_its_notice_is_fenced_and_faults(daemon, tenants):
    deaf = tenants(daemon, DEAF)
    assert deaf.readline() == "1"
    good = tenants(daemon, BORROWER.format(name="good", seed=5))
    assert good.readline() == "[1, 1] [1]"
    # The deadline the good borrower moves its three leases by, and the deaf
    # one ignores: 1 s (a loaded machine can delay the good one past 300 ms).
    report = drain(daemon, 1, deadline_ms=1000)
    assert report["state"] == "fenced" and report["fenced_count"] == 1
    assert report["fenced"][0]["tenant"] == "t1" and report["moved_count"] == 3
    assert not [f for f in daemon.segments() if f == report["fenced"][0]["lease"]]
    deaf.send("")
    code, out, _ = deaf.finish()
    assert code == -signal.SIGBUS and "wrote" not in out
    good.send("")
    assert good.readline() == "True 3 0"
    assert good.finish()[0] == 0


def test_aquactl_reclaim_drain_undrain(daemon, tenants):
    b = tenants(daemon, BORROWER.format(name="b", seed=9))
    assert b.readline() == "[1, 1] [1]"

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket,
                               *args], capture_output=True, text=True, timeout=30)

    out = ctl("reclaim", "1", "60MiB", "--deadline-ms", "3000", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["state"] == "done" and report["taken_bytes"] == 60 * MiB
    assert report["moved_count"] >= 1
    out = ctl("drain", "1")
    assert out.returncode == 0 and "drain" not in out.stderr
    assert "reclaim" in out.stdout and "moved" in out.stdout
    out = ctl("undrain", "1")
    assert out.returncode == 0 and "capacity 64.0 MiB" in out.stdout
    assert ctl("reclaim", "1").returncode == 1  # no size
    assert ctl("drain", "9").returncode == 1
    b.send("")
    assert b.readline().startswith("True")
