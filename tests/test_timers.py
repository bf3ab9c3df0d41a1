"""The daemon's clock-driven work without sockets or real time.

core/timers.py decides when (an injected clock here); the server's timer
task runs under trio's MockClock (autojump: virtual time jumps to the next
deadline as soon as every task waits), with the arbiter on the same clock, a
real HostBackend in a tmp directory and a Server that never opens its
socket: what the timer posts lands in the server's outbox, decoded here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator

import msgpack
import pytest
import trio

from aqua_protocol import messages as m
from aquad.backends.host import HostBackend
from aquad.core.adoption import JournaledLease
from aquad.core.arbiter import Arbiter, Limits
from aquad.core.quotas import UNLIMITED
from aquad.core.tenants import Peer
from aquad.core.timers import Every, Timers
from aquad.server import Server

from .test_arbiter import fake_clock

G = 64 * 1024
A, B = b"conn-a", b"conn-b"
PEERS = {A: Peer(101, os.getuid(), os.getgid()), B: Peer(102, os.getuid(), os.getgid())}
LIMITS = Limits(quotas=UNLIMITED, heartbeat_timeout_s=2.0, quantum_s=0.1, grace_s=0.3)
REAP_S = 0.5


def _backend(tmp_path) -> HostBackend:
    return HostBackend(2, 16 * G, prefix=f"aqua-{secrets.token_hex(5)}-", granule=G,
                       shm_dir=str(tmp_path))


def _call(arb: Arbiter, conn: bytes, op: m.Op) -> dict:
    return arb.handle(conn, PEERS[conn], m.Request(1, op)).result


# --- the decisions, on an injected clock ---------------------------------------------


def test_every_is_due_once_per_period_counted_from_its_run():
    every = Every(0.5, now=10.0)
    assert not every.due(10.49)
    assert every.due(10.5)
    assert not every.due(10.5)
    assert every.due(11.7)  # late: the next one is a period after this run
    assert every.at == pytest.approx(12.2)


@pytest.fixture
def world(tmp_path) -> Iterator[tuple[Arbiter, Timers, callable]]:
    clock, advance = fake_clock()
    arb = Arbiter(_backend(tmp_path), clock=clock, limits=LIMITS)
    yield arb, Timers(arb, reap_s=REAP_S), advance
    arb.shutdown()


def test_silent_tenants_go_at_the_first_reap_past_their_timeout(world):
    arb, timers, advance = world
    _call(arb, A, m.Hello(tenant="a", devices=[0]))
    _call(arb, B, m.Hello(tenant="b", devices=[1]))
    assert timers.next_deadline() == arb.clock() + REAP_S  # nothing else is due
    for _ in range(4):  # B talks, A does not
        advance(REAP_S)
        _call(arb, B, m.Heartbeat())
        assert timers.tick().tenants == []
    advance(REAP_S)  # A silent for 2.5 s > 2 s
    assert [t.name for t in timers.tick().tenants] == ["a"]
    assert [t.name for t in arb.tenants] == ["b"]


def test_a_tick_before_the_reap_leaves_silent_tenants_alone(world):
    arb, timers, advance = world
    _call(arb, A, m.Hello(tenant="a", devices=[0]))
    _call(arb, A, m.Turn())
    _call(arb, B, m.Hello(tenant="b", devices=[0]))
    _call(arb, B, m.Turn())  # a waiter: A's quantum now ends
    assert timers.next_deadline() == arb.clock() + LIMITS.quantum_s
    advance(10.0)  # both long silent, but the reap is not due before its time
    timers.reap.at = arb.clock() + 1
    assert timers.tick().tenants == []
    assert [name for _, name, _ in arb.take_events()] == ["preempt"]
    advance(1)
    assert len(timers.tick().tenants) == 2


def test_work_due_now_is_done_on_a_clock_that_moves_between_reads(tmp_path):
    """A real clock advances between reads, and a deadline due now may be
    the reading taken inside next_deadline() (a waiter eligible now)."""
    now = [1000.0]

    def clock() -> float:
        now[0] += 1e-6
        return now[0]

    arb = Arbiter(_backend(tmp_path), clock=clock, limits=LIMITS)
    timers = Timers(arb, reap_s=REAP_S)
    try:
        for conn in (A, B):
            _call(arb, conn, m.Hello(tenant=conn.decode(), devices=[0]))
            _call(arb, conn, m.Turn())
        now[0] = timers.next_deadline()  # the timer wakes at A's quantum end
        timers.tick()
        assert [name for _, name, _ in arb.take_events()] == ["preempt"]
    finally:
        arb.shutdown()


def test_orphans_are_freed_at_the_reap_after_their_grace(world, tmp_path):
    arb, timers, advance = world
    peer = PEERS[A]
    segment = arb.backend.create(0, G, peer)
    grant = JournaledLease(lease="l1", segment=segment.handle["name"], nbytes=G, device=0,
                           uid=peer.uid, gid=peer.gid, pid=peer.pid, capability="c",
                           tenant="a")
    assert arb.keep_orphan(grant, segment, grace_s=0.7)
    advance(REAP_S)
    assert timers.tick().orphans == []
    advance(REAP_S)
    assert [o.grant.lease for o in timers.tick().orphans] == ["l1"]
    assert arb.pools[0].used == 0


# --- the server's timer task under MockClock -------------------------------------------


@contextlib.asynccontextmanager
async def serving(tmp_path, limits: Limits = LIMITS) -> AsyncIterator[Server]:
    """A Server on trio's clock whose timer runs; its socket is never opened."""
    arb = Arbiter(_backend(tmp_path), clock=trio.current_time, limits=limits)
    server = Server(arb, str(tmp_path / "never.sock"), heartbeat_check_s=REAP_S)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._timer)
            await trio.sleep(0)  # the timer is armed
            yield server
            nursery.cancel_scope.cancel()
    finally:
        arb.shutdown()
        server.transport.close()


def _request(server: Server, conn: bytes, op: m.Op) -> dict:
    """What the socket task does with a request, minus the socket."""
    out = server.arbiter.handle(conn, PEERS[conn], m.Request(1, op))
    if out.reschedule:
        server._dispatch()
    return out.result


def _posted(server: Server) -> list[tuple[bytes, str]]:
    """Events the timer queued since the last call: (connection, event)."""
    got = [(conn, msgpack.unpackb(frame)["event"]) for conn, frame in server._outbox]
    server._outbox.clear()
    return got


async def test_the_timer_preempts_revokes_and_hands_over_on_time(tmp_path, autojump_clock):
    async with serving(tmp_path) as server:
        t0 = trio.current_time()
        _request(server, A, m.Hello(tenant="a", devices=[0]))
        _request(server, B, m.Hello(tenant="b", devices=[0]))
        assert _request(server, A, m.Turn())["state"] == "granted"
        # The timer sleeps until the reap; B's turn brings A's quantum end
        # closer, and the dispatch after it re-arms the sleeping timer.
        assert _request(server, B, m.Turn())["state"] == "queued"
        await trio.sleep_until(t0 + LIMITS.quantum_s - 0.001)
        assert _posted(server) == []
        await trio.sleep_until(t0 + LIMITS.quantum_s + 0.001)
        assert _posted(server) == [(A, "preempt")]
        # A never yields: revoked at the end of its grace, and B granted then.
        await trio.sleep_until(t0 + LIMITS.quantum_s + LIMITS.grace_s - 0.001)
        assert _posted(server) == []
        await trio.sleep_until(t0 + LIMITS.quantum_s + LIMITS.grace_s + 0.001)
        assert sorted(_posted(server)) == [(A, "revoked"), (B, "grant")]
        assert server.arbiter.scheduler.holder[0] == server.arbiter.tenants.by_conn(B).id
        assert server.arbiter.stats.revocations == 1


async def test_a_lone_holder_is_never_preempted_and_the_timer_sleeps(tmp_path,
                                                                    autojump_clock):
    async with serving(tmp_path) as server:
        ticks = []
        tick = server.timers.tick
        server.timers.tick = lambda: ticks.append(trio.current_time()) or tick()
        t0 = trio.current_time()
        _request(server, A, m.Hello(tenant="a", devices=[0]))
        assert _request(server, A, m.Turn())["state"] == "granted"
        for at in (0.75, 1.75, 2.75, 3.75, 4.75):  # 47 quanta, heartbeating; nobody waits
            await trio.sleep_until(t0 + at)  # (between reaps: tasks due at once run in any order)
            _request(server, A, m.Heartbeat())
        assert _posted(server) == []
        assert server.arbiter.scheduler.holder[0] == server.arbiter.tenants.by_conn(A).id
        # Woken for the reaps alone, not at every quantum's end.
        assert [at - t0 for at in ticks] == pytest.approx([REAP_S * k for k in range(1, 10)])


async def test_a_silent_holder_is_dropped_and_its_slice_handed_on(tmp_path, autojump_clock,
                                                                  caplog):
    caplog.set_level(logging.INFO, logger="aquad")
    # A long grace: the silent holder is dropped, not revoked.
    async with serving(tmp_path, dataclasses.replace(LIMITS, grace_s=30.0)) as server:
        t0 = trio.current_time()
        _request(server, A, m.Hello(tenant="a", devices=[0]))
        segment = tmp_path / _request(server, A, m.Lease(nbytes=G))["handle"]["name"]
        _request(server, A, m.Turn())
        await trio.sleep_until(t0 + 1.0)
        _request(server, B, m.Hello(tenant="b", devices=[0]))
        _request(server, B, m.Turn())
        for at in (1.5, 2.0, 2.4):  # B keeps talking; A has been silent since t0
            await trio.sleep_until(t0 + at)
            _request(server, B, m.Heartbeat())
        _posted(server)  # A's preempt
        # The reap at 2.0 found A silent for exactly 2 s: not yet.
        await trio.sleep_until(t0 + 2.0 + REAP_S - 0.001)
        assert server.arbiter.tenants.by_conn(A) is not None
        await trio.sleep_until(t0 + 2.0 + REAP_S + 0.001)
        assert server.arbiter.tenants.by_conn(A) is None
        assert not segment.exists()  # the timer ran maintain(): unlinked at once
        assert _posted(server) == [(B, "grant")]
        assert server.arbiter.stats.tenant_drops["heartbeat"] == 1
        left = [r.getMessage() for r in caplog.records if "tenant_left" in r.getMessage()]
        assert len(left) == 1 and "reason=heartbeat" in left[0], left


async def test_a_reclaim_is_fenced_at_its_deadline(tmp_path, autojump_clock):
    async with serving(tmp_path) as server:
        arb = server.arbiter
        t0 = trio.current_time()
        _request(server, A, m.Hello(tenant="a", devices=[0]))
        lease = _request(server, A, m.Lease(nbytes=4 * G))
        record = arb.leases.owned(lease["lease"], arb.tenants.by_conn(A).id)
        # The whole device back within 0.25 s: A is told, does not move its
        # lease, and at the deadline the host backend revokes it.
        arb.elastic.reclaim(record.device, 16 * G, 0.25, None)
        server._dispatch()
        assert _posted(server) == [(A, "reclaim")]
        await trio.sleep_until(t0 + 0.25 - 0.001)
        assert _posted(server) == [] and lease["lease"] in arb.leases
        await trio.sleep_until(t0 + 0.25 + 0.001)
        assert _posted(server) == [(A, "fenced")]
        assert lease["lease"] not in arb.leases
        assert arb.pools[record.device].used == 0
