"""ZMTP 3.x, the ZeroMQ wire protocol, as a pure state machine (server side).

Tenants keep libzmq (a DEALER socket); aquad speaks the wire protocol
itself, the way h11 speaks HTTP/1.1: bytes in, events out, bytes to send,
no I/O. Why not a libzmq ROUTER: a ROUTER keys its connections by routing
ids that peers may choose, and libzmq 4.3.5 aborts the whole process when
an id it generates collides with one a peer claimed (and it asserts on
EMFILE while accepting). Here a connection is whatever the daemon's own
accept() returned; the `Identity` a peer announces is read and ignored, so
no peer-chosen value ever names a connection.

Only what a DEALER talking to aquad needs: the NULL security mechanism,
single- and multi-frame messages, PING/PONG. Spec: ZeroMQ RFC 23 (ZMTP 3.0)
and RFC 37 (ZMTP 3.1).
"""

from __future__ import annotations

from enum import Enum

SIGNATURE_LEN = 10  # 0xFF, 8 bytes of padding, 0x7F
GREETING_LEN = 64
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
# Peer socket types that may talk to aquad's ROUTER side (RFC 28: DEALER).
_PEER_TYPES = frozenset({b"DEALER"})


def _greeting() -> bytes:
    mechanism = b"NULL".ljust(20, b"\x00")
    # Padding 0 and the 0x7F low bit mark a ZMTP 3 peer; version 3.1;
    # as-server 0 (NULL has no server role); 31 bytes of filler.
    return b"\xff" + bytes(8) + b"\x7f" + bytes((3, 1)) + mechanism + b"\x00" + bytes(31)


def frame(payload: bytes, flags: int = 0) -> bytes:
    """One frame, encoded for the wire: by default a single-frame message."""
    n = len(payload)
    if n < 256:
        return bytes((flags, n)) + payload
    return bytes((flags | _LONG,)) + n.to_bytes(8, "big") + payload


def _command(name: bytes, body: bytes = b"") -> bytes:
    return frame(bytes((len(name),)) + name + body, _COMMAND)


def _ready(socket_type: bytes) -> bytes:
    prop = b"Socket-Type"
    return _command(b"READY", bytes((len(prop),)) + prop
                    + len(socket_type).to_bytes(4, "big") + socket_type)


# What the server sends first, all at once: libzmq reads a whole greeting
# followed by the handshake command without waiting for a round trip.
HELLO = _greeting() + _ready(b"ROUTER")


class ZmtpError(Exception):
    """The peer broke the protocol; the connection must be closed."""


class State(Enum):
    GREETING = "greeting"
    HANDSHAKE = "handshake"  # greeting read, the peer's READY not yet
    READY = "ready"


def parse_metadata(body: bytes) -> dict[bytes, bytes]:
    """READY's properties: name (1-byte length), value (4-byte length)."""
    props: dict[bytes, bytes] = {}
    at = 0
    while at < len(body):
        n = body[at]
        name = body[at + 1:at + 1 + n]
        at += 1 + n
        if n == 0 or len(name) != n or at + 4 > len(body):
            raise ZmtpError("malformed READY metadata")
        size = int.from_bytes(body[at:at + 4], "big")
        at += 4
        if at + size > len(body):
            raise ZmtpError("malformed READY metadata")
        props[name.lower()] = body[at:at + size]
        at += size
    return props


class Connection:
    """One peer's protocol state. Feed received bytes to `receive`; it
    returns whole messages (each a list of frames) and leaves bytes to send
    (PONGs) in `outgoing`."""

    __slots__ = ("state", "max_message", "outgoing", "_buf", "_frames", "_size")

    def __init__(self, *, max_message: int) -> None:
        self.state = State.GREETING
        self.max_message = max_message
        self.outgoing = bytearray()
        self._buf = bytearray()
        self._frames: list[bytes] = []  # of a message whose last frame is still to come
        self._size = 0

    def receive(self, data: bytes) -> list[list[bytes]]:
        if self.state is State.READY and not self._buf:
            return self._messages(data)  # the common case: no copy into _buf
        self._buf += data
        if self.state is State.GREETING:
            if not self._greeting():
                return []
        if self.state is State.HANDSHAKE:
            if not self._handshake():
                return []
        data, self._buf = bytes(self._buf), bytearray()
        return self._messages(data)

    def _greeting(self) -> bool:
        buf = self._buf
        # Check the signature as soon as it is here: a peer that is not
        # speaking ZMTP (or speaks ZMTP 1/2) is refused without waiting.
        if len(buf) >= SIGNATURE_LEN and (buf[0] != 0xFF or not buf[9] & 1):
            raise ZmtpError("not a ZMTP 3 peer")
        if len(buf) >= 11 and buf[10] < 3:
            raise ZmtpError(f"ZMTP version {buf[10]} is not supported")
        if len(buf) < GREETING_LEN:
            return False
        if bytes(buf[12:32]).rstrip(b"\x00") != b"NULL":
            raise ZmtpError("only the NULL security mechanism is supported")
        del buf[:GREETING_LEN]
        self.state = State.HANDSHAKE
        return True

    def _handshake(self) -> bool:
        parsed = self._next_frame(self._buf, 0)
        if parsed is None:
            return False
        flags, body, end = parsed
        del self._buf[:end]
        if not flags & _COMMAND:
            raise ZmtpError("expected READY, got a message")
        name, rest = _split_command(body)
        if name == b"ERROR":
            raise ZmtpError("peer sent ERROR during the handshake")
        if name != b"READY":
            raise ZmtpError(f"expected READY, got {name[:16]!r}")
        props = parse_metadata(rest)
        if props.get(b"socket-type") not in _PEER_TYPES:
            raise ZmtpError(f"socket type {props.get(b'socket-type', b'')[:16]!r} "
                            f"cannot talk to aquad")
        # props.get(b"identity") is deliberately never read.
        self.state = State.READY
        return True

    def _next_frame(self, data: bytes | bytearray, at: int) -> tuple[int, bytes, int] | None:
        """(flags, body, end) of the frame at `at`, or None if incomplete."""
        if len(data) - at < 2:
            return None
        flags = data[at]
        if flags & ~(_MORE | _LONG | _COMMAND):
            raise ZmtpError(f"reserved frame flags {flags:#x}")
        if flags & _LONG:
            if len(data) - at < 9:
                return None
            size = int.from_bytes(data[at + 1:at + 9], "big")
            start = at + 9
        else:
            size = data[at + 1]
            start = at + 2
        if size > self.max_message:
            raise ZmtpError(f"frame of {size} bytes exceeds {self.max_message}")
        end = start + size
        if end > len(data):
            return None
        return flags, bytes(data[start:end]), end

    def _messages(self, data: bytes) -> list[list[bytes]]:
        out: list[list[bytes]] = []
        at = 0
        while True:
            parsed = self._next_frame(data, at)
            if parsed is None:
                break
            flags, body, at = parsed
            if flags & _COMMAND:
                self._on_command(body)
                continue
            self._size += len(body)
            if self._size > self.max_message:
                raise ZmtpError(f"message exceeds {self.max_message} bytes")
            self._frames.append(body)
            if not flags & _MORE:
                out.append(self._frames)
                self._frames = []
                self._size = 0
        if at < len(data):
            self._buf += data[at:]
        return out

    def _on_command(self, body: bytes) -> None:
        name, rest = _split_command(body)
        if name == b"PING":
            # RFC 37: 2 bytes of TTL, then a context echoed in the PONG.
            self.outgoing += _command(b"PONG", rest[2:])
        elif name == b"ERROR":
            raise ZmtpError("peer sent ERROR")
        # PONG and commands of later minor versions are ignored (RFC 37).


def _split_command(body: bytes) -> tuple[bytes, bytes]:
    if not body or 1 + body[0] > len(body):
        raise ZmtpError("malformed command")
    n = body[0]
    return body[1:1 + n], body[1 + n:]
