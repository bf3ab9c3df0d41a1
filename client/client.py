"""The tenant's connection to aquad: synchronous, thread-safe, with heartbeats.

Calls run on the caller's thread straight on the DEALER socket, under a lock
the heartbeat thread also takes, so a request costs one round trip and no
thread hand-off. Events the daemon pushes (its goodbye) are read by whichever
thread is reading at the time.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
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

from . import protocol as p
from .errors import (
    AquaError,
    DaemonGone,
    DaemonUnavailable,
    DaemonNotResponding,
    DaemonNotRunning,
    LimitExceeded,
    NotRegistered,
    PermissionDenied,
    ShuttingDown,
    TurnTimeout,
    UntrustedDaemon,
    error_for,
)
from .memory import open_handle
from .paths import directory_problem, endpoint, resolve_socket, segment_prefix

log = logging.getLogger("aqua")

DEFAULT_TIMEOUT_S = 10.0
# How long a request waits on the reply alone before it also watches the
# connection: a live daemon answers well within it, so the common round trip
# costs exactly one poll, and a dead one is noticed within one such window.
REPLY_FIRST_MS = 50
# Connection events that mean the daemon is gone: its end closed (it died or
# stopped), or a connect to its socket was refused.
_LINK_LOST = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
# Reconnecting after a lost daemon: the first try soon (a restart takes a
# moment), then doubling, never longer apart than the cap.
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 0.25
ENV_DAEMON_UID = "AQUA_DAEMON_UID"


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
            f"no permission to reach {path}: ask for membership in the socket's group",
            code="permission_denied") from None
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
            f"group {st.st_gid}): ask for membership in the socket's group",
            code="permission_denied") from None
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
        raise PermissionDenied(f"no permission to reach {os.path.dirname(path)}",
                               code="permission_denied") from None
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


def iter_leases(conn: Connection, *, tenant: str | None = None, device: int | None = None,
                limit: int = p.MAX_STATUS_LEASES) -> Iterator[dict[str, Any]]:
    """Every lease `status` lists, page by page along its `next` cursor: each
    lease granted before the walk and alive at its end comes exactly once."""
    after = None
    while True:
        page = _status_page(conn, p.Status(tenant=tenant, device=device, after=after,
                                           limit=limit))
        yield from page.get("leases", ())
        after = page.get("next")  # absent from a daemon without paging: one page is all
        if after is None:
            return


def _status_page(conn: Connection, op: p.Status, tries: int = 20) -> dict[str, Any]:
    """One `status` request, waiting out the daemon's rate limit on it (a long
    walk can use up a uid's budget of daemon time)."""
    for _ in range(tries - 1):
        try:
            return conn.request(op)
        except LimitExceeded as exc:
            wait = exc.details.get("retry_after_s")
            if not isinstance(wait, (int, float)):
                raise  # some other limit: waiting does not help
            time.sleep(min(float(wait), 1.0))
    return conn.request(op)


class Connection:
    """One DEALER socket speaking protocol v1, safe to share between threads."""

    def __init__(self, socket: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = resolve_socket(socket)
        self.timeout = timeout
        check_socket(self.socket_path)
        self.segment_prefix = segment_prefix(self.socket_path)  # of the segments it may map
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
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.gone: str | None = None  # why the daemon is unusable, once it is
        self.on_event: Callable[[p.Event], None] | None = None
        self.keepalive_s = 1.0
        self._last_sent = time.monotonic()

    def request(self, op: p.Op, *, timeout: float | None = None) -> dict[str, Any]:
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
                if isinstance(msg, p.Event):
                    self._on_event(msg)
                    continue
                if msg.id != rid and not (msg.id is None and not msg.ok):
                    continue  # the late answer to a request that timed out
                # (An error without an id answers a request the daemon could not
                # read at all; one request is in flight at a time, so it is ours.)
                if msg.ok:
                    return msg.result
                if msg.code == p.ErrorCode.NOT_REGISTERED:
                    # libzmq reconnects by itself, and a restarted aquad does
                    # not know us: that is the daemon we lost, not a drop.
                    self._check_link()
                raise error_for(msg.code, msg.message, msg.details)

    def _next_message(self, deadline: float) -> p.Reply | p.Event | None:
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

    def _on_event(self, event: p.Event) -> None:
        if event.event == "shutdown":
            self.gone = "aquad shut down: " + str(event.data.get("reason", "no reason given"))
            raise ShuttingDown(self.gone)
        if self.on_event is not None:
            self.on_event(event)
        else:
            log.debug("ignoring event %r", event.event)

    def poll_events(self) -> None:
        """Read pushed events without sending or blocking. Skips the check if
        another thread is mid-request: that thread dispatches events too."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            while not self.gone and self._sock.poll(0, zmq.POLLIN):
                self._dispatch(self._read())
        finally:
            self._lock.release()

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Read events until predicate() holds (True) or timeout passes (False).
        The lock is dropped between short polls so the heartbeat thread runs,
        and a keepalive goes out if this wait is all the tenant is doing."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if predicate():
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
                    self._dispatch(self._read())  # a farewell before the loss
                else:
                    self._check_link()
            time.sleep(0)  # let a thread blocked on the lock have it

    def _dispatch(self, msg: p.Reply | p.Event) -> None:
        if isinstance(msg, p.Event):
            self._on_event(msg)
        # A reply nobody waits for is the late answer to a timed-out request.

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
        while self.gone is None and self._sock.poll(0, zmq.POLLIN):
            self._dispatch(self._read())  # a `shutdown` event raises ShuttingDown
        self._check_link()
        self.gone = f"aquad stopped reading requests ({self.socket_path})"
        raise DaemonGone(self.gone)

    def _read(self) -> p.Reply | p.Event:
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
                 ) -> dict[str, Any]:
    """One request on a connection of its own, closed after (launchers,
    benchmarks, tests: whoever asks the daemon something once)."""
    conn = Connection(socket, timeout=timeout)
    try:
        return conn.request(op)
    finally:
        conn.close()


def _gpu_unmap_failed() -> bool:
    # Only if GPU leases were ever opened here (no cupy import otherwise).
    mod = sys.modules.get("aqua.cuda_memory")
    return bool(mod is not None and mod.unmap_failed())


class Client:
    """A registered tenant. Make one with `aqua.connect()`."""

    def __init__(self, tenant: str, devices: Iterable[int], *, socket: str | None = None,
                 weight: float | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 reconnect: bool = False) -> None:
        devices = list(devices)
        # None: the operator's weight for this tenant; a weight may ask for less.
        self._hello = p.Hello(tenant=tenant, devices=devices,
                              weight=None if weight is None else float(weight))
        self._conn, hello = self._register(Connection(socket, timeout=timeout))
        self.reconnect = reconnect
        self.reconnects = 0  # times a lost daemon was replaced by a new one
        self.name = tenant
        self.devices: tuple[int, ...] = tuple(devices)
        self._registered(self._conn, hello)
        self._leases: dict[str, Lease] = {}
        self._leases_lock = threading.Lock()
        # GPU leases whose last alias died after release(): finalizers append
        # (any thread, maybe inside a request), the heartbeat thread sends.
        self._deferred: collections.deque[Lease] = collections.deque()
        self._stop = threading.Event()
        self._turn = TurnState()
        self._hooks: tuple[Callable[[], object] | None, Callable[[], object] | None] = (None, None)
        self._heartbeat = threading.Thread(target=self._beat, name=f"aqua-heartbeat-{self.id}",
                                           daemon=True)
        self._heartbeat.start()

    def _register(self, conn: Connection) -> tuple[Connection, dict[str, Any]]:
        try:
            hello = conn.request(self._hello)
        except BaseException:
            conn.close()
            raise
        return conn, hello

    def _registered(self, conn: Connection, hello: dict[str, Any]) -> None:
        self.id: str = hello["tenant_id"]
        self.backend: str = hello["backend"]
        self.daemon_devices: list[dict] = hello["devices"]
        conn.on_event = self._on_event
        conn.keepalive_s = hello["heartbeat_interval_s"]

    # --- leases -----------------------------------------------------------------

    def lease(self, nbytes: int, near: int | None = None, *, populate: bool = True) -> Lease:
        """Lease `nbytes` of offload memory placed for a tenant computing on
        `near` (default: the first home device), mapped into this process."""
        self._send_deferred()
        reply = self._conn.request(p.Lease(nbytes=int(nbytes), near=near))
        try:
            lease = Lease(self, reply, populate=populate)
        except BaseException:
            try:
                self._conn.request(p.Release(lease=reply["lease"]))
            except DaemonUnavailable:
                pass  # the daemon took the lease with it; the first error matters
            raise
        with self._leases_lock:
            self._leases[lease.id] = lease
        return lease

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
        if lease.lost:
            return
        try:
            if self._conn.gone:
                raise DaemonGone(self._conn.gone)
            self._conn.request(p.Release(lease=lease.id))
        except DaemonUnavailable as exc:
            # A restarted aquad frees it once we reconnect (see `adopt`).
            log.debug("release of %s not confirmed: %s", lease.id, exc)

    def _release_later(self, lease: Lease) -> None:
        """Queue a release for the heartbeat thread (it runs from the
        finalizer that unmapped the lease, on whatever thread dropped the last
        tensor: no socket work there)."""
        self._deferred.append(lease)

    def _send_deferred(self) -> None:
        while self._deferred:  # on every lease(): no exception when empty
            try:
                lease = self._deferred.popleft()
            except IndexError:
                return  # the other thread took the last one
            try:
                self._release(lease)
            except AquaError as exc:
                log.debug("deferred release of %s failed: %s", lease.id, exc)

    # --- GPU time slices ------------------------------------------------------

    @contextmanager
    def turn(self, devices: Iterable[int] | None = None,
             timeout: float | None = None) -> Iterator[TurnState]:
        """Hold a GPU time slice on `devices` (default: all home devices) for the
        block; blocks until granted. Call respond() at the top of every engine
        iteration inside it. Raises TurnTimeout if not granted within timeout."""
        st = self._turn
        if st.active:
            raise AquaError("already inside a turn")
        st.active = True  # before asking: another thread may read the grant
        st.wanted = None if devices is None else list(devices)
        try:
            reply = self._conn.request(p.Turn(devices=st.wanted))
        except BaseException:
            st.active = False
            raise
        try:
            if reply["state"] == "granted":
                st.hold(reply)
            else:
                st.waits += 1
                if not self._conn.wait_for(lambda: st.holding, timeout):
                    raise TurnTimeout(f"no slice granted within {timeout:g} s")
            yield st
        finally:
            st.active = False
            st.holding = False
            if self._conn.gone is None:
                self._conn.request(p.TurnDone())

    def respond(self) -> bool:
        """The engine's per-iteration check (the paper's respond()). Returns
        False at once when nothing is asked. When the daemon wants the GPU
        back: runs the page-out hook, yields, blocks until the next grant, runs
        the page-in hook and returns True."""
        st = self._turn
        if not st.active:
            return False
        if not (st.preempted or st.revoked or st.requeued):
            self._conn.poll_events()
            if not (st.preempted or st.revoked or st.requeued):
                return False
        page_out, page_in = self._hooks
        if page_out is not None:
            page_out()
        slice_id = st.slice
        requeued = st.requeued  # a restarted aquad has us queued already
        st.holding = False
        st.yields += 1
        st.yielded_at = time.monotonic()
        try:
            reply = {"state": "queued"} if requeued else \
                self._conn.request(p.TurnYield(slice=slice_id))
            if reply["state"] == "granted":
                st.hold(reply)
            else:
                st.waits += 1
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

    def _on_event(self, event: p.Event) -> None:
        st, data = self._turn, event.data
        if event.event == "grant":
            if st.active and not st.holding and data.get("slice", 0) > st.slice:
                st.hold(data)
        elif event.event == "preempt":
            # Remembered by slice id even if the grant is not processed yet.
            st.asked = max(st.asked, int(data.get("slice", 0)))
        elif event.event == "revoked":
            slice_id = int(data.get("slice", 0))
            st.revoked_slice = max(st.revoked_slice, slice_id)
            if st.holding and slice_id == st.slice:
                st.holding = False
                st.revocations += 1
                log.warning("aquad revoked slice %s: %s", slice_id, data.get("reason"))

    # --- lifecycle ----------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self._conn.keepalive_s):
            try:
                self._send_deferred()
                self._conn.request(p.Heartbeat(), timeout=max(self._conn.keepalive_s * 3, 1.0))
            except DaemonGone:
                if not (self.reconnect and self._rejoin()):
                    return
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
                conn, hello = self._register(
                    Connection(self._conn.socket_path, timeout=min(self._conn.timeout, 2.0)))
            except UntrustedDaemon as exc:
                log.error("not reconnecting: %s", exc)
                return False
            except AquaError as exc:
                log.debug("reconnect failed: %s", exc)
                continue
            conn.timeout = self._conn.timeout
            # Leases and the turn first, then the swap: whoever waits for
            # `connected` finds the books of the new daemon complete.
            self._registered(conn, hello)
            try:
                adopted, lost = self._adopt_leases(conn)
            except DaemonUnavailable as exc:
                conn.close()  # that one went too: nothing is lost, try again
                log.debug("reconnect failed: %s", exc)
                continue
            self._turn.forget_slices()
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
            try:
                if not lease.capability:
                    raise AquaError("the daemon gave this lease no capability")
                reply = conn.request(p.Adopt(lease=lease.id, capability=lease.capability))
                if reply["handle"] != lease.handle:
                    raise AquaError(f"adopted {lease.id} names other memory: {reply['handle']}")
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
        st = self._turn
        if not st.active:
            return
        try:
            reply = conn.request(p.Turn(devices=st.wanted))
        except AquaError as exc:
            log.warning("could not ask for the turn again: %s", exc)
            return
        if reply["state"] == "granted":
            st.hold(reply)
        else:
            st.holding = False
            st.requeued = True

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
        if self._heartbeat.is_alive() and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)  # no heartbeat may follow the bye
        aliased = [lease for lease in self.leases if not lease._unmap()]
        self._deferred.clear()  # the bye releases them
        with self._leases_lock:
            self._leases.clear()
        mapped = bool(aliased) or _gpu_unmap_failed()
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

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<aqua.Client {self.id} {self.name!r} devices={list(self.devices)}>"


class TurnState:
    """What the tenant holds. Written by whichever thread reads the event."""

    def __init__(self) -> None:
        self.active = False  # inside turn()
        self.holding = False
        self.slice = 0
        self.devices: list[int] = []
        self.quantum_s = 0.0
        self.asked = 0  # highest slice id aquad asked us to yield
        self.revoked_slice = 0  # highest slice id aquad revoked
        self.yields = 0
        self.waits = 0  # turns and yields that queued for a grant (not granted in the reply)
        self.revocations = 0
        self.yielded_at = 0.0  # time.monotonic() of the last yield sent
        self.granted_at = 0.0  # ... and of the last grant seen
        self.wanted: list[int] | None = None  # the devices turn() asked for
        self.requeued = False  # asked again of a restarted daemon, not yet granted

    def forget_slices(self) -> None:
        """A new daemon numbers its slices afresh."""
        self.slice = self.asked = self.revoked_slice = 0

    def hold(self, grant: dict[str, Any]) -> None:
        self.granted_at = time.monotonic()
        self.slice = int(grant["slice"])
        self.devices = list(grant["devices"])
        self.quantum_s = float(grant["quantum_s"])
        self.requeued = False
        self.holding = True

    @property
    def preempted(self) -> bool:
        """aquad wants the current slice back."""
        return self.holding and self.asked == self.slice

    @property
    def revoked(self) -> bool:
        """The current slice was taken away without a yield."""
        return self.active and not self.holding and self.revoked_slice == self.slice != 0


class Lease:
    """Offload memory granted by aquad and mapped into this process."""

    def __init__(self, client: Client, reply: dict[str, Any], *, populate: bool) -> None:
        self.id: str = reply["lease"]
        self.device: int = reply["device"]  # aqua device id (nvidia-smi index on GPUs)
        self.nbytes: int = reply["nbytes"]
        self.tier: str = reply["tier"]  # nvlink, peer, host or local
        self.kind: str = reply["handle"].get("kind", "")  # posix_shm or cuda_ipc
        self.handle: dict[str, Any] = reply["handle"]
        # The proof of ownership a restarted daemon asks for (host leases).
        self.capability: str = reply.get("capability", "")
        self.lost = False  # a restarted daemon did not give it back
        self._client = client
        self._mapping = open_handle(reply["handle"], prefix=client._conn.segment_prefix,
                                    populate=populate)
        self.released = False

    def tensor(self, dtype: Any = None, shape: tuple[int, ...] | None = None):
        """A torch tensor aliasing the leased memory (uint8 by default)."""
        if self.released:
            raise AquaError(f"lease {self.id} was released")
        if dtype is None:
            import torch  # noqa: PLC0415

            dtype = torch.uint8
        return self._mapping.tensor(dtype, shape)

    def buffer(self) -> memoryview:
        """The leased bytes as a writable memoryview (no torch needed)."""
        if self.released:
            raise AquaError(f"lease {self.id} was released")
        return self._mapping.buffer()

    def pin(self) -> bool:
        """Page-lock a host lease so GPU copies run at PCIe speed (done once;
        aqua's offload does it for CUDA tensors). False for GPU leases and
        where no CUDA runtime is present."""
        if self.released:
            raise AquaError(f"lease {self.id} was released")
        return self._mapping.pin()

    def _unmap(self) -> bool:
        """True if the memory is unmapped now, False if tensors still alias it."""
        self.released = True
        return self._mapping.close()

    def release(self) -> None:
        """Give the memory back. Safe to call twice.

        Host leases: tensors still aliasing the memory stay readable to this
        process only, until they are dropped. GPU leases: CUDA must not free
        memory a process still maps, so while tensors alias the lease the
        release waits, and goes out once the last of them is gone."""
        if self.released:
            return
        if self._unmap():
            self._client._release(self)
        else:
            self._mapping.on_closed(lambda: self._client._release_later(self))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else f"device {self.device} ({self.tier})"
        return f"<aqua.Lease {self.id} {self.nbytes} bytes, {state}>"


def connect(tenant: str, device: int | Iterable[int] = 0, *, socket: str | None = None,
            weight: float | None = None, timeout: float = DEFAULT_TIMEOUT_S,
            reconnect: bool = True) -> Client:
    """Register with aquad as `tenant` computing on `device` (an id or a list).
    With `reconnect`, a client that lost its daemon (DaemonGone) connects
    again by itself and reclaims its leases and its turn."""
    devices = [device] if isinstance(device, int) else list(device)
    return Client(tenant, devices, socket=socket, weight=weight, timeout=timeout,
                  reconnect=reconnect)
