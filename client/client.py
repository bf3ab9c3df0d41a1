"""The tenant's connection to aquad: synchronous, thread-safe, with heartbeats.

Calls run on the caller's thread straight on the DEALER socket, under a lock
the heartbeat thread also takes, so a request costs one round trip and no
thread hand-off. Events the daemon pushes (its goodbye) are read by whichever
thread is reading at the time.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import select
import socket as pysocket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import zmq

import aqua_protocol as p
from aqua_protocol import replies as r
from aqua_protocol.paths import directory_problem, endpoint, resolve_socket, segment_prefix
from aqua_protocol.turns import TurnMachine

from .errors import (
    AquaError,
    BadRequest,
    DaemonGone,
    DaemonNotResponding,
    DaemonNotRunning,
    DaemonUnavailable,
    LimitExceeded,
    NoSuchLease,
    NotRegistered,
    OutOfMemory,
    PermissionDenied,
    ShuttingDown,
    TurnTimeout,
    UntrustedDaemon,
    error_for,
)
from .keep import KeptLeases
from .memory import LocalMapping, ShmMapping, copy_between, open_handle

log = logging.getLogger("aqua")

DEFAULT_TIMEOUT_S = 10.0
# How long a request waits on the reply alone before it also watches the
# connection: a live daemon answers well within it, so the common round trip
# costs exactly one poll, and a dead one is noticed within one such window.
REPLY_FIRST_MS = 50
REPORTS_KEPT = 64  # reclaim reports a connection keeps (Connection.reports)
# Connection events that mean the daemon is gone: its end closed (it died or
# stopped), or a connect to its socket was refused.
_LINK_LOST = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
# Reconnecting after a lost daemon: the first try soon (a restart takes a
# moment), then doubling, never longer apart than the cap.
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 0.25
ENV_DAEMON_UID = "AQUA_DAEMON_UID"
# The event thread looks at the socket at least this often even when its
# descriptor stays quiet (a safety net: events are read as they come).
EVENT_POLL_S = 0.2


def trusted_uids() -> frozenset[int]:
    """Who may run the daemon and own its socket's directory: root, this
    user, and the uid in $AQUA_DAEMON_UID (for an aquad run as a service user)."""
    uids = {0, os.geteuid()}
    extra = os.environ.get(ENV_DAEMON_UID, "").strip()
    if extra:
        if not extra.isdecimal():
            raise UntrustedDaemon(f"${ENV_DAEMON_UID} must be a numeric uid, not {extra!r}")
        uids.add(int(extra))
    return frozenset(uids)


def _who(trusted: frozenset[int]) -> str:
    return "uid " + " or ".join(str(uid) for uid in sorted(trusted))


def _not_running(path: str) -> DaemonNotRunning:
    return DaemonNotRunning(
        f"aquad is not running: no socket at {path} (start aquad, or point "
        f"AQUA_SOCKET / --socket at the right path)")


def check_socket(path: str) -> None:
    """Refuse a daemon this user cannot trust before anything is sent to it,
    and say what is wrong before ZeroMQ can hide it (a connect refused by file
    permissions or a socket with no listener fails silently in ZeroMQ).

    The probe's verdict carries over to the connection ZeroMQ makes next,
    and to its reconnects after a daemon restart, only because the directory
    is checked first: where no one outside the trusted uids can write the
    socket's directory or rename anything above it, no one else can put
    another socket at `path` in between."""
    trusted = trusted_uids()
    _check_directory(path, trusted)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise _not_running(path) from None
    except PermissionError:
        raise PermissionDenied(
            f"no permission to reach {path}: ask for membership in the socket's group") from None
    if stat.S_ISLNK(st.st_mode):
        raise DaemonNotRunning(f"{path} is a symlink; point AQUA_SOCKET / --socket at the "
                               f"socket itself ({os.path.realpath(path)})")
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonNotRunning(f"{path} exists but is not a socket")
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        probe.connect(path)
        _check_daemon(probe, path, trusted)
    except PermissionError:
        raise PermissionDenied(
            f"no permission to connect to {path} (mode {stat.S_IMODE(st.st_mode):o}, "
            f"group {st.st_gid}): ask for membership in the socket's group") from None
    except ConnectionRefusedError:
        raise DaemonNotRunning(
            f"aquad is not running: {path} is a stale socket nobody listens on") from None
    except FileNotFoundError:
        raise _not_running(path) from None  # a starting aquad replaces a stale socket
    finally:
        probe.close()


def _check_directory(path: str, trusted: frozenset[int]) -> None:
    try:
        problem = directory_problem(os.path.dirname(path), trusted)
    except FileNotFoundError:
        raise _not_running(path) from None
    except PermissionError:
        raise PermissionDenied(f"no permission to reach {os.path.dirname(path)}") from None
    if problem:
        raise UntrustedDaemon(
            f"refusing {path}: {problem}. The socket's directory and every one above it "
            f"must be owned by {_who(trusted)} and writable by their owner only (sticky "
            f"ones like /tmp may sit above it), or someone else could be listening there "
            f"in aquad's place. Put the socket in a directory of your own "
            f"($XDG_RUNTIME_DIR, or --socket / AQUA_SOCKET), or fix the owner and mode; for "
            f"an aquad run as a service user, set {ENV_DAEMON_UID} to its uid")


def _check_daemon(probe: pysocket.socket, path: str, trusted: frozenset[int]) -> None:
    """The kernel's word on who listens: a connecting socket's SO_PEERCRED
    holds the credentials the daemon had when it called listen()."""
    ucred = struct.Struct("3i")
    pid, uid, _ = ucred.unpack(probe.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_PEERCRED,
                                                ucred.size))
    if uid not in trusted:
        raise UntrustedDaemon(
            f"refusing the daemon at {path}: it runs as uid {uid} (pid {pid}), and only "
            f"{_who(trusted)} is trusted. If it is the aquad you mean to use, set "
            f"{ENV_DAEMON_UID}={uid}; otherwise someone else is listening in aquad's place")


def wait_for_daemon(path: str, proc: Any = None, timeout: float = 20.0) -> None:
    """Block until an aquad answers connects on `path` (for launchers: the
    demo, benchmarks, tests). `proc`, a Popen of that aquad, makes an early
    exit fail at once instead of at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise DaemonNotRunning(f"aquad exited with code {proc.returncode}")
        try:
            check_socket(path)
            return
        except UntrustedDaemon:
            raise  # waiting will not make it trustworthy
        except AquaError:
            if time.monotonic() > deadline:
                raise DaemonNotRunning(f"aquad did not come up on {path} "
                                       f"within {timeout:g} s") from None
            time.sleep(0.02)


def iter_leases(conn: Connection, *, tenant: str | None = None, device: int | None = None
                ) -> Iterator[dict[str, Any]]:
    """Every lease `status` lists, page by page along its `next` cursor: each
    lease granted before the walk and alive at its end comes exactly once."""
    after = None
    while True:
        page = status_page(conn, p.Status(tenant=tenant, device=device, after=after,
                                          limit=p.MAX_STATUS_LEASES))
        yield from page.get("leases", ())
        after = page.get("next")  # absent from a daemon without paging: one page is all
        if after is None:
            return


def status_page(conn: Connection, op: p.Status, tries: float = 20) -> dict[str, Any]:
    """One `status` request, waiting out the daemon's rate limit on it up to
    `tries` times (a long walk, or `aquactl top` with math.inf, can use up a
    uid's budget of daemon time)."""
    tried = 1
    while True:
        try:
            return conn.request(op)
        except LimitExceeded as exc:
            wait = exc.details.get("retry_after_s")
            if not isinstance(wait, (int, float)) or tried >= tries:
                raise  # some other limit (waiting does not help), or waited enough
            tried += 1
            time.sleep(min(float(wait), 1.0))


class Connection:
    """One DEALER socket speaking protocol v1, safe to share between threads."""

    def __init__(self, socket: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._books(resolve_socket(socket), timeout)
        check_socket(self.socket_path)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        # Watched only while a caller waits, never on the hot path: a daemon
        # that dies closes its end, and every waiter then fails at once.
        self._link = self._sock.get_monitor_socket(_LINK_LOST)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._link, zmq.POLLIN)
        self._sock.connect(endpoint(self.socket_path))
        # Readable when the socket may have something to read: what a thread
        # that does not hold the lock may wait on (select), never the socket.
        # Edge-triggered: whoever reads under the lock reads until empty.
        self.fd: int = self._sock.getsockopt(zmq.FD)

    def _books(self, socket_path: str, timeout: float) -> None:
        """What the methods read besides the socket (aqua.inprocess sets the
        socket itself)."""
        self.socket_path = socket_path
        self.timeout = timeout
        self.segment_prefix = segment_prefix(socket_path)  # of the segments it may map
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.gone: str | None = None  # why the daemon is unusable, once it is
        self.on_event: Callable[[r.Event], None] | None = None
        # Reclaim id: its report, as it comes (for reclaim(); on_event gets it
        # too). The newest REPORTS_KEPT only: a report nobody waits for (a
        # reclaim sent with request(), or one whose wait timed out) would
        # otherwise stay for the connection's life.
        self.reports: collections.OrderedDict[int, r.ReclaimReport] = collections.OrderedDict()
        self._awaited: set[int] = set()  # reclaim ids a reclaim() call waits for
        self.keepalive_s = 1.0
        self._last_sent = time.monotonic()

    def request(self, op: p.Op, *, timeout: float | None = None) -> Any:
        """Send `op` and wait for its result: the struct `op.result` names
        (protocol/replies.py), or the error reply raised as an AquaError."""
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            if self.gone:
                raise DaemonGone(self.gone)
            rid = self._send(op)
            deadline = time.monotonic() + timeout
            while True:
                msg = self._next_message(deadline)
                if msg is None:
                    raise DaemonNotResponding(
                        f"aquad did not answer {op.op!r} within {timeout:g} s "
                        f"({self.socket_path})")
                if isinstance(msg, r.Event):
                    self._on_event(msg)
                    continue
                if msg.id != rid and not (msg.id is None and not msg.ok):
                    continue  # the late answer to a request that timed out
                # (An error without an id answers a request the daemon could not
                # read at all; one request is in flight at a time, so it is ours.)
                self._drain_events()
                if msg.ok:
                    try:
                        return msg.result_of(type(op))
                    except p.ProtocolError as exc:
                        raise AquaError(f"unreadable reply from aquad: {exc.message}") from None
                err = msg.error
                assert err is not None  # decode_reply refuses an error reply without one
                if err.code == p.ErrorCode.NOT_REGISTERED:
                    # libzmq reconnects by itself, and a restarted aquad does
                    # not know us: that is the daemon we lost, not a drop.
                    self._check_link()
                raise error_for(err.code, err.message, err.details)

    def _next_message(self, deadline: float) -> p.Reply | r.Event | None:
        """The next frame from the daemon, None at the deadline; raises
        DaemonGone once the connection is lost. Called with the lock held.
        The first wait is on the reply alone (the hot path: one poll, as
        before); only a reply that is late also watches the connection."""
        remaining = deadline - time.monotonic()
        if remaining > 0 and self._sock.poll(min(REPLY_FIRST_MS, int(remaining * 1000) + 1),
                                              zmq.POLLIN):
            return self._read()
        while True:
            self._check_link()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready = dict(self._poller.poll(int(remaining * 1000) + 1))
            if self._sock in ready:
                return self._read()  # what the daemon sent before it went comes first

    def _check_link(self) -> None:
        """Raise DaemonGone if the monitor reported the connection lost.
        Called with the lock held, by a waiting caller or the heartbeat."""
        if self.gone is None and self._link.poll(0, zmq.POLLIN):
            self._link.recv_multipart()
            self.gone = f"lost the connection to aquad ({self.socket_path})"
        if self.gone:
            raise DaemonGone(self.gone)

    def _on_event(self, event: r.Event) -> None:
        if isinstance(event, r.Shutdown):
            self.gone = "aquad shut down: " + (event.reason or "no reason given")
            raise ShuttingDown(self.gone)
        if isinstance(event, r.ReclaimReport):
            self.reports[event.reclaim] = event  # for reclaim(), and passed on
            if len(self.reports) > REPORTS_KEPT:
                # The oldest that no reclaim() waits for.
                old = next((k for k in self.reports if k not in self._awaited), None)
                if old is not None:
                    del self.reports[old]
        if isinstance(event, r.UnknownEvent):
            log.debug("ignoring event %r, unknown to this client", event.wire_name)
        elif self.on_event is not None:
            self.on_event(event)
        else:
            log.debug("ignoring event %r", event.event)

    def _drain_events(self) -> None:
        """Dispatch what arrived behind a reply, before the lock goes: `fd`
        signals only what comes after the socket was last read empty, so
        leaving a pushed event queued would leave it unseen by a waiter on
        `fd` (a `reclaim` notice, with a deadline)."""
        # A farewell: `gone` says so to the next call; this one has its answer.
        with contextlib.suppress(ShuttingDown):
            self._read_pending()

    def poll_events(self, *, block: bool = False) -> bool:
        """Read pushed events without sending. Skips the check (False) if
        another thread is mid-request and `block` is not set: that thread
        dispatches events too."""
        if not self._lock.acquire(blocking=block):
            return False
        try:
            self._read_pending()
        finally:
            self._lock.release()
        return True

    def reclaim(self, op: p.Op, timeout: float | None = None) -> r.ReclaimReport:
        """Send a drain, reclaim or unlend and wait for its report, up to
        `timeout` (default: the reclaim's deadline and this connection's
        timeout: by the deadline every lease is moved or fenced)."""
        reply: r.ReclaimStarted = self.request(op)
        if reply.report is not None:  # done: nothing had to move
            return reply.report
        rid = reply.reclaim
        limit = timeout if timeout is not None else reply.deadline_s + self.timeout
        got: list[r.ReclaimReport] = []

        def arrived() -> bool:  # called with the lock held: taken before any eviction
            if rid in self.reports:
                got.append(self.reports.pop(rid))
            return bool(got)

        with self._lock:
            self._awaited.add(rid)  # kept whatever else arrives (REPORTS_KEPT)
        try:
            if not self.wait_for(arrived, limit):
                raise DaemonNotResponding(f"reclaim {rid} did not end within {limit:g} s")
        finally:
            with self._lock:
                self._awaited.discard(rid)
        return got[0]

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Read events until predicate() holds (True) or timeout passes (False).
        The lock is dropped between short polls so the heartbeat thread runs,
        and a keepalive goes out if this wait is all the tenant is doing."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if predicate():
                    self._drain_events()
                    return True
                if self.gone:
                    raise DaemonGone(self.gone)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return False
                if now - self._last_sent > self.keepalive_s:
                    self._send(p.Heartbeat())  # its reply is dropped as stale
                window = 0.05 if deadline is None else min(0.05, deadline - now)
                ready = dict(self._poller.poll(max(1, int(window * 1000))))
                if self._sock in ready:
                    self._read_pending()  # a farewell before the loss
                else:
                    self._check_link()
            time.sleep(0)  # let a thread blocked on the lock have it

    def _read_pending(self) -> None:
        """Dispatch every event already queued (with the lock held); a reply
        nobody waits for is the late answer to a timed-out request."""
        while self.gone is None and self._sock.poll(0, zmq.POLLIN):
            msg = self._read()
            if isinstance(msg, r.Event):
                self._on_event(msg)

    def _send(self, op: p.Op) -> int:
        rid = next(self._ids)
        try:
            # Never blocks: a DEALER queues for its peer, and one that queued
            # a thousand frames unread has a daemon that is not coming back.
            self._sock.send(p.encode_request(rid, op), zmq.NOBLOCK)
        except zmq.Again:
            self._no_peer()
        self._last_sent = time.monotonic()
        return rid

    def _no_peer(self) -> None:
        """A send found nobody to take it: raise DaemonGone, saying why with
        what the daemon left before it went (its farewell, if it sent one)."""
        self._read_pending()  # a `shutdown` event raises ShuttingDown
        self._check_link()
        self.gone = f"aquad stopped reading requests ({self.socket_path})"
        raise DaemonGone(self.gone)

    def _read(self) -> p.Reply | r.Event:
        try:
            return p.decode_reply(self._sock.recv())
        except p.ProtocolError as exc:
            raise AquaError(f"unreadable frame from aquad: {exc.message}") from None

    def close(self) -> None:
        with self._lock:
            if self.gone is None:
                self.gone = "connection closed"
            self._sock.disable_monitor()
            self._link.close(linger=0)
            self._sock.close(linger=0)


def request_once(socket: str | None, op: p.Op, *, timeout: float = DEFAULT_TIMEOUT_S
                 ) -> Any:
    """One request on a connection of its own, closed after (launchers,
    benchmarks, tests: whoever asks the daemon something once)."""
    with contextlib.closing(Connection(socket, timeout=timeout)) as conn:
        return conn.request(op)


class Client:
    """A registered tenant. Make one with `aqua.connect()`."""

    def __init__(self, tenant: str, devices: int | Iterable[int], *, socket: str | None = None,
                 weight: float | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 reconnect: bool = False, keep_bytes: int = 0) -> None:
        devices = [devices] if isinstance(devices, int) else list(devices)
        # None: the operator's weight for this tenant; a weight may ask for less.
        self._hello = p.Hello(tenant=tenant, devices=devices,
                              weight=None if weight is None else float(weight))
        self._conn = self._join(self._open(socket, timeout))
        self.reconnect = reconnect
        self.reconnects = 0  # times a lost daemon was replaced by a new one
        self.name = tenant
        self.devices: tuple[int, ...] = tuple(devices)
        self._leases: dict[str, Lease] = {}
        self._leases_lock = threading.Lock()
        # Finished leases kept mapped for reuse (client/keep.py): up to
        # `keep_bytes`; 0 releases every finished lease at once.
        self._kept = KeptLeases(int(keep_bytes))
        # GPU leases whose last alias died after release(), and old ids of
        # moved ones: finalizers append (on whatever thread dropped the last
        # tensor, maybe inside a request: no socket work there), the
        # heartbeat thread sends.
        self._deferred: collections.deque[Lease | str] = collections.deque()
        self._stop = threading.Event()
        self._turn = TurnMachine()
        self._hooks: tuple[Callable[[], object] | None, Callable[[], object] | None] = (None, None)
        # Elastic memory: `reclaim` notices wait here for the event thread,
        # which moves the leases.
        self._notices: collections.deque[r.ReclaimNotice] = collections.deque()
        self.moves = 0  # leases moved to other memory on aquad's notice
        self.evictions = 0  # ... or, with no room anywhere, into this process
        self.fenced = 0  # leases lost to a fence (not moved by the deadline)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._heartbeat = threading.Thread(target=self._beat, name=f"aqua-heartbeat-{self.id}",
                                           daemon=True)
        self._heartbeat.start()

    def _open(self, socket: str | None, timeout: float) -> Connection:
        """A connection to the daemon (aqua.inprocess opens its own kind)."""
        return Connection(socket, timeout=timeout)

    def _join(self, conn: Connection) -> Connection:
        """Register on `conn` (closed if that fails) and take in the welcome."""
        try:
            hello: r.Welcome = conn.request(self._hello)
        except BaseException:
            conn.close()
            raise
        self.id: str = hello.tenant_id
        self.backend: str = hello.backend
        self.daemon_devices: list[r.DeviceInfo] = hello.devices
        conn.on_event = self._on_event
        conn.keepalive_s = hello.heartbeat_interval_s
        return conn

    # --- leases -----------------------------------------------------------------

    def lease(self, nbytes: int, near: int | None = None, *, populate: bool = True,
              reuse: bool = False) -> Lease:
        """Lease `nbytes` of offload memory placed for a tenant computing on
        `near` (default: the first home device), mapped into this process.
        With `reuse`, a lease this client kept (`release(keep=True)`) of
        `nbytes` to twice that serves instead, holding the bytes its last
        use left: for a caller that overwrites them."""
        if reuse:
            kept = self._take_kept(int(nbytes), near)
            if kept is not None:
                return kept
        self._send_deferred()
        try:
            reply = self._conn.request(p.Lease(nbytes=int(nbytes), near=near))
        except (OutOfMemory, LimitExceeded):
            # Kept leases never cost the tenant a lease it needs: give them
            # back and ask once more.
            if not self._release_kept():
                raise
            reply = self._conn.request(p.Lease(nbytes=int(nbytes), near=near))
        try:
            lease = Lease(self, reply, populate=populate, near=near)
        except BaseException:
            # A daemon that is gone took the lease with it; the first error matters.
            with contextlib.suppress(DaemonUnavailable):
                self._conn.request(p.Release(lease=reply.lease))
            raise
        with self._leases_lock:
            self._leases[lease.id] = lease
        return lease

    def _take_kept(self, nbytes: int, near: int | None) -> Lease | None:
        while True:
            lease = self._kept.take(nbytes, near)
            if lease is None or lease.usable:
                return lease
            lease.release()  # fenced, lost or moved into this process meanwhile

    def _release_kept(self) -> int:
        """Release every kept lease; how many there were."""
        kept = self._kept.drain()
        for lease in kept:
            lease.release()
        return len(kept)

    @property
    def kept_bytes(self) -> int:
        """Bytes of finished leases kept for reuse (see `keep_bytes`)."""
        return self._kept.nbytes

    @property
    def leases(self) -> list[Lease]:
        with self._leases_lock:
            return list(self._leases.values())

    def status(self, *, leases: bool = True) -> dict[str, Any]:
        """The status object (docs/status-schema.md): with the first page of
        leases, or with `leases=False` the summary alone."""
        return self._conn.request(p.Status(leases=leases))

    def iter_leases(self, tenant: str | None = None,
                    device: int | None = None) -> Iterator[dict[str, Any]]:
        """Every live lease (of `tenant`, on `device`), oldest first, paged."""
        return iter_leases(self._conn, tenant=tenant, device=device)

    def offload(self, tensor: Any, near: int | None = None) -> Any:
        """Copy a torch tensor into a new lease; see aqua.tensors.offload."""
        from .tensors import offload  # noqa: PLC0415 - keeps torch out of import aqua

        return offload(self, tensor, near=near)

    def _release(self, lease: Lease) -> None:
        """Forget a lease and tell aquad, best effort: a daemon that is gone
        has lost the lease already (or its successor frees it), and the bytes
        were copied out before this is called, so its failure costs nothing."""
        with self._leases_lock:
            self._leases.pop(lease.id, None)
        if not (lease.lost or lease.kind == "local"):
            # A restarted aquad frees it once we reconnect (see `adopt`).
            self._release_id(lease.id, quiet=(DaemonUnavailable,))

    def _release_id(self, lease_id: str, quiet: tuple[type[AquaError], ...] = (
            DaemonUnavailable, NoSuchLease)) -> None:
        """Release a lease id this client no longer maps (a moved lease's old
        memory), best effort like _release."""
        try:
            if self._conn.gone:
                raise DaemonGone(self._conn.gone)
            self._conn.request(p.Release(lease=lease_id))
        except quiet as exc:
            log.debug("release of %s not confirmed: %s", lease_id, exc)

    def _send_deferred(self) -> None:
        while self._deferred:  # on every lease(): no exception when empty
            try:
                lease = self._deferred.popleft()
            except IndexError:
                return  # the other thread took the last one
            try:
                if isinstance(lease, str):
                    self._release_id(lease)
                else:
                    self._release(lease)
            except AquaError as exc:
                log.debug("deferred release of %s failed: %s", lease, exc)

    # --- GPU time slices ------------------------------------------------------

    @contextmanager
    def turn(self, devices: Iterable[int] | None = None,
             timeout: float | None = None) -> Iterator[TurnMachine]:
        """Hold a GPU time slice on `devices` (default: all home devices) for the
        block; blocks until granted. Call respond() at the top of every engine
        iteration inside it. Raises TurnTimeout if not granted within timeout."""
        st = self._turn
        if st.active:
            raise AquaError("already inside a turn")
        request = st.begin(devices)
        try:
            reply = self._conn.request(request)
        except BaseException:
            st.done()
            raise
        try:
            if not st.on_reply(reply) and not self._conn.wait_for(lambda: st.holding, timeout):
                raise TurnTimeout(f"no slice granted within {timeout:g} s")
            yield st
        finally:
            request = st.done()
            if self._conn.gone is None:
                self._conn.request(request)

    def respond(self) -> bool:
        """The engine's per-iteration check (the paper's respond()). Returns
        False at once when nothing is asked. When the daemon wants the GPU
        back: runs the page-out hook, yields, blocks until the next grant, runs
        the page-in hook and returns True."""
        st = self._turn
        if not st.active:
            return False
        if not st.must_yield:
            self._conn.poll_events()
            if not st.must_yield:
                return False
        page_out, page_in = self._hooks
        if page_out is not None:
            page_out()
        request = st.yield_()
        try:
            if request is None or not st.on_reply(self._conn.request(request)):
                self._conn.wait_for(lambda: st.holding, None)
        finally:
            # Also when the daemon is gone: the context comes back from the
            # leases' mappings, which outlive it; only the slice is lost.
            if page_in is not None:
                page_in()
        return True

    def on_preempt(self, page_out: Callable[[], object] | None,
                   page_in: Callable[[], object] | None) -> None:
        """Hooks respond() runs around a yield: page the tenant's context out
        to its leases, and back in once it holds the GPU again. See
        aqua.TensorPager for a ready-made pair."""
        self._hooks = (page_out, page_in)

    def _on_event(self, event: r.Event) -> None:
        """On whichever thread read the event, with the connection's lock
        held: note it, and leave the work (requests, copies) to the event
        thread."""
        if isinstance(event, r.ReclaimNotice):
            self._notices.append(event)
            self._wake()
        elif isinstance(event, r.FencedNotice):
            held = set(event.held)
            for lease_id in event.leases:
                with self._leases_lock:
                    lease = self._leases.get(lease_id)
                if lease is not None:
                    self._kept.remove(lease_id)  # never handed out again
                    # No longer ours to touch (on the host backend, touching
                    # it faults); GPU memory stays held until it is released.
                    lease.fenced = True
                    # Not `held`: nothing left to release at aquad.
                    lease.lost = lease.lost or lease_id not in held
                    self.fenced += 1
                    log.error("aquad fenced lease %s (not moved by its deadline): its "
                              "bytes are gone", lease_id)
        elif self._turn.on_event(event) == "revoked":
            assert isinstance(event, r.Revoked)
            log.warning("aquad revoked slice %s: %s", self._turn.slice, event.reason)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # already woken, or closed
            if self._wake_w >= 0:
                os.write(self._wake_w, b"!")

    def _run_notices(self) -> None:
        """Move every lease a `reclaim` notice names (on the event thread);
        a kept one is released instead: nothing in it is needed."""
        while self._notices:
            notice = self._notices.popleft()
            for lease_id in notice.leases:
                kept = self._kept.remove(lease_id)
                if kept is not None:
                    kept.release()
                    continue
                with self._leases_lock:
                    lease = self._leases.get(lease_id)
                if lease is not None:
                    try:
                        lease.move()
                    except DaemonUnavailable:
                        raise
                    except AquaError as exc:
                        log.warning("could not move lease %s: %s", lease_id, exc)

    def lend(self, nbytes: int, device: int | None = None) -> r.Lent:
        """Offer `nbytes` of spare memory of a home device (default: the first)
        to other tenants. Free it yourself first (torch.cuda.empty_cache())."""
        dev = self.devices[0] if device is None else device
        return self._conn.request(p.Lend(device=dev, nbytes=int(nbytes)))

    def unlend(self, nbytes: int, device: int | None = None, *,
               deadline_ms: int = p.messages.DEFAULT_DEADLINE_MS,
               timeout: float | None = None) -> r.ReclaimReport:
        """Take back up to `nbytes` of what this tenant lent on `device`;
        blocks until borrowers moved away (or were fenced) and returns the
        report (protocol/README.md 4.3)."""
        dev = self.devices[0] if device is None else device
        return self._conn.reclaim(
            p.Unlend(device=dev, nbytes=int(nbytes), deadline_ms=deadline_ms), timeout)

    def reclaim(self, nbytes: int, device: int | None = None, *,
                deadline_ms: int = p.messages.DEFAULT_DEADLINE_MS,
                timeout: float | None = None) -> r.ReclaimReport:
        """Take `nbytes` of a home device's capacity back from aquad (this
        tenant's own work needs it); blocks like unlend()."""
        dev = self.devices[0] if device is None else device
        return self._conn.reclaim(
            p.Reclaim(device=dev, nbytes=int(nbytes), deadline_ms=deadline_ms), timeout)

    # --- lifecycle ----------------------------------------------------------

    def _beat(self) -> None:
        """The event thread: heartbeats, and pushed events read as they come
        (it waits on the socket's descriptor, not the socket), so a
        `reclaim` notice is acted on at once, whatever the tenant's own
        threads are doing."""
        next_beat = time.monotonic() + self._conn.keepalive_s
        polled: Connection | None = None
        while not self._stop.is_set():
            conn = self._conn
            wait = max(0.0, min(next_beat - time.monotonic(), EVENT_POLL_S))
            if conn is not polled:  # a new connection after a reconnect
                # poll(), not select(): a tenant (a vLLM engine, say) may hold more
                # than FD_SETSIZE descriptors, and select() refuses any above it.
                poller, polled = select.poll(), conn
                poller.register(conn.fd, select.POLLIN)
                poller.register(self._wake_r, select.POLLIN)
            try:
                ready = [fd for fd, _ in poller.poll(wait * 1000)]
            except OSError:
                ready = []  # the connection was swapped or closed under us
            if self._stop.is_set():
                return
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            try:
                if not conn.poll_events(block=conn.fd in ready or not ready):
                    time.sleep(0.001)  # a caller reads now: let it
                self._run_notices()
                if time.monotonic() < next_beat:
                    continue
                next_beat = time.monotonic() + self._conn.keepalive_s
                self._send_deferred()
                self._conn.request(p.Heartbeat(), timeout=max(self._conn.keepalive_s * 3, 1.0))
            except DaemonGone:
                if not (self.reconnect and self._rejoin()):
                    return
                next_beat = time.monotonic() + self._conn.keepalive_s
            except NotRegistered:
                # aquad dropped us (the process was frozen past the heartbeat
                # timeout, say): our leases and slice are gone. Say so to every
                # waiting and later call instead of waiting forever.
                self._conn.gone = "aquad dropped this tenant (missed heartbeats)"
                return
            except AquaError as exc:
                log.warning("heartbeat failed: %s", exc)

    # --- after a lost daemon (reconnect=True) ----------------------------------

    def _rejoin(self) -> bool:
        """On the heartbeat thread: connect again, with backoff, until a
        daemon registers us (False if the client is closed first or the
        daemon cannot be trusted), then reclaim leases and the turn."""
        log.warning("lost aquad (%s); reconnecting", self._conn.gone)
        delay = RECONNECT_FIRST_S
        while not self._stop.wait(delay):
            delay = min(delay * 2, RECONNECT_MAX_S)
            try:
                conn = self._join(
                    self._open(self._conn.socket_path, min(self._conn.timeout, 2.0)))
            except UntrustedDaemon as exc:
                log.error("not reconnecting: %s", exc)
                return False
            except AquaError as exc:
                log.debug("reconnect failed: %s", exc)
                continue
            conn.timeout = self._conn.timeout
            # Leases and the turn first, then the swap: whoever waits for
            # `connected` finds the books of the new daemon complete.
            try:
                adopted, lost = self._adopt_leases(conn)
            except DaemonUnavailable as exc:
                conn.close()  # that one went too: nothing is lost, try again
                log.debug("reconnect failed: %s", exc)
                continue
            self._ask_turn_again(conn)
            old, self._conn = self._conn, conn
            self.reconnects += 1
            old.close()
            log.warning("reconnected to aquad as %s: %d lease(s) reclaimed, %d lost",
                        self.id, adopted, lost)
            return True
        return False

    def _adopt_leases(self, conn: Connection) -> tuple[int, int]:
        """Reclaim each mapped lease from the new daemon. One it does not
        give back (its daemon had no journal, or it freed the lease) stays
        readable here through its mapping, but is no longer accounted."""
        adopted = lost = 0
        for lease in self.leases:
            if lease.kind == "local":
                continue  # moved into this process: nothing for a daemon to keep
            try:
                if not lease.capability:
                    raise AquaError("the daemon gave this lease no capability")
                reply = conn.request(p.Adopt(lease=lease.id, capability=lease.capability))
                if r.handle_map(reply.handle) != lease.handle:
                    raise AquaError(f"adopted {lease.id} names other memory: {reply.handle}")
                adopted += 1
            except DaemonUnavailable:
                raise  # no answer is not a refusal: the lease may still be kept
            except AquaError as exc:
                log.debug("lease %s not reclaimed: %s", lease.id, exc)
                lease.lost = True
                with self._leases_lock:
                    self._leases.pop(lease.id, None)
                lost += 1
        return adopted, lost

    def _ask_turn_again(self, conn: Connection) -> None:
        """A turn in progress asks the new daemon for its slice again; until
        it is granted, the next respond() pages out and waits."""
        st, reply = self._turn, None
        if st.active:
            try:
                reply = conn.request(p.Turn(devices=st.wanted))
            except AquaError as exc:
                log.warning("could not ask for the turn again: %s", exc)
        st.restarted(reply)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until the client is connected and registered (True), or the
        timeout passes (False): after DaemonGone, while it reconnects."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.connected:
            if self._stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return False
            time.sleep(0.01)
        return True

    @property
    def connected(self) -> bool:
        return self._conn.gone is None

    def close(self) -> None:
        """Release every lease and unregister. Safe to call twice."""
        self._stop.set()
        self._wake()
        if self._heartbeat.is_alive() and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)  # no heartbeat may follow the bye
        self._kept.drain()  # in self.leases like the rest: released below
        aliased = [lease for lease in self.leases if not lease._unmap()]
        self._deferred.clear()  # the bye releases them
        with self._leases_lock:
            self._leases.clear()
        # GPU leases were opened here only if cuda_memory is loaded (no cupy import otherwise).
        cuda = sys.modules.get("aqua.cuda_memory")
        mapped = bool(aliased) or (cuda is not None and cuda.unmap_failed())
        if mapped:
            # A bye would let aquad free GPU memory this process still maps
            # (undefined in CUDA; the pages could go to another tenant). Say
            # nothing: aquad drops this tenant when its heartbeats stop and
            # frees that memory once the process has exited.
            log.warning("closing with GPU lease(s) still mapped (%d aliased by live tensors): "
                        "their memory is freed when this process exits", len(aliased))
        if self._conn.gone is None and not mapped:
            try:
                self._conn.request(p.Bye(), timeout=min(self._conn.timeout, 2.0))
            except AquaError as exc:
                log.debug("bye failed: %s", exc)
        self._conn.close()
        if not self._heartbeat.is_alive() and self._wake_w >= 0:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<aqua.Client {self.id} {self.name!r} devices={list(self.devices)}>"


class Lease:
    """Offload memory granted by aquad and mapped into this process."""

    def __init__(self, client: Client, reply: r.Granted, *, populate: bool,
                 near: int | None = None) -> None:
        self.id: str = reply.lease
        self.device: int = reply.device  # aqua device id (nvidia-smi index on GPUs)
        self.nbytes: int = reply.nbytes
        self.tier: str = reply.tier  # nvlink, peer, host or local
        self.kind: str = reply.handle.kind  # posix_shm or cuda_ipc
        # As the wire map: what open_handle takes, here or in another process.
        self.handle: dict[str, Any] = r.handle_map(reply.handle)
        # The proof of ownership a restarted daemon asks for (host leases).
        self.capability: str = reply.capability
        self.lost = False  # a restarted daemon did not give it back, or it was fenced
        self.fenced = False  # not moved by a reclaim's deadline: the bytes are gone
        self.moves = 0  # times its bytes moved to other memory (see move())
        self._client = client
        self._near = near  # as asked for: where a kept lease may serve again
        self._mapping = open_handle(self.handle, prefix=client._conn.segment_prefix,
                                    populate=populate)
        self.released = False
        # Held by whoever copies through the memory (offload, restore, the
        # pager, the engine) and by move(): a move never runs under a copy.
        self.lock = threading.RLock()
        # Called (with the lease) after each move, on the event thread: for
        # code that keeps tensors aliasing the lease, to take new ones.
        self.on_move: Callable[[Lease], object] | None = None

    def _check(self) -> None:
        if self.fenced:
            raise AquaError(f"lease {self.id} was fenced: aquad took the memory back at a "
                            f"reclaim's deadline and its bytes are gone")
        if self.released:
            raise AquaError(f"lease {self.id} was released")

    def tensor(self, dtype: Any = None, shape: tuple[int, ...] | None = None):
        """A torch tensor aliasing the leased memory (uint8 by default).
        After a move (aquad reclaiming the memory) it aliases the new memory;
        tensors taken before alias the old one: take them under `lock`, and
        again after a move (`on_move`)."""
        self._check()
        if dtype is None:
            import torch  # noqa: PLC0415

            dtype = torch.uint8
        return self._mapping.tensor(dtype, shape)

    def buffer(self) -> memoryview:
        """The leased bytes as a writable memoryview (no torch needed)."""
        self._check()
        return self._mapping.buffer()

    def pin(self) -> bool:
        """Page-lock a host lease so GPU copies run at PCIe speed (done once;
        aqua's offload does it for CUDA tensors). False for GPU leases and
        where no CUDA runtime is present."""
        self._check()
        return self._mapping.pin()

    def move(self) -> bool:
        """Move the bytes out of memory aquad is reclaiming: a replacement
        lease on the next-best device (`move`), a copy, a swap, and the old
        lease released; with no room anywhere, into this process's own
        memory. The client does this by itself on a `reclaim` notice; the
        lease keeps working throughout (same object, same bytes). False if
        there was nothing to move (released, or the reclaim ended)."""
        client = self._client
        with self.lock:
            if self.released or self.lost or self.kind == "local":
                return False
            old_id = self.id
            try:
                reply = client._conn.request(p.Move(lease=old_id))
            except (OutOfMemory, LimitExceeded):
                self._evict()
                return True
            except (BadRequest, NoSuchLease):
                return False  # the reclaim ended, or the lease is no longer ours
            try:
                mapping = open_handle(r.handle_map(reply.handle),
                                      prefix=client._conn.segment_prefix)
            except BaseException:
                client._release_id(reply.lease)
                raise
            copy_between(mapping, self._mapping, self.nbytes)
            client.moves += 1  # before the old lease's release ends the reclaim
            with client._leases_lock:
                client._leases.pop(old_id, None)
                client._leases[reply.lease] = self
            self._swap(mapping, reply)
        if self.on_move is not None:
            self.on_move(self)
        return True

    def _evict(self) -> None:
        """No room anywhere: the bytes go into this process's memory, and the
        lease lives on there (kind `local`), unaccounted by aquad."""
        mapping = LocalMapping(self.nbytes)
        copy_between(mapping, self._mapping, self.nbytes)
        self._swap(mapping, None)
        self._client.evictions += 1

    def _swap(self, mapping: Any, reply: r.Granted | None) -> None:
        """Make the lease the one in `reply`, mapped by `mapping` (None: this
        process's own memory); the old memory is unmapped and its lease
        released (after the unmap: cuda)."""
        client = self._client
        old_id, old = self.id, self._mapping
        self._mapping = mapping
        if reply is None:
            self.device, self.tier, self.kind = -1, "process", "local"
            self.handle, self.capability = {"kind": "local", "nbytes": self.nbytes}, ""
        else:
            self.id, self.device, self.tier = reply.lease, reply.device, reply.tier
            self.handle, self.kind = r.handle_map(reply.handle), reply.handle.kind
            self.capability = reply.capability
        self.moves += 1
        if old.close():
            client._release_id(old_id)
        else:
            old.on_closed(lambda: client._deferred.append(old_id))

    def _unmap(self) -> bool:
        """True if the memory is unmapped now, False if tensors still alias it."""
        self.released = True
        return self._mapping.close()

    @property
    def usable(self) -> bool:
        """Not released, fenced, lost or moved into this process."""
        return not (self.released or self.fenced or self.lost or self.kind == "local")

    def _handed_on(self) -> Lease:
        """A new Lease object for this lease and its mapping; this one is left
        released, so whoever still holds it is refused, never let in on the
        next user's bytes."""
        heir = object.__new__(Lease)
        heir.__dict__.update(self.__dict__)
        heir.lock = threading.RLock()
        heir.on_move = None
        self.released = True
        return heir

    def release(self, *, keep: bool = False) -> None:
        """Give the memory back. Safe to call twice.

        Host leases: tensors still aliasing the memory stay readable to this
        process only, until they are dropped. GPU leases: CUDA must not free
        memory a process still maps, so while tensors alias the lease the
        release waits, and goes out once the last of them is gone.

        `keep`: the client may keep the lease mapped for a later
        `lease(reuse=True)` (up to its `keep_bytes`): a host lease that
        nothing in this process aliases any more; else released as above."""
        client = self._client
        with self.lock:  # not in the middle of a move
            if self.released:
                return
            if keep and client._kept.limit and self.usable and \
                    isinstance(self._mapping, ShmMapping) and not self._mapping.aliased:
                heir = self._handed_on()
                with client._leases_lock:
                    if client._leases.get(heir.id) is self:
                        client._leases[heir.id] = heir
                for old in client._kept.put(heir, self._near):
                    old.release()
                return
            if self._unmap():
                self._client._release(self)
            else:
                self._mapping.on_closed(lambda: self._client._deferred.append(self))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else f"device {self.device} ({self.tier})"
        return f"<aqua.Lease {self.id} {self.nbytes} bytes, {state}>"


def connect(tenant: str, device: int | Iterable[int] = 0, *, socket: str | None = None,
            weight: float | None = None, timeout: float = DEFAULT_TIMEOUT_S,
            reconnect: bool = True, keep_bytes: int = 0) -> Client:
    """Register with aquad as `tenant` computing on `device` (an id or a list).
    With `reconnect`, a client that lost its daemon (DaemonGone) connects
    again by itself and reclaims its leases and its turn. `keep_bytes`: how
    much of the host leases its consumers finish with (restore(), an
    engine's finished request) it keeps mapped for the next page-out instead
    of releasing (client/keep.py); 0, the default, keeps none."""
    return Client(tenant, device, socket=socket, weight=weight, timeout=timeout,
                  reconnect=reconnect, keep_bytes=keep_bytes)
