"""aqua.inprocess: the real client over the real arbiter in this process.

What it must share with a daemon behind a socket: the codec (every result
and event decoded strictly), the arbiter's decisions and events, the
client's event thread; and what a bad daemon does to it must not break it."""

from __future__ import annotations

import contextlib
import threading

import msgspec
import pytest

import aqua
import aqua_protocol as p
from aqua_protocol import replies as r
from aquad.core.arbiter import Outcome

from .conftest import wait_until

MiB = 2**20


def test_every_op_is_answered_in_its_typed_result(inprocess):
    """One of each op a tenant and an operator send: each result is decoded
    strictly into its struct, so the arbiter's maps and the structs agree."""
    with inprocess.connect("all-ops", [0, 1]) as c:
        conn = c._conn
        assert isinstance(conn.request(p.Heartbeat()), r.Empty)
        granted = conn.request(p.Lease(nbytes=MiB, near=0))
        assert isinstance(granted, r.Granted) and isinstance(granted.handle, r.PosixShm)
        assert conn.request(p.LeaseInfo(lease=granted.lease)) == granted
        lent = conn.request(p.Lend(device=0, nbytes=2 * MiB))
        assert isinstance(lent, r.Lent) and lent.lent_bytes == 2 * MiB
        unlent = conn.request(p.Unlend(device=0, nbytes=2 * MiB))
        assert isinstance(unlent, r.ReclaimStarted) and unlent.lent_bytes == 0
        assert isinstance(unlent.report, r.ReclaimReport) and unlent.report.state == "done"
        turn = conn.request(p.Turn())
        assert turn == r.TurnState("granted", [0, 1], turn.slice, turn.quantum_s)
        assert conn.request(p.TurnYield(slice=turn.slice)).granted  # nobody waits
        assert isinstance(conn.request(p.TurnDone()), r.Empty)
        drained = conn.request(p.Drain(device=0, deadline_ms=1000))
        assert isinstance(drained, r.ReclaimStarted)
        assert isinstance(conn.request(p.Undrain(device=0)), r.Undrained)
        assert conn.request(p.Release(lease=granted.lease)) == r.Released(MiB)
        assert isinstance(conn.request(p.Status(leases=False)), dict)
        assert conn.request(p.Bye()) == r.Released(0)
    assert inprocess.status()["tenants"] == []


def test_a_holder_that_is_asked_hands_the_slice_over(start_inprocess):
    daemon = start_inprocess(quantum_ms=10, grace_ms=5000)
    with daemon.connect("first", 0) as a, daemon.connect("second", 0) as b:
        granted = threading.Event()
        with a.turn():
            def wait_for_it() -> None:
                with b.turn():
                    granted.set()

            waiter = threading.Thread(target=wait_for_it)
            waiter.start()
            # The preempt event reaches `a` on its event thread; respond() acts.
            assert wait_until(a.respond, timeout=10)
            assert granted.wait(10)
            waiter.join(10)
            assert not b._turn.active  # b's turn ended inside a's
        assert a._turn.yields == 1 and b._turn.yields == 0


def test_a_reclaim_notice_moves_the_lease_and_keeps_its_bytes(inprocess):
    with inprocess.connect("borrower", 0) as c:
        lease = c.lease(MiB)
        assert lease.device == 1  # not the home device: placement prefers the peer
        lease.buffer()[:5] = b"kept!"
        old = lease.id
        started = inprocess.request(p.Reclaim(device=1, nbytes=64 * MiB, deadline_ms=10_000))
        assert started.state == "pending" and [x.lease for x in started.leases] == [old]
        # The event thread moves it (home device 0 has room) before the deadline.
        assert wait_until(lambda: lease.device == 0, timeout=10)
        assert bytes(lease.buffer()[:5]) == b"kept!" and c.moves == 1 and c.fenced == 0
        lease.release()


def test_garbage_from_the_daemon_does_not_stop_the_event_thread(inprocess):
    with inprocess.connect("robust", 0) as c:
        frames = c._conn._sock
        for junk in (b"\xc1", msgspec.msgpack.encode({"v": 1, "event": "grant", "data": {}}),
                     p.encode_event("preempt", {"slice": "soon"}), b"",
                     p.encode_event("weather", {"rain": True})):
            frames.push(junk)
        assert wait_until(lambda: not frames.poll(0), timeout=10)  # the thread read them all
        assert c._heartbeat.is_alive()
        lease = c.lease(4096)  # and the connection still works
        lease.release()


def test_a_malformed_result_is_a_clear_error(inprocess, monkeypatch):
    with inprocess.connect("strict", 0) as c:
        handle = inprocess.arbiter.handle

        def without_tier(conn, peer, request):
            out = handle(conn, peer, request)
            if isinstance(request.args, p.Lease):
                result = {k: v for k, v in out.result.items() if k != "tier"}
                return Outcome(result, reschedule=out.reschedule)
            return out

        monkeypatch.setattr(inprocess.arbiter, "handle", without_tier)
        with pytest.raises(aqua.AquaError, match="malformed 'lease' result.*`tier`"):
            c.lease(4096)
        monkeypatch.undo()
        assert c.lease(4096).release() is None  # the connection lives on


def test_a_closed_connection_loses_its_tenant_and_a_closed_daemon_says_so(start_inprocess):
    daemon = start_inprocess()
    gone = daemon.connect("vanishing", 0)
    gone.lease(MiB)
    gone._stop.set()
    gone._conn.close()  # as a process whose socket closed: no bye
    assert [t["name"] for t in daemon.status()["tenants"]] == []
    assert daemon.status()["leases"] == []
    stays = daemon.connect("staying", 0)
    with pytest.raises(aqua.BadRequest, match="no 'subscribe'"):
        daemon.request(p.Subscribe())
    daemon.close()
    with pytest.raises(aqua.DaemonGone):  # ShuttingDown: the farewell was queued
        stays.lease(MiB)
    stays.close()
    gone.close()


def test_reports_nobody_waits_for_do_not_pile_up(inprocess):
    """An operator's connection that starts reclaims with request() and
    reads their reports from on_event (as a controller would) keeps only
    the newest REPORTS_KEPT of them, and reclaim() still gets its own."""
    from aqua.client import REPORTS_KEPT
    from aqua.inprocess import InProcessConnection

    with inprocess.connect("borrower", 0) as c, \
            contextlib.closing(InProcessConnection(inprocess)) as conn:
        lease = c.lease(MiB)
        seen: list[r.ReclaimReport] = []
        conn.on_event = lambda ev: seen.append(ev) if isinstance(ev, r.ReclaimReport) else None
        for i in range(REPORTS_KEPT + 16):
            # Drain where the lease is: it must move (a pending reclaim, whose
            # report comes as an event), then give the device back.
            device = lease.device
            started = conn.request(p.Drain(device=device, deadline_ms=10_000))
            assert started.state == "pending"
            assert conn.wait_for(lambda n=i + 1: len(seen) == n, 10)
            assert seen[-1].state == "done" and lease.device == 1 - device
            conn.request(p.Undrain(device=device))
        assert len(conn.reports) == REPORTS_KEPT
        assert list(conn.reports) == [x.reclaim for x in seen[-REPORTS_KEPT:]]
        # A report some reclaim() waits for is never the one dropped.
        oldest, second = list(conn.reports)[:2]
        with conn._lock:
            conn._awaited.add(oldest)
        report = conn.reclaim(p.Drain(device=lease.device, deadline_ms=10_000))
        assert report.state == "done" and report.moved_count == 1
        assert report.reclaim not in conn.reports and len(conn.reports) == REPORTS_KEPT - 1
        assert oldest in conn.reports and second not in conn.reports
        assert conn._awaited == {oldest}  # reclaim() forgot its own id
        lease.release()
