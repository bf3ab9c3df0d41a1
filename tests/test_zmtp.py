"""The ZMTP state machine and the status time budget, without a daemon; and
the codec against a real libzmq DEALER over a socket pair."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from aquad import zmtp
from aquad.core.budget import TimeBudget


def _peer_greeting(minor: int = 1, mechanism: bytes = b"NULL") -> bytes:
    return (b"\xff" + bytes(8) + b"\x7f" + bytes((3, minor)) + mechanism.ljust(20, b"\x00")
            + b"\x00" + bytes(31))


def _ready(socket_type: bytes, identity: bytes = b"") -> bytes:
    props = b""
    for name, value in ((b"Socket-Type", socket_type), (b"Identity", identity)):
        props += bytes((len(name),)) + name + len(value).to_bytes(4, "big") + value
    body = b"\x05READY" + props
    return bytes((0x04, len(body))) + body


def _handshaken() -> zmtp.Connection:
    conn = zmtp.Connection(max_message=1 << 20)
    assert conn.receive(_peer_greeting() + _ready(b"DEALER", b"\x00kE\x8bg")) == []
    assert conn.state is zmtp.State.READY
    return conn


def test_a_dealer_handshake_then_messages():
    conn = _handshaken()
    assert conn.receive(zmtp.frame(b"one") + zmtp.frame(b"x" * 300)) == [[b"one"], [b"x" * 300]]
    # A frame with MORE set is held until the message's last frame.
    assert conn.receive(b"\x01\x01a") == []
    assert conn.receive(b"\x00\x01b") == [[b"a", b"b"]]


@given(st.lists(st.binary(max_size=600), min_size=1, max_size=8), st.data())
def test_any_split_of_the_stream_gives_the_same_messages(payloads, data):
    stream = _peer_greeting() + _ready(b"DEALER") + b"".join(zmtp.frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    conn = zmtp.Connection(max_message=1 << 20)
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        got += conn.receive(stream[a:b])
    assert got == [[p] for p in payloads]


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_only_ever_raises_zmtp_error(junk):
    conn = zmtp.Connection(max_message=1024)
    try:
        conn.receive(_peer_greeting() + junk)
        conn.receive(junk)
    except zmtp.ZmtpError:
        pass


@pytest.mark.parametrize("stream, why", [
    (b"GET / HTTP/1.1\r\n", "not a ZMTP 3 peer"),
    (_peer_greeting(mechanism=b"CURVE"), "NULL"),
    (_peer_greeting() + _ready(b"PUB"), "socket type"),
    (_peer_greeting() + _ready(b"DEALER") + b"\x02" + (2**40).to_bytes(8, "big"), "exceeds"),
    (_peer_greeting() + zmtp.frame(b"no handshake"), "expected READY"),
])
def test_protocol_violations_are_refused(stream, why):
    with pytest.raises(zmtp.ZmtpError, match=why):
        zmtp.Connection(max_message=1 << 20).receive(stream)


def test_a_message_over_the_limit_across_frames_is_refused():
    conn = zmtp.Connection(max_message=1000)
    conn.receive(_peer_greeting() + _ready(b"DEALER"))
    with pytest.raises(zmtp.ZmtpError, match="exceeds"):
        conn.receive(b"\x03" + (600).to_bytes(8, "big") + bytes(600)
                     + b"\x02" + (600).to_bytes(8, "big") + bytes(600))


def test_ping_is_answered_with_its_context():
    conn = _handshaken()
    ping = b"\x04PING" + b"\x00\x0a" + b"ctx"
    assert conn.receive(bytes((0x04, len(ping))) + ping) == []
    pong = b"\x04PONG" + b"ctx"
    assert bytes(conn.outgoing) == bytes((0x04, len(pong))) + pong


def test_a_real_libzmq_dealer_talks_to_the_codec(tmp_path):
    """Interoperability with the libzmq the tenants use: handshake, short and
    long frames, heartbeats (PING) and an announced routing id."""
    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        sock, _ = listener.accept()
        conn = zmtp.Connection(max_message=1 << 20)
        # The dealer may close while a heartbeat's PONG is on its way: the
        # end of the test, not an error.
        with sock, contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(zmtp.HELLO)
            while data := sock.recv(65536):
                for message in conn.receive(data):
                    sock.sendall(zmtp.frame(b"echo:" + b"".join(message)))
                if conn.outgoing:
                    sock.sendall(bytes(conn.outgoing))
                    conn.outgoing.clear()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.setsockopt(zmq.ROUTING_ID, b"\x00\x6b\x8b\x45\x67")
    dealer.setsockopt(zmq.HEARTBEAT_IVL, 20)
    dealer.connect(f"ipc://{path}")
    try:
        for payload in (b"hi", b"y" * 70_000):
            dealer.send(payload)
            assert dealer.poll(5000)
            assert dealer.recv() == b"echo:" + payload
        threading.Event().wait(0.1)  # a few heartbeats go by
        dealer.send(b"still")
        assert dealer.poll(5000) and dealer.recv() == b"echo:still"
    finally:
        dealer.close()
        ctx.term()
        listener.close()
        server.join(timeout=5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_refuses_past_its_burst_and_refills():
    clock = FakeClock()
    budget = TimeBudget(clock=clock, rate=0.1, burst=0.25, total_rate=1.0)
    assert budget.retry_after(1) == 0
    budget.charge(1, 0.3)  # one expensive status: into debt
    assert budget.retry_after(1) == pytest.approx(0.5)  # 0.05 s of debt at 0.1 s/s
    assert budget.retry_after(2) == 0  # another uid is not held back
    clock.now = 0.5
    assert budget.retry_after(1) == 0


def test_time_budget_caps_all_uids_together():
    clock = FakeClock()
    budget = TimeBudget(clock=clock, rate=1.0, burst=0.25, total_rate=0.25)
    for uid in range(3):
        budget.charge(uid, 0.2)  # 0.6 s against a shared 0.5 s burst
    assert budget.retry_after(99) == pytest.approx(0.4)


def test_time_budget_remembers_a_bounded_number_of_uids():
    clock = FakeClock()
    budget = TimeBudget(clock=clock, max_keys=8)
    for uid in range(100):
        budget.charge(uid, 0.01)
    assert len(budget._buckets) <= 8
