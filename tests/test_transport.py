"""The daemon's transport on real sockets with a fake clock: budgets,
back-pressure and the sweep, driven one pass at a time."""

from __future__ import annotations

import os
import socket

import pytest

from aquad import transport as tr
from aquad import zmtp

GREETING = (b"\xff" + bytes(8) + b"\x7f" + bytes((3, 1)) + b"NULL".ljust(20, b"\x00")
            + bytes(32))
_BODY = b"\x05READY\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
HANDSHAKE = GREETING + bytes((0x04, len(_BODY))) + _BODY


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rig(tmp_path):
    clock = Clock()
    seen: list[tuple[bytes, list[bytes]]] = []
    closed: list[str] = []
    t = tr.Transport(tr.ConnLimits(max_connections=4, max_per_uid=2),
                     on_message=lambda c, frames: seen.append((c.id, frames)),
                     on_closed=lambda c, why: closed.append(why), clock=clock)
    path = str(tmp_path / "s")
    t.listen(path)
    yield t, clock, path, seen, closed
    t.close()
    while _PEERS:
        _PEERS.pop().close()


_PEERS: list[socket.socket] = []  # the test's ends, closed after each test


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    _PEERS.append(s)
    s.connect(path)
    s.settimeout(2)
    return s


def _pump(t: tr.Transport, rounds: int = 5) -> None:
    for _ in range(rounds):
        t.run_once()


def _slow_reader(t: tr.Transport, path: str) -> tuple[socket.socket, tr.Conn]:
    """A handshaken peer with a tiny receive buffer that never reads."""
    s = _connect(path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    _pump(t)
    s.sendall(HANDSHAKE)
    _pump(t)
    return s, next(iter(t.conns.values()))


def test_a_stalled_handshake_is_closed_by_the_sweep(rig):
    t, clock, path, _, closed = rig
    s = _connect(path)
    _pump(t)
    assert s.recv(len(zmtp.HELLO)) == zmtp.HELLO
    clock.now += tr.HANDSHAKE_S + 1
    t.sweep()
    assert s.recv(10) == b""
    assert closed and "handshake" in closed[0]


def test_connections_beyond_the_per_uid_share_are_refused_with_a_reason(rig):
    t, clock, path, seen, _ = rig
    ok = [_connect(path) for _ in range(2)]
    extra = _connect(path)
    _pump(t)
    assert len(t.conns) == 3  # two counted, one on a refusal slot
    extra.recv(len(zmtp.HELLO))
    extra.sendall(HANDSHAKE + zmtp.frame(b"request"))
    _pump(t)
    reply = extra.recv(4096)
    assert b"limit_exceeded" in reply and b"per-user limit" in reply
    assert extra.recv(10) == b""  # and closed
    assert seen == []  # the refused request never reached the daemon
    assert t.count_for_uid(os.getuid()) == 2 and len(ok) == 2


def test_a_peer_that_stops_reading_is_no_longer_read(rig):
    t, clock, path, seen, _ = rig
    s, conn = _slow_reader(t, path)
    big = b"r" * 300_000
    t._on_message = lambda c, frames: t.send(c.id, big)
    for _ in range(20):  # requests keep coming; the replies are never read
        s.sendall(zmtp.frame(b"q"))
        _pump(t, 2)
    assert conn.mask == tr._OUT  # waiting to write, not reading
    assert t.queued_bytes <= tr.MAX_QUEUED
    assert conn.id in t.conns


def test_a_peer_whose_queue_overflows_is_closed(rig):
    t, clock, path, _, closed = rig
    s, conn = _slow_reader(t, path)
    for _ in range(tr.MAX_QUEUED // 100_000 + 20):  # events for a peer that never reads
        t.send(conn.id, b"e" * 100_000)
    assert conn.id not in t.conns and t.queued_bytes == 0
    assert "not reading" in closed[-1]


def test_descriptor_budget_leaves_the_reserve():
    assert tr.descriptor_budget(1024, 1024) == (1024 - tr.FD_RESERVE - 64) // 2
    assert tr.descriptor_budget(1 << 20, 1024) == 1024
    assert tr.descriptor_budget(100, 1024) == 0
