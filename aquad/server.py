"""The trio + ZeroMQ shell around the arbiter.

One task owns the ROUTER socket and does every receive and send on it:
ZeroMQ's FD is edge-triggered and any call on the socket can consume the
edge, so a second task touching the socket would lose wake-ups. That task
drains with NOBLOCK and only waits on the fd when ZMQ_EVENTS shows nothing
pending (waiting first can sleep on a message already queued). Other tasks
(process-death watchers, the heartbeat reaper) never touch the socket: they
queue frames in the outbox and cancel the socket task's wait.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import time
from collections import deque
from collections.abc import Iterator

import trio
import zmq

from aqua.paths import endpoint
from aqua.protocol import ErrorCode, ProtocolError
from aqua.protocol import messages as m

from .busypoll import BusyPoll
from .core.arbiter import Arbiter
from .core.tenants import Peer
from .rundir import SocketLock, StartupError, prepare_directory

log = logging.getLogger("aquad")

# Requests after which the scheduler may have news for other tenants.
_SCHEDULING_OPS = (m.Turn, m.TurnDone, m.TurnYield, m.Bye)
# Plain ints: pyzmq's enum flags cost a microsecond per test on the hot path.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_NOBLOCK, _SNDMORE, _RCVMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.RCVMORE)
# Deferred backend work (unlinks, closes, spare files) runs when we go idle,
# and in a streak of back-to-back requests every MAINTAIN_EVERY of them: done
# after every reply it slows the next request of a tenant on the same core.
MAINTAIN_EVERY = 8
FLOOD = 64  # requests in a row after which other tasks get to run


def _trio_time(monotonic_deadline: float) -> float:
    """The arbiter's clock is time.monotonic(); trio's has its own offset."""
    return trio.current_time() + (monotonic_deadline - time.monotonic())


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    """Background tasks log their bugs instead of taking the daemon down."""
    try:
        yield
    except Exception:
        log.exception("internal error in %s", what)


def parse_peer(address: str | None) -> Peer | None:
    """libzmq reports SO_PEERCRED of an ipc peer as 'host:uid:gid:pid'."""
    if not address:
        return None
    try:
        _, uid, gid, pid = address.rsplit(":", 3)
        return Peer(pid=int(pid), uid=int(uid), gid=int(gid))
    except ValueError:
        return None


class Server:
    def __init__(self, arbiter: Arbiter, socket_path: str, *, socket_group: str = "",
                 heartbeat_check_s: float = 0.5) -> None:
        self.arbiter = arbiter
        self.socket_path = socket_path
        self.socket_group = socket_group
        self.heartbeat_check_s = heartbeat_check_s
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self._lock = SocketLock(socket_path)
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._wake: trio.CancelScope | None = None
        self._watchers: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._peers: dict[str | None, Peer | None] = {}  # Peer-Address -> parsed

    # --- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Lock, bind and set permissions. Synchronous: fails before serving."""
        prepare_directory(self.socket_path)  # refuses one others can write to
        self._lock.acquire()
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)  # a dead predecessor's; we hold the lock
        gid = -1
        if self.socket_group:
            try:
                gid = grp.getgrnam(self.socket_group).gr_gid
            except KeyError:
                self._lock.release()
                raise StartupError(f"no such group {self.socket_group!r}") from None
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # know when a peer is gone
        sock.setsockopt(zmq.MAXMSGSIZE, m.HARD_MAX_FRAME_BYTES)
        # ROUTER_HANDOVER stays off: a second connection claiming a routing id
        # must not take over the first one's tenant.
        old = os.umask(0o117)  # the socket file is born 0660, no window
        try:
            sock.bind(endpoint(self.socket_path))
        except zmq.ZMQError as exc:
            sock.close()
            self._lock.release()
            raise StartupError(f"cannot bind {self.socket_path}: {exc}") from None
        finally:
            os.umask(old)
        try:
            if gid != -1:
                # By path, as bind() made it: safe in the checked directory (rundir.py).
                os.chown(self.socket_path, -1, gid, follow_symlinks=False)
        except OSError as exc:
            sock.close()
            os.unlink(self.socket_path)
            self._lock.release()
            raise StartupError(f"cannot set permissions on {self.socket_path}: "
                               f"{exc.strerror}") from None
        self.sock = sock

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then say goodbye and release everything."""
        assert self.sock is not None, "call open() first"
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._socket_loop)
                nursery.start_soon(self._reaper)
                nursery.start_soon(self._timer)
                task_status.started()
        finally:
            self._close()

    def _close(self) -> None:
        conns = self.arbiter.shutdown()
        sock = self.sock
        if sock is not None:
            farewell = m.encode_event("shutdown", {"reason": "aquad is stopping"})
            for conn in conns:
                self._send(conn, farewell)
            # Bounded linger: long enough for the farewells to leave, never a hang.
            sock.close(linger=250)
            self.sock = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._lock.release()
        log.info("stopped; all leases released")

    # --- the socket task ------------------------------------------------------

    async def _socket_loop(self) -> None:
        sock = self.sock
        fd = sock.getsockopt(zmq.FD)
        events = sock.get
        clock = time.perf_counter
        busy = BusyPoll(lambda: bool(events(_EVENTS) & _POLLIN))
        burst = 0
        while True:
            # Frames other tasks posted go first, in order, every iteration:
            # a stream of requests must not hold back grants or revocations.
            if self._outbox:
                self._flush()
            # ZMQ_EVENTS, not a NOBLOCK receive that fails: an exception per
            # idle transition costs more than the query, on the latency path.
            if events(_EVENTS) & _POLLIN:
                self._receive()
                burst += 1
                if burst % MAINTAIN_EVERY == 0:
                    self.arbiter.maintain()
                if burst % FLOOD == 0:  # under a flood: let other tasks run
                    await trio.lowlevel.checkpoint()
                continue
            if self._outbox:
                continue
            if busy.poll():
                continue
            burst = 0
            self.arbiter.maintain()  # going idle: now the deferred syscalls
            parked = clock()
            with trio.CancelScope() as self._wake:
                await trio.lowlevel.wait_readable(fd)
            self._wake = None
            busy.parked(clock() - parked)

    def _flush(self) -> None:
        while self._outbox:
            self._send(*self._outbox.popleft())

    def post(self, conn: bytes, frame: bytes) -> None:
        """Queue a frame for a connection from any task; wakes the socket task."""
        self._outbox.append((conn, frame))
        if self._wake is not None:
            self._wake.cancel()

    def _send(self, conn: bytes, frame: bytes) -> None:
        try:
            self.sock.send(conn, _SNDMORE | _NOBLOCK)
            self.sock.send(frame, _NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer is gone; EAGAIN: it stopped reading.
            # Either way the daemon must not block or die for it.
            log.debug("dropped a frame for a peer (%s)", exc)

    def _receive(self) -> None:
        """Receive and answer one request (ZMQ_EVENTS said one is pending)."""
        sock = self.sock
        try:
            conn = sock.recv(_NOBLOCK)
        except zmq.Again:
            return
        # ZeroMQ delivers whole messages: every frame is already here. The
        # routing id comes as bytes; the rest as Frames, for their properties
        # (a Frame costs more than copying a few bytes, so only where needed).
        parts = []
        while sock.get(_RCVMORE):
            parts.append(sock.recv(_NOBLOCK, copy=False))
        # The credentials come from the kernel with every message (a routing
        # id can be claimed again by another process once its socket closes).
        address = parts[-1].get("Peer-Address") if parts else None
        peer = self._peers.get(address)
        if peer is None:
            peer = parse_peer(address)
            if len(self._peers) >= 4096:
                self._peers.clear()
            self._peers[address] = peer
        if len(parts) != 1:
            self._send(conn, m.encode_error(ProtocolError(
                ErrorCode.BAD_REQUEST, "a request is exactly one frame")))
        else:
            self._on_message(conn, peer, parts[0].bytes)

    def _on_message(self, conn: bytes, peer: Peer | None, payload: bytes) -> None:
        rid = None
        tenant = None
        try:
            request = m.decode_request(payload)
            rid = request.id
            if peer is None:
                raise ProtocolError(ErrorCode.PERMISSION_DENIED,
                                    "peer credentials unavailable; connect over ipc://")
            if isinstance(request.args, m.Bye):
                tenant = self.arbiter.tenants.by_conn(conn)
            result = self.arbiter.handle(conn, peer, request)
            reply = m.encode_result(request.id, result)
            if isinstance(request.args, m.Hello):
                self._on_registered(conn)
            elif tenant is not None:
                log.info("tenant %s (%s, pid %d) left", tenant.id, tenant.name, peer.pid)
                self._forget_watchers()
            if isinstance(request.args, _SCHEDULING_OPS):
                self._dispatch()
                self._flush()  # the next holder's grant goes out before this reply
        except ProtocolError as exc:
            if exc.request_id is None:
                exc.request_id = rid
            reply = m.encode_error(exc)
        except Exception:  # the daemon survives its own bugs too
            log.exception("internal error handling a request")
            reply = m.encode_error(ProtocolError(
                ErrorCode.INTERNAL, "internal error; see the aquad log", request_id=rid))
        self._send(conn, reply)

    # --- scheduler events and time ------------------------------------------

    def _dispatch(self) -> None:
        """Queue what the arbiter has for tenants; re-arm the timer if needed."""
        for conn, name, data in self.arbiter.take_events():
            if name == "revoked":
                tenant = self.arbiter.tenants.by_conn(conn)
                log.warning("slice %d of tenant %s revoked: %s", data["slice"],
                            tenant.id if tenant else "?", data["reason"])
            self.post(conn, m.encode_event(name, data))
        deadline = self.arbiter.next_deadline()
        scope = self._timer_scope
        if deadline is not None and scope is not None:
            when = _trio_time(deadline)
            if when < scope.deadline:
                # Moving the deadline re-arms the sleeping timer without
                # waking it: no extra task switch on a hand-over.
                scope.deadline = when

    async def _timer(self) -> None:
        """Wake the scheduler when a quantum or a grace period ends."""
        while True:
            deadline = self.arbiter.next_deadline()
            with trio.CancelScope() as self._timer_scope:
                if deadline is not None:
                    self._timer_scope.deadline = _trio_time(deadline)
                await trio.sleep_forever()
            self._timer_scope = None
            with _logged("the scheduler timer"):
                self.arbiter.tick()
                self._dispatch()

    # --- tenant liveness ------------------------------------------------------

    def _on_registered(self, conn: bytes) -> None:
        tenant = self.arbiter.tenants.by_conn(conn)
        log.info("tenant %s (%s) registered: pid %d uid %d devices %s",
                 tenant.id, tenant.name, tenant.peer.pid, tenant.peer.uid,
                 list(tenant.devices))
        # The scope exists before the task starts, so a tenant that leaves at
        # once (hello, bye) cannot leave a watcher behind.
        scope = self._watchers[tenant.id] = trio.CancelScope()
        self._nursery.start_soon(self._watch_process, tenant.id, tenant.peer.pid, scope)

    def _forget_watchers(self) -> None:
        """Stop watching processes of tenants that are no longer registered."""
        for tid, scope in list(self._watchers.items()):
            if self.arbiter.tenants.get(tid) is None:
                scope.cancel()
                del self._watchers[tid]

    def _drop(self, tenant_id: str, why: str) -> None:
        with _logged("dropping a tenant"):
            tenant = self.arbiter.drop_tenant(tenant_id)
            if tenant is not None:
                log.warning("tenant %s (%s, pid %d) %s; its leases and slices are released",
                            tenant.id, tenant.name, tenant.peer.pid, why)
            self._forget_watchers()
            self._dispatch()
            self.arbiter.maintain()  # not on any request's path: unlink now

    async def _watch_process(self, tenant_id: str, pid: int, scope: trio.CancelScope) -> None:
        """A pidfd becomes readable when the process exits: prompt cleanup for a
        crashed tenant. Heartbeats remain the fallback (no pidfd support)."""
        if scope.cancel_called:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._watchers.pop(tenant_id, None)
            self._drop(tenant_id, "exited before it was watched")
            return
        except (OSError, AttributeError) as exc:
            self._watchers.pop(tenant_id, None)
            log.debug("no pidfd for pid %d (%s); relying on heartbeats", pid, exc)
            return
        try:
            with scope:
                await trio.lowlevel.wait_readable(pidfd)
                self._drop(tenant_id, "exited")
        finally:
            self._watchers.pop(tenant_id, None)
            os.close(pidfd)

    async def _reaper(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_check_s)
            with _logged("the heartbeat reaper"):
                expired = self.arbiter.expire()
                for tenant in expired:
                    log.warning("tenant %s (%s, pid %d) missed its heartbeats; its leases "
                                "are released", tenant.id, tenant.name, tenant.peer.pid)
                if expired:
                    self._forget_watchers()
                    self._dispatch()
                    self.arbiter.maintain()  # not on any request's path: unlink now

