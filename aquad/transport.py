"""aquad's listening socket and its connections: accept, read, write, budget.

Non-blocking sockets under one epoll set, driven by the server's socket task
(see server.py); no task waits on a connection of its own. A connection is
named by an id this module makes (never by anything a peer sends), carries
the credentials the kernel reported at connect time (SO_PEERCRED), and
speaks ZMTP through `zmtp.Connection`.

What any socket user can make the daemon hold or spend is bounded here:
- connections: at most `max_connections` in all and `max_per_uid` per uid.
  One more is let in on one of REFUSAL_SLOTS, answered its first request
  with `limit_exceeded` saying why, and closed (libzmq drops what arrives
  before its own first send, so the answer must wait for a request); with
  no slot free it is closed at once. Descriptor exhaustion (EMFILE) turns
  a connection away instead of failing;
- a peer that does not finish its handshake in HANDSHAKE_S, or sits
  unregistered and silent for IDLE_S, is closed;
- a peer's unread replies: while anything is queued for it, nothing more is
  read from it (so a peer that stops reading stops making the daemon work),
  and a peer whose queue passes MAX_QUEUED (events pile up too) is closed;
- turns: at most BATCH messages of one peer per pass over ready sockets, so
  one peer's pipelined flood cannot hold back another's request.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aqua_protocol import ErrorCode, ProtocolError
from aqua_protocol import messages as m

from . import zmtp
from .core.tenants import Peer
from .logs import line

log = logging.getLogger("aquad")

HANDSHAKE_S = 5.0
IDLE_S = 60.0
MAX_QUEUED = 4 * 2**20  # bytes queued for one peer: beyond one status reply
BATCH = 16
REFUSAL_SLOTS = 32
REFUSAL_S = 2.0  # how long a refused connection may take to send its request
RECV_BYTES = 64 * 1024
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP
# Descriptors the daemon needs besides connections and pidfds: stdio, the
# lock, epoll sets (ours and trio's), the reserve, log files, spare and
# just-granted segment files (host backend: 16 spares, up to 2 x 8 granted
# between maintain() calls), NVML/CUDA device files on GPU hosts; and the
# connections being refused.
FD_RESERVE = 128 + REFUSAL_SLOTS


@dataclass(slots=True)
class Conn:
    id: bytes
    sock: socket.socket
    fd: int
    peer: Peer
    proto: zmtp.Connection
    opened_at: float
    last_active: float
    tenant: bool = False  # registered (set by the server after hello)
    watching: bool = False  # subscribed to the event feed (set by the server)
    refusal: str = ""  # why it is turned away: answered so, then closed
    closing: bool = False  # close once `out` is flushed
    out: bytearray = field(default_factory=bytearray)
    inbox: deque[list[bytes]] = field(default_factory=deque)
    mask: int = _IN


def peer_credentials(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    return Peer(pid=pid, uid=uid, gid=gid)


@dataclass(frozen=True)
class ConnLimits:
    max_connections: int
    max_per_uid: int

    @classmethod
    def for_tenants(cls, max_tenants: int) -> ConnLimits:
        """Room for every tenant plus operators' short-lived connections;
        one uid may take half, so others can always still connect."""
        total = max_tenants + 64
        return cls(total, max(1, total // 2))


def descriptor_budget(nofile: int, max_tenants: int) -> int:
    """The most tenants whose connections and pidfds fit under `nofile`
    descriptors next to FD_RESERVE (each tenant: one connection, one pidfd;
    plus ConnLimits' 64 connections for operators)."""
    return max(0, min(max_tenants, (nofile - FD_RESERVE - 64) // 2))


class Transport:
    def __init__(self, limits: ConnLimits, *,
                 on_message: Callable[[Conn, list[bytes]], None],
                 on_closed: Callable[[Conn, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._on_message = on_message
        self._on_closed = on_closed
        self._clock = clock
        self._ep = select.epoll()
        self._listener: socket.socket | None = None
        self.conns: dict[bytes, Conn] = {}
        self._by_fd: dict[int, Conn] = {}
        self._per_uid: Counter[int] = Counter()  # connections counted against the limit
        self._backlog: deque[Conn] = deque()  # conns with messages read, not handled
        self._ready: list[tuple[int, int]] = []  # what pending() saw, for run_once()
        self._ids = itertools.count(1)
        self.queued_bytes = 0  # in every conn's `out`
        self._reserve: int | None = None
        self._warned_at = -1e9
        self._refusing = 0
        self.turned_away = 0

    # --- lifecycle ------------------------------------------------------------

    def listen(self, path: str) -> None:
        """Bind and listen on `path` (the caller has checked its directory
        and holds the lock); the socket is born with the caller's umask."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(socket.SOMAXCONN)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._listener = sock
        self._ep.register(sock.fileno(), _IN)
        # Kept so that EMFILE never leaves a connection hanging in the backlog:
        # freeing it makes room to accept and close (see _accept).
        self._reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def fileno(self) -> int:
        """Readable when any socket has work (the epoll set)."""
        return self._ep.fileno()

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        self._ep.close()

    # --- the socket task's calls ---------------------------------------------

    def pending(self) -> bool:
        """Anything to do now (cheap enough to poll). What it finds is kept
        for run_once(): the busy-poll's hit costs one epoll_wait, not two."""
        if self._backlog:
            return True
        self._ready = self._ep.poll(0)
        return bool(self._ready)

    def run_once(self) -> int:
        """Handle what is ready without blocking; returns how many events."""
        n = 0
        for _ in range(len(self._backlog)):
            conn = self._backlog.popleft()
            if conn.id in self.conns:
                n += 1
                self._handle_inbox(conn)
        listener = self._listener.fileno() if self._listener is not None else -1
        ready, self._ready = self._ready or self._ep.poll(0), []
        for fd, mask in ready:
            n += 1
            if fd == listener:
                self._accept()
                continue
            conn = self._by_fd.get(fd)
            if conn is None:
                continue
            if mask & _OUT:
                self._write(conn)
            if mask & _IN and not conn.out and not conn.inbox and conn.id in self.conns:
                self._read(conn)
            elif mask & _ERR and not mask & (_IN | _OUT):
                self._close(conn, "connection error")
        return n

    def send(self, conn_id: bytes, frame: bytes) -> bool:
        """Queue one message for a connection; False if it is gone."""
        conn = self.conns.get(conn_id)
        if conn is None:
            return False
        self._enqueue(conn, zmtp.frame(frame))
        return conn.id in self.conns

    def sweep(self) -> None:
        """Close handshakes that stall and unregistered peers gone quiet."""
        now = self._clock()
        for conn in list(self.conns.values()):
            if conn.refusal:
                if now - conn.opened_at > REFUSAL_S:
                    self._close(conn, conn.refusal)
            elif conn.proto.state is not zmtp.State.READY:
                if now - conn.opened_at > HANDSHAKE_S:
                    self._close(conn, f"no handshake within {HANDSHAKE_S:g} s")
            elif not (conn.tenant or conn.watching) and now - conn.last_active > IDLE_S:
                self._close(conn, f"unregistered and idle for {IDLE_S:g} s")

    def count_for_uid(self, uid: int) -> int:
        return self._per_uid[uid]

    # --- accept ---------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):  # a burst of connects must not starve requests
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed_one(exc)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue
                log.error("accept failed: %s", exc)
                return
            self._admit(sock)

    def _shed_one(self, exc: OSError) -> None:
        """Out of descriptors: accept with the reserve's slot and close, so
        the peer is told (EOF) instead of waiting in the backlog forever."""
        self.turned_away += 1
        self._warn_rarely(line("out_of_descriptors", error=exc.strerror,
                               why="turning connections away; raise LimitNOFILE or "
                                   "lower max_tenants"))
        if self._reserve is None:
            return
        os.close(self._reserve)
        self._reserve = None
        with contextlib.suppress(OSError):
            sock, _ = self._listener.accept()
            sock.close()
        with contextlib.suppress(OSError):  # tried again at the next shed
            self._reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def _warn_rarely(self, message: str) -> None:
        """At most one warning per 10 s: an attack must not flood the log."""
        now = self._clock()
        if now - self._warned_at > 10:
            self._warned_at = now
            log.warning("%s", message)

    def _admit(self, sock: socket.socket) -> None:
        try:
            peer = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        sock.setblocking(False)
        why = self._over_budget(peer)
        if why is not None:
            self.turned_away += 1
            self._warn_rarely(line("connections_refused", total=self.turned_away,
                                   uid=peer.uid, pid=peer.pid,
                                   why=f"turning connections away: {why}"))
            if self._refusing >= REFUSAL_SLOTS:
                sock.close()
                return
            self._refusing += 1
        now = self._clock()
        conn = Conn(struct.pack(">Q", next(self._ids)), sock, sock.fileno(), peer,
                    zmtp.Connection(max_message=m.HARD_MAX_FRAME_BYTES), now, now,
                    refusal=why or "")
        self.conns[conn.id] = conn
        self._by_fd[conn.fd] = conn
        if not why:
            self._per_uid[peer.uid] += 1
        self._ep.register(conn.fd, _IN)
        self._enqueue(conn, zmtp.HELLO)

    def _over_budget(self, peer: Peer) -> str | None:
        if len(self.conns) >= self.limits.max_connections:
            return f"aquad is at its limit of {self.limits.max_connections} connections"
        if self._per_uid[peer.uid] >= self.limits.max_per_uid:
            return (f"uid {peer.uid} already has {self.limits.max_per_uid} connections "
                    f"to aquad (the per-user limit)")
        return None

    # --- read -----------------------------------------------------------------

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, f"receive failed: {exc.strerror}")
            return
        if not data:
            self._close(conn, "peer closed the connection")
            return
        conn.last_active = self._clock()
        try:
            conn.inbox.extend(conn.proto.receive(data))
        except zmtp.ZmtpError as exc:
            self._close(conn, f"protocol error: {exc}")
            return
        if conn.proto.outgoing:
            pong, conn.proto.outgoing = bytes(conn.proto.outgoing), bytearray()
            self._enqueue(conn, pong)
        if conn.inbox:
            self._handle_inbox(conn)

    def _handle_inbox(self, conn: Conn) -> None:
        inbox = conn.inbox
        if conn.refusal:
            # No id: the client takes an unnumbered error as the answer to
            # its request in flight.
            inbox.clear()
            self._enqueue(conn, zmtp.frame(m.encode_error(
                ProtocolError(ErrorCode.LIMIT_EXCEEDED, conn.refusal))))
            if conn.out:
                conn.closing = True  # closed by _write once the answer is out
            else:  # (a no-op if the answer's send already closed it)
                self._close(conn, conn.refusal)
            return
        for _ in range(BATCH):
            if not inbox or conn.out or conn.id not in self.conns:
                break
            self._on_message(conn, inbox.popleft())
        if inbox and not conn.out and conn.id in self.conns:
            self._backlog.append(conn)  # the rest after others had a turn

    # --- write ----------------------------------------------------------------

    def _enqueue(self, conn: Conn, data: bytes) -> None:
        if conn.out:
            if len(conn.out) + len(data) > MAX_QUEUED:
                self._close(conn, f"not reading: over {MAX_QUEUED} bytes queued")
                return
            conn.out += data
            self.queued_bytes += len(data)
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._close(conn, f"send failed: {exc.strerror}")
            return
        if sent < len(data):
            conn.out += data[sent:]
            self.queued_bytes += len(data) - sent
            self._want(conn, _OUT)  # and stop reading until the peer catches up

    def _write(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, f"send failed: {exc.strerror}")
            return
        del conn.out[:sent]
        self.queued_bytes -= sent
        if not conn.out:
            if conn.closing:
                self._close(conn, conn.refusal or "closed after its last reply")
                return
            self._want(conn, _IN)
            if conn.inbox:
                self._backlog.append(conn)

    def _want(self, conn: Conn, mask: int) -> None:
        if conn.mask != mask:
            conn.mask = mask
            self._ep.modify(conn.fd, mask)

    # --- close ----------------------------------------------------------------

    def _close(self, conn: Conn, why: str) -> None:
        if self._drop(conn):
            self._on_closed(conn, why)

    def _drop(self, conn: Conn) -> bool:
        if self.conns.pop(conn.id, None) is None:
            return False
        del self._by_fd[conn.fd]
        if conn.refusal:
            self._refusing -= 1
        else:
            self._per_uid[conn.peer.uid] -= 1
            if not self._per_uid[conn.peer.uid]:
                del self._per_uid[conn.peer.uid]  # uids come and go: keep those connected
        self.queued_bytes -= len(conn.out)
        conn.out.clear()
        conn.inbox.clear()
        with contextlib.suppress(OSError):
            self._ep.unregister(conn.fd)
        conn.sock.close()
        return True
