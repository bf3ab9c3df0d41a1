"""aquactl top and aquactl events against a real daemon and real tenants;
the feed's bounds (subscribers, a reader too slow) performed for real."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading

import pytest
import zmq

import aqua_protocol as p
from aqua.client import Connection
from aqua.errors import AquaError
from aqua_protocol.paths import endpoint
from aquad.feed import LAG_BYTES, MAX_PER_UID

from .conftest import wait_until

LEASER = """
    import aqua
    client = aqua.connect(tenant="lively", device=0)
    lease = client.lease(2 << 20)
    with client.turn():
        print("holding", flush=True)
        input()
"""


def ctl(daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_top_shows_devices_tenants_and_rates(daemon, tenants):
    t = tenants(daemon, LEASER)
    assert t.readline(timeout=60) == "holding"
    out = ctl(daemon, "top", "--count", "2", "--interval", "0.2")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("\n\n")
    for block in (first, second):
        assert block.startswith("# ")
        assert "tenants 1  leases 1" in block
        assert "lively" in block and "holding" in block
        assert "t1 (lively)" in block  # the device's slice holder
    assert "lease/s" not in first  # a rate needs two samples
    assert "lease/s 0.0" in second and "slice/s 0.0" in second


def test_top_json_lines(daemon, tenants):
    t = tenants(daemon, LEASER)
    assert t.readline(timeout=60) == "holding"
    out = ctl(daemon, "top", "--json", "--count", "2", "--interval", "0.2")
    assert out.returncode == 0, out.stderr
    first, second = (json.loads(line) for line in out.stdout.splitlines())
    assert first["rates"] == {}
    assert set(second["rates"]) >= {"lease_grants", "slice_grants", "revocations"}
    assert second["counters"]["lease_grants"] == 1
    assert second["counters"]["slice_grants"] == 1
    assert second["time"] > first["time"]
    assert [t["name"] for t in second["tenants"]] == ["lively"]


class Events:
    """`aquactl events` running, read line by line."""

    def __init__(self, daemon, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket, "events", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._lines: queue.Queue | None = None
        self._reader: threading.Thread | None = None
        line = self.proc.stderr.readline()  # after the reply: subscribed
        assert line.startswith("# subscribed"), line + self.proc.stderr.read()

    def line(self, timeout: float = 20) -> str:
        if self._lines is None:  # a reader thread: readline buffers past what select sees
            self._lines = queue.Queue()
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self._lines.get(timeout=timeout)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self._reader is not None:
            self._reader.join()  # at the end of the output, now the process is gone
        self.proc.stdout.close()
        self.proc.stderr.close()


def test_events_stream_joins_grants_and_drops(daemon, tenants):
    events = Events(daemon)
    try:
        t = tenants(daemon, LEASER)
        assert t.readline(timeout=60) == "holding"
        joined = events.line()
        assert " tenant_joined " in joined and "name=lively" in joined and "devices=0" in joined
        granted = events.line()
        assert " slice_granted " in granted and "tenant=t1" in granted
        t.kill()  # dies holding its slice and lease
        left = events.line()
        assert " tenant_left " in left and "tenant=t1" in left
        assert "reason=connection" in left or "reason=exited" in left
    finally:
        events.close()


def test_events_json_and_count(daemon, tenants):
    events = Events(daemon, "--json", "--count", "2")
    try:
        t = tenants(daemon, LEASER)
        assert t.readline(timeout=60) == "holding"
        out, _ = events.proc.communicate(timeout=30)
        assert events.proc.returncode == 0
        first, second = (json.loads(line) for line in out.splitlines())
        assert first["kind"] == "tenant_joined" and first["name"] == "lively"
        assert second["kind"] == "slice_granted" and second["devices"] == [0]
        assert second["seq"] == first["seq"] + 1
        assert "missed" not in first
    finally:
        events.close()


def test_subscribe_rules(daemon):
    conns = [Connection(daemon.socket) for _ in range(MAX_PER_UID + 1)]
    tenant = Connection(daemon.socket)
    try:
        for conn in conns[:MAX_PER_UID]:
            assert conn.request(p.Subscribe()).lag_bytes == LAG_BYTES
        with pytest.raises(AquaError) as over:
            conns[-1].request(p.Subscribe())
        assert over.value.code == "limit_exceeded"
        with pytest.raises(AquaError) as again:
            conns[0].request(p.Subscribe())
        assert again.value.code == "bad_request"
        # a subscriber is no tenant, but may ask for status
        with pytest.raises(AquaError) as hello:
            conns[0].request(p.Hello(tenant="sneaky", devices=[0]))
        assert hello.value.code == "bad_request"
        assert conns[0].request(p.Status(leases=False))["tenants"] == []
        # and a tenant's connection cannot subscribe
        tenant.request(p.Hello(tenant="plain", devices=[0]))
        with pytest.raises(AquaError) as mixed:
            tenant.request(p.Subscribe())
        assert mixed.value.code == "bad_request"
        # one subscriber gone: its slot is free again
        conns.pop(1).close()
        assert wait_until(lambda: _subscribes(conns[-1]), 10)
    finally:
        for conn in conns + [tenant]:
            conn.close()


def _subscribes(conn: Connection) -> bool:
    try:
        conn.request(p.Subscribe())
        return True
    except AquaError as exc:
        assert exc.code == "limit_exceeded"
        return False


def test_a_subscriber_that_stops_reading_misses_events_and_costs_nothing(daemon):
    """A DEALER that reads nothing, with the smallest buffers: the daemon
    skips its events past LAG_BYTES and counts them, never closes it, and
    serves everyone else meanwhile; once it reads, the next event says how
    many it missed."""
    ctx = zmq.Context()
    slow = ctx.socket(zmq.DEALER)
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt(zmq.RCVBUF, 4096)
    slow.connect(endpoint(daemon.socket))
    slow.send(p.encode_request(1, p.Subscribe()))
    assert p.decode_reply(slow.recv()).ok
    churn = Connection(daemon.socket)
    try:
        # Each hello and bye is an event, some 200 bytes: several times what
        # LAG_BYTES, the kernel's socket buffers and libzmq's hold together.
        rounds = 4000
        for _ in range(rounds):
            churn.request(p.Hello(tenant="churn-with-a-long-name-to-fill-frames", devices=[0]))
            churn.request(p.Bye())
        assert daemon.status()["tenants"] == []  # everyone else is served
        # Now it reads: what was queued arrives, then one more event says
        # how many were skipped.
        churn.request(p.Hello(tenant="last", devices=[0]))
        seqs, missed, gaps = [], 0, []
        while True:
            assert slow.poll(20_000), "the slow subscriber got nothing more"
            event = p.decode_reply(slow.recv())
            assert isinstance(event, p.replies.Feed)
            if seqs and event.seq - seqs[-1] - 1 != event.missed:
                gaps.append((seqs[-1], event.seq, event.missed))
            seqs.append(event.seq)
            missed += event.missed
            if event.name == "last":
                break
        assert missed > 0
        assert not gaps  # each gap in seq is what `missed` says
        assert len(seqs) + missed == seqs[-1] - seqs[0] + 1
    finally:
        churn.close()
        slow.close(linger=0)
        ctx.term()



def test_a_burst_beyond_the_backlog_is_counted_not_kept():
    """Socket-free: events published faster than the socket task fans them
    out wait in a bounded backlog; the oldest are dropped and counted."""
    from aquad.core.tenants import Peer
    from aquad.feed import BACKLOG, Feed

    sent: list[p.replies.Feed] = []
    frames: list[bytes] = []
    feed = Feed(send=lambda conn, frame: frames.append(frame) or sent.append(p.decode_reply(frame))
                or True,
                queued=lambda conn: 0, clock=lambda: 1.0)
    feed.subscribe(b"c1", Peer(pid=1, uid=0, gid=0))
    for i in range(BACKLOG + 10):
        feed.publish("tenant_joined", {"tenant": f"t{i}"})
    assert len(feed.pending) == BACKLOG
    feed.flush()
    assert len(sent) == BACKLOG and not feed.pending
    assert sent[0].missed == 10 and sent[0].seq == 11
    assert b"missed" not in frames[1] and feed.missed == 10
