"""The trio shell around the arbiter: aquad's socket, tasks and timers.

One task (the socket task) does every receive and send, on non-blocking
sockets under one epoll set (transport.py), and speaks ZMTP itself
(zmtp.py), so tenants use a plain libzmq DEALER while no peer can choose
how the daemon names its connection. It drains what is ready, flushes the
outbox, and parks on the epoll set only when nothing is pending. Other tasks
(process-death watchers, the timer) never touch a socket: they queue frames
in the outbox and cancel the socket task's wait. When clock-driven work is
due is decided in core/timers.py, on the arbiter's clock.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import trio

from aqua_protocol import ErrorCode, ProtocolError
from aqua_protocol import messages as m
from aqua_protocol import replies as r

from . import logs
from .busypoll import BusyPoll
from .core.arbiter import Arbiter, Outcome
from .core.budget import TimeBudget
from .core.stats import RequestStats
from .core.tenants import Tenant
from .core.timers import Every, Timers
from .feed import Feed
from .notify import Notifier
from .rundir import SocketLock, StartupError, prepare_directory
from .transport import Conn, ConnLimits, Transport

log = logging.getLogger("aquad")

# How often the cuda backend's GPUs are asked how much memory is free, to see
# their own processes grow into aquad's share (the paper's reference: 4 s).
MEMORY_WATCH_S = 0.5
# Deferred backend work (unlinks, closes, spare files) runs when we go idle,
# and in a streak of back-to-back requests every MAINTAIN_EVERY of them: done
# after every reply it slows the next request of a tenant on the same core.
MAINTAIN_EVERY = 8
FLOOD = 64  # passes in a row after which other tasks get to run
SWEEP_S = 0.5  # how often stalled handshakes and idle peers are looked for
# Replies queued for peers that do not read, beyond which `status` (the one
# big reply) is refused until they drain.
STATUS_QUEUE_LIMIT = 32 * 2**20
OBSERVE_S = 1.0  # how often metrics, systemd's STATUS= and its watchdog are fed


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    """Background tasks log their bugs instead of taking the daemon down."""
    try:
        yield
    except Exception:
        log.exception("internal error in %s", what)


class Server:
    def __init__(self, arbiter: Arbiter, socket_path: str, *, socket_group: str = "",
                 heartbeat_check_s: float = 0.5, notifier: Notifier | None = None,
                 exporter: Any = None, tenant_labels: bool = False) -> None:
        self.arbiter = arbiter
        self.socket_path = socket_path
        self.socket_group = socket_group
        self.startup: dict[str, object] = {}  # facts build() adds to the `started` line
        self.timers = Timers(arbiter, reap_s=heartbeat_check_s)
        self.transport = Transport(ConnLimits.for_tenants(arbiter.limits.max_tenants),
                                   on_message=self._on_message, on_closed=self._on_closed)
        self.status_budget = TimeBudget(clock=time.monotonic)
        self._open = False
        self._lock = SocketLock(socket_path)
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._wake: trio.CancelScope | None = None
        self._watchers: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._timer_scope: trio.CancelScope | None = None
        # What operators see: counters, the event feed, systemd, metrics.
        self.started_at = time.time()
        self.requests = RequestStats()
        self.feed = Feed(send=self.transport.send, queued=self._queued, wake=self._kick)
        arbiter.notes = []
        self.notifier = notifier or Notifier({})
        self.exporter = exporter  # aquad.metrics.Exporter, or None
        self.tenant_labels = tenant_labels

    # --- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Lock, bind and set permissions. Synchronous: fails before serving."""
        gid = -1
        if self.socket_group:
            try:
                gid = grp.getgrnam(self.socket_group).gr_gid
            except KeyError:
                raise StartupError(f"no such group {self.socket_group!r}") from None
        prepare_directory(self.socket_path)  # refuses one others can write to
        self._lock.acquire()
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)  # a dead predecessor's; we hold the lock
        old = os.umask(0o117)  # the socket file is born 0660, no window
        what = "bind"
        try:
            self.transport.listen(self.socket_path)
            if gid != -1:
                what = "set permissions on"
                # By path, as bind() made it: safe in the checked directory (rundir.py).
                os.chown(self.socket_path, -1, gid, follow_symlinks=False)
        except OSError as exc:
            self.close_socket()
            raise StartupError(f"cannot {what} {self.socket_path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        self._open = True

    def close_socket(self) -> None:
        """Undo open(): at the stop, or when startup fails after it."""
        self.transport.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._lock.release()
        self._open = False

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then say goodbye and release everything."""
        assert self._open, "call open() first"
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._socket_loop)
                nursery.start_soon(self._timer)
                if hasattr(self.arbiter.backend, "gpu_free"):
                    nursery.start_soon(self._watch_memory)
                nursery.start_soon(self._observe)
                # Before the observer's first STATUS=: systemd hears READY first.
                self.notifier.send("READY=1")
                task_status.started()
        finally:
            self._close()

    def _close(self) -> None:
        conns = self.arbiter.shutdown()
        farewell = m.encode_event(r.Shutdown.event, r.Shutdown("aquad is stopping"))
        for conn in conns:
            # Best effort and never a wait: what does not fit in the peer's
            # socket buffer now is dropped with the connection.
            self.transport.send(conn, farewell)
        self.close_socket()
        logs.event(log, logging.INFO, "stopped", leases="released")

    # --- the socket task ------------------------------------------------------

    async def _socket_loop(self) -> None:
        transport = self.transport
        clock = time.perf_counter
        busy = BusyPoll(transport.pending)
        burst = 0
        sweep = Every(SWEEP_S, self.arbiter.clock())
        while True:
            # Frames other tasks posted go first, in order, every iteration:
            # a stream of requests must not hold back grants or revocations.
            if self._outbox or self.feed.pending:
                self._flush()
            if transport.run_once():
                burst += 1
                if burst % MAINTAIN_EVERY == 0:
                    self.arbiter.maintain()
                if burst % FLOOD == 0:  # under a flood: let other tasks run
                    await trio.lowlevel.checkpoint()
                    self._maybe_sweep(sweep)
                continue
            if self._outbox or self.feed.pending:
                continue
            if busy.poll():
                continue
            burst = 0
            self.arbiter.maintain()  # going idle: now the deferred syscalls
            self._maybe_sweep(sweep)
            parked = clock()
            with trio.CancelScope(deadline=self._trio_time(sweep.at)) as self._wake:
                await trio.lowlevel.wait_readable(transport.fileno())
            self._wake = None
            busy.parked(clock() - parked)

    def _maybe_sweep(self, sweep: Every) -> None:
        if sweep.due(self.arbiter.clock()):
            with _logged("the connection sweep"):
                self.transport.sweep()

    def _flush(self) -> None:
        while self._outbox:
            self.transport.send(*self._outbox.popleft())
        self.feed.flush()  # after the tenants' own events

    def post(self, conn: bytes, frame: bytes) -> None:
        """Queue a frame for a connection from any task; wakes the socket task."""
        self._outbox.append((conn, frame))
        self._kick()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.cancel()

    def _on_message(self, conn: Conn, frames: list[bytes]) -> None:
        if len(frames) != 1:
            self.transport.send(conn.id, m.encode_error(ProtocolError(
                ErrorCode.BAD_REQUEST, "a request is exactly one frame")))
            return
        started = time.perf_counter()
        op = "invalid"
        rid = None
        try:
            request = m.decode_request(frames[0])
            rid, op = request.id, request.op
            if request.args.budgeted:
                reply = self._budgeted(conn, request)
            elif request.args.shell or conn.watching:
                reply = self._subscribe(conn, request)  # the feed is the shell's, not the arbiter's
            else:
                out = self.arbiter.handle(conn.id, conn.peer, request)
                reply = m.encode_result(request.id, out.result)
                self._apply(conn, out)
        except ProtocolError as exc:
            if exc.request_id is None:
                exc.request_id = rid
            reply = m.encode_error(exc)
            self.requests.error(op, exc.code.value)
        except Exception:  # the daemon survives its own bugs too
            log.exception("internal error handling a request")
            reply = m.encode_error(ProtocolError(
                ErrorCode.INTERNAL, "internal error; see the aquad log", request_id=rid))
            self.requests.error(op, ErrorCode.INTERNAL.value)
        self.transport.send(conn.id, reply)
        self.requests.observe(op, time.perf_counter() - started)

    def _apply(self, conn: Conn, out: Outcome) -> None:
        """Act on what a request did, besides answering it."""
        if out.registered is not None:
            conn.tenant = True
            self._on_registered(out.registered)
        if out.gone is not None:
            conn.tenant = False
            self._left(out.gone, "bye", logging.INFO)
        if out.reschedule:
            self._dispatch()
            self._flush()  # the next holder's grant goes out before this reply

    def _budgeted(self, conn: Conn, request: m.Request) -> bytes:
        """A request whose reply is big (`status`) within its budgets: of the
        daemon's time per uid and in all, and of the replies left unread."""
        wait = self.status_budget.retry_after(conn.peer.uid)
        if wait > 0:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{request.op} is rate-limited for uid {conn.peer.uid}: retry in {wait:.2f} s",
                details={"retry_after_s": max(0.001, round(wait, 3))})
        if self.transport.queued_bytes > STATUS_QUEUE_LIMIT:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{self.transport.queued_bytes} bytes of replies are unread by their "
                f"peers; {request.op} is refused until they drain",
                details={"retry_after_s": 0.1})
        started = time.perf_counter()
        try:
            out = self.arbiter.handle(conn.id, conn.peer, request)
            return m.encode_result(request.id, out.result)
        finally:
            self.status_budget.charge(conn.peer.uid, time.perf_counter() - started)

    def _subscribe(self, conn: Conn, request: m.Request) -> bytes:
        """`subscribe`, and what a subscribed connection may send after it
        (status is answered above): nothing that would make it a tenant."""
        if conn.tenant:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                "a tenant's connection cannot subscribe; open another")
        if not request.args.shell:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"a subscribed connection cannot send {request.op!r}")
        result = self.feed.subscribe(conn.id, conn.peer)
        conn.watching = True
        logs.event(log, logging.DEBUG, "subscribed", pid=conn.peer.pid, uid=conn.peer.uid)
        return m.encode_result(request.id, result)

    def _queued(self, conn_id: bytes) -> int:
        conn = self.transport.conns.get(conn_id)
        return len(conn.out) if conn is not None else 0

    def _on_closed(self, conn: Conn, why: str) -> None:
        """A connection went away. A tenant is its connection: one whose
        connection closed (its process closed it or died, or it stopped
        reading) is dropped now rather than at its heartbeat timeout."""
        if conn.watching:
            self.feed.forget(conn.id)
        tenant = self.arbiter.tenants.by_conn(conn.id) if conn.tenant else None
        if tenant is None:
            log.debug("connection of pid %d closed: %s", conn.peer.pid, why)
            return
        self._drop(tenant.id, f"lost its connection ({why})", "connection", may_live=True)

    # --- scheduler events and time ------------------------------------------

    def _trio_time(self, deadline: float) -> float:
        """A deadline on the arbiter's clock (time.monotonic() in aquad) as
        trio's, which has its own offset (or is a MockClock in tests)."""
        return trio.current_time() + (deadline - self.arbiter.clock())

    def _dispatch(self) -> None:
        """Queue what the arbiter has for tenants; re-arm the timer if needed."""
        for conn, name, data in self.arbiter.take_events():
            self.post(conn, m.encode_event(name, data))
        notes = self.arbiter.notes
        if notes:
            for kind, fields in notes:
                level = logging.WARNING if kind == "slice_revoked" else logging.DEBUG
                logs.event(log, level, kind, **fields)
                self.feed.publish(kind, fields)
            notes.clear()
        scope = self._timer_scope
        if scope is not None:
            when = self._trio_time(self.timers.next_deadline())
            if when < scope.deadline:
                # Moving the deadline re-arms the sleeping timer without
                # waking it: no extra task switch on a hand-over.
                scope.deadline = when

    async def _timer(self) -> None:
        """Do the clock's work when due (core/timers.py): quantum and grace
        ends, reclaim deadlines, silent tenants, unclaimed orphans."""
        while True:
            when = self._trio_time(self.timers.next_deadline())
            with trio.CancelScope(deadline=when) as self._timer_scope:
                await trio.sleep_forever()
            self._timer_scope = None
            with _logged("the timer"):
                expired = self.timers.tick()
                if expired.orphans:
                    logs.event(log, logging.WARNING, "orphans_freed",
                               leases=len(expired.orphans),
                               why="a previous aquad's leases nobody reclaimed")
                for tenant in expired.tenants:
                    self._left(tenant, "heartbeat", logging.WARNING, "missed its heartbeats")
                self._dispatch()
                if expired.tenants or expired.orphans:
                    self.arbiter.maintain()  # not on any request's path: unlink now

    async def _watch_memory(self) -> None:
        """Reclaim by itself when a GPU's own processes take memory: NVML's
        free memory below what aquad may still allocate there plus the
        headroom. NVML is asked in a worker thread: it can take a while."""
        backend = self.arbiter.backend
        while True:
            await trio.sleep(MEMORY_WATCH_S)
            with _logged("the GPU memory watcher"):
                free = await trio.to_thread.run_sync(backend.gpu_free)
                for reply in self.arbiter.watch_memory(free, backend.headroom):
                    log.warning("GPU %d: its own processes need memory; reclaiming %d "
                                "bytes (%d lease(s) to move)", reply["device"],
                                reply["taken_bytes"], len(reply["leases"]))
                self._dispatch()

    # --- tenant liveness ------------------------------------------------------

    def _on_registered(self, tenant: Tenant) -> None:
        fields = {"tenant": tenant.id, "name": tenant.name, "pid": tenant.peer.pid,
                  "uid": tenant.peer.uid, "devices": list(tenant.devices),
                  "weight": tenant.weight}
        logs.event(log, logging.INFO, "tenant_joined", **fields)
        self.arbiter.stats.tenant_joins += 1
        self.feed.publish("tenant_joined", fields)
        # The scope exists before the task starts, so a tenant that leaves at
        # once (hello, bye) cannot leave a watcher behind.
        scope = self._watchers[tenant.id] = trio.CancelScope()
        self._nursery.start_soon(self._watch_process, tenant.id, tenant.peer.pid, scope)

    def _left(self, tenant: Any, reason: str, level: int, why: str | None = None) -> None:
        """A tenant is gone (its leases and slices with it): stop watching
        its process; log, count, feed."""
        scope = self._watchers.pop(tenant.id, None)
        if scope is not None:
            scope.cancel()
        fields = {"tenant": tenant.id, "name": tenant.name, "pid": tenant.peer.pid,
                  "reason": reason, "why": why}
        logs.event(log, level, "tenant_left", **fields)
        self.arbiter.stats.tenant_drops[reason] += 1
        self.feed.publish("tenant_left", {k: v for k, v in fields.items() if v is not None})

    def _drop(self, tenant_id: str, why: str, reason: str, *, may_live: bool = False) -> None:
        with _logged("dropping a tenant"):
            tenant = self.arbiter.drop_tenant(tenant_id, may_live=may_live)
            if tenant is not None:
                # A process that exits or closes its socket without `bye` is
                # ordinary (a stopped engine); one gone silent is not.
                self._left(tenant, reason, logging.INFO, why)
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
            self._drop(tenant_id, "exited before it was watched", "exited")
            return
        except (OSError, AttributeError) as exc:
            self._watchers.pop(tenant_id, None)
            log.debug("no pidfd for pid %d (%s); relying on heartbeats", pid, exc)
            return
        try:
            with scope:
                await trio.lowlevel.wait_readable(pidfd)
                self._drop(tenant_id, "exited", "exited")
        finally:
            self._watchers.pop(tenant_id, None)
            os.close(pidfd)

    # --- what operators see ---------------------------------------------------

    async def _observe(self) -> None:
        """Feed systemd and the metrics exporter from the loop itself, so
        that a loop that wedges stops the watchdog pings (and its figures
        age visibly) instead of a thread keeping up appearances."""
        notifier, exporter = self.notifier, self.exporter
        period = OBSERVE_S
        if notifier.watchdog_s is not None:
            period = min(period, notifier.watchdog_s / 3)  # a missed beat is not fatal
        if not notifier.enabled and exporter is None:
            return
        while True:
            with _logged("publishing metrics and status"):
                notifier.ping()
                notifier.status(self.status_line())
                if exporter is not None:
                    from .metrics import take_snapshot

                    exporter.publish(take_snapshot(self, tenant_labels=self.tenant_labels))
            await trio.sleep(period)

    def status_line(self) -> str:
        """systemd's STATUS=: what `systemctl status aquad` shows."""
        arb = self.arbiter
        leased = sum(p.used for p in arb.pools.values())
        held = sum(1 for h in arb.scheduler.holder.values() if h is not None)
        return (f"serving {len(arb.tenants)} tenant(s), {len(arb.leases)} lease(s), "
                f"{leased} bytes leased; {held} device(s) in a slice")
