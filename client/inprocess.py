"""aqua.Client over an arbiter in this very process: no daemon process, no socket.

    from aqua.inprocess import InProcessDaemon

    with InProcessDaemon(tmpdir, devices=2, capacity=2**30) as daemon:
        client = daemon.connect("my-engine", 0)
        lease = client.lease(4096)

What it is for: fast tests of what the arbiter decides and how the client
reacts (placement, quotas, leases and their memory, turns and preemption,
reclaims and moves), and driving real clients from code that wants no
processes (the simulator's side). The client is the real `aqua.Client` (same
API, same heartbeat thread); every request and reply is encoded and strictly
decoded by the real protocol codec; the decisions are the real
`aquad.core.arbiter.Arbiter`'s, its timers run on a thread here; leases are
real host-backend segments in /dev/shm that the client maps itself.

What it does not cover: the wire and the shell around the arbiter. There is
no socket, so no peer credentials (every connection is this process: its
pid, uid and gid) and no trust checks of the daemon; no ZMTP transport,
connection limits or back-pressure; no `status` time budget; no operators'
feed (`subscribe` is refused); no process-death watch; no daemon restart
(clients do not reconnect). Tests of those run a real daemon
(aqua.testing.PrivateDaemon).

The one module of the tenant library that loads the daemon's core
(tests/test_packaging.py pins that): `import aqua` never imports it.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import zmq

import aqua_protocol as p
from aqua_protocol import messages as m
from aqua_protocol import replies as r
from aqua_protocol.paths import segment_prefix
from aquad.backends.host import HostBackend
from aquad.core.arbiter import Arbiter
from aquad.core.limits import Limits
from aquad.core.tenants import Peer
from aquad.core.timers import Timers

from .client import DEFAULT_TIMEOUT_S, Client, Connection
from .errors import DaemonGone

log = logging.getLogger("aqua")

REAP_S = 0.25  # how often silent tenants are looked for (aquad: 0.5 s)


class _Frames:
    """One connection's end of the in-memory transport, with what of a
    DEALER socket Connection uses: send() runs the request in the daemon
    at once, in the caller's thread; what the daemon sends back queues here
    in order; `fd` is readable while anything is queued (as a DEALER's)."""

    def __init__(self, daemon: InProcessDaemon, conn_id: bytes) -> None:
        self._daemon = daemon
        self.id = conn_id
        self._queue: collections.deque[bytes] = collections.deque()
        self._ready = threading.Condition()
        self.fd, self._signal = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.closed = False

    def send(self, frame: bytes, flags: int = 0) -> None:
        if self.closed:
            raise zmq.Again  # what a DEALER with no peer says: Connection knows it
        self._daemon.serve(self, frame)

    def push(self, frame: bytes) -> None:
        """From the daemon: queue a frame for this connection."""
        with self._ready:
            self._queue.append(frame)
            if len(self._queue) == 1:
                os.write(self._signal, b"!")
            self._ready.notify_all()

    def poll(self, timeout_ms: int = 0, flags: int = zmq.POLLIN) -> int:
        with self._ready:
            if not self._queue and timeout_ms > 0:
                self._ready.wait_for(lambda: self._queue or self.closed, timeout_ms / 1000)
            return zmq.POLLIN if self._queue else 0

    def recv(self) -> bytes:
        with self._ready:
            frame = self._queue.popleft()
            if not self._queue:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.fd, 4096)
            return frame

    def close(self) -> None:
        with self._ready:
            if self.closed:
                return
            self.closed = True
            self._ready.notify_all()
        os.close(self.fd)
        os.close(self._signal)


class _Poller:
    """zmq.Poller's part Connection uses, over one _Frames."""

    def __init__(self, frames: _Frames) -> None:
        self._frames = frames

    def poll(self, timeout_ms: int) -> list[tuple[Any, int]]:
        return [(self._frames, zmq.POLLIN)] if self._frames.poll(timeout_ms) else []


class InProcessConnection(Connection):
    """A Connection (same locking, event handling and codec) whose socket is
    a _Frames of an InProcessDaemon."""

    def __init__(self, daemon: InProcessDaemon, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        # Not Connection.__init__: it checks and connects a socket.
        self._books(daemon.socket, timeout)
        self._daemon = daemon
        self._sock = daemon.attach()  # type: ignore[assignment]
        self._poller = _Poller(self._sock)  # type: ignore[assignment]
        self.fd = self._sock.fd

    def _check_link(self) -> None:
        if self.gone is None and self._sock.closed:
            self.gone = "the in-process daemon closed"
        if self.gone:
            raise DaemonGone(self.gone)

    def close(self) -> None:
        with self._lock:
            if self.gone is None:
                self.gone = "connection closed"
            self._daemon.detach(self._sock)


class InProcessClient(Client):
    """aqua.Client registered with an InProcessDaemon (make one with
    InProcessDaemon.connect)."""

    def __init__(self, daemon: InProcessDaemon, tenant: str, devices: int | Iterable[int], *,
                 weight: float | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._daemon = daemon
        super().__init__(tenant, devices, socket=daemon.socket, weight=weight, timeout=timeout)

    def _open(self, socket: str | None, timeout: float) -> Connection:
        return InProcessConnection(self._daemon, timeout=timeout)


class InProcessDaemon:
    """The arbiter and a host backend of `devices` devices of `capacity`
    bytes, serving InProcessConnections. `directory` stands where aquad's
    socket would be: its path names the segments, as aquad's does (no
    socket is made there)."""

    def __init__(self, directory: str, *, devices: int = 2, capacity: int = 2**30,
                 limits: Limits = Limits()) -> None:
        self.socket = os.path.join(directory, "aquad.sock")
        self.backend = HostBackend(devices, capacity, prefix=segment_prefix(self.socket))
        self.arbiter = Arbiter(self.backend, clock=time.monotonic, limits=limits)
        self.peer = Peer(os.getpid(), os.geteuid(), os.getegid())
        self.closed = False
        self._frames: dict[bytes, _Frames] = {}
        self._ids = itertools.count(1)
        # One lock for the arbiter: callers' threads, heartbeat threads and
        # the timer all come through here. It is never held while waiting
        # on a connection's lock, so it cannot deadlock with them.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a deadline may have moved
        self._timers = Timers(self.arbiter, reap_s=REAP_S)  # what aquad's timer task runs
        self._timer = threading.Thread(target=self._run_timer, name="aqua-inprocess-timer",
                                       daemon=True)
        self._timer.start()

    # --- what tests call -----------------------------------------------------

    def connect(self, tenant: str, device: int | Iterable[int] = 0, *,
                weight: float | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> Client:
        """aqua.connect(), registering with this daemon."""
        return InProcessClient(self, tenant, device, weight=weight, timeout=timeout)

    def request(self, op: p.Op, timeout: float = 5.0) -> Any:
        """One request on a connection of its own (as PrivateDaemon.request)."""
        with contextlib.closing(InProcessConnection(self, timeout=timeout)) as conn:
            return conn.request(op)

    def status(self) -> dict[str, Any]:
        return self.request(p.Status())

    def close(self) -> None:
        """Stop as aquad does: free everything, tell every tenant `shutdown`."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            farewell = m.encode_event(r.Shutdown.event, r.Shutdown("the in-process daemon closed"))
            for conn in self.arbiter.shutdown():
                frames = self._frames.get(conn)
                if frames is not None:
                    frames.push(farewell)
            self._changed.notify_all()
        self._timer.join()

    def __enter__(self) -> InProcessDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the transport's side -------------------------------------------------

    def attach(self) -> _Frames:
        with self._lock:
            conn_id = b"c%d" % next(self._ids)
            frames = self._frames[conn_id] = _Frames(self, conn_id)
            return frames

    def detach(self, frames: _Frames) -> None:
        """A connection closed: as aquad, its tenant (if any) goes at once."""
        with self._lock:
            self._frames.pop(frames.id, None)
            tenant = self.arbiter.tenants.by_conn(frames.id)
            if tenant is not None and not self.closed:
                self.arbiter.drop_tenant(tenant.id, may_live=True)
                self._dispatch()
        frames.close()

    def serve(self, frames: _Frames, payload: bytes) -> None:
        """One request, as the server shell answers it: decode, decide,
        reply; events a handover produced go out before the reply."""
        with self._lock:
            if self.closed:
                raise zmq.Again
            try:
                request = m.decode_request(payload)
                if request.args.shell:
                    raise p.ProtocolError(p.ErrorCode.BAD_REQUEST,
                                          f"the in-process daemon has no {request.op!r}",
                                          request_id=request.id)
                out = self.arbiter.handle(frames.id, self.peer, request)
                reply = m.encode_result(request.id, out.result)
                if out.reschedule:
                    self._dispatch()
            except p.ProtocolError as exc:
                reply = m.encode_error(exc)
            except Exception:  # as aquad: a bug is an `internal` reply, not a crash
                log.exception("internal error handling a request in process")
                reply = m.encode_error(p.ProtocolError(p.ErrorCode.INTERNAL, "internal error"))
            frames.push(reply)
            self._dispatch()
            self.arbiter.maintain()
            self._changed.notify_all()

    def _dispatch(self) -> None:
        for conn, name, data in self.arbiter.take_events():
            frames = self._frames.get(conn)
            if frames is not None:
                frames.push(m.encode_event(name, data))

    def _run_timer(self) -> None:
        """Quantum ends, overdue yields, reclaim deadlines, silent tenants:
        core/timers.py decides, as in aquad's timer task."""
        with self._lock:
            while not self.closed:
                wait = self._timers.next_deadline() - self.arbiter.clock()
                if wait > 0:
                    self._changed.wait(wait)  # or until a request moves a deadline
                if self.closed:
                    return
                expired = self._timers.tick()
                if expired.tenants or expired.orphans:
                    self.arbiter.maintain()
                self._dispatch()
