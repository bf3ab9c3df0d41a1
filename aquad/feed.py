"""The operators' event stream (`subscribe`, `aquactl events`).

A subscribed connection gets a `feed` event for each thing that happened:
tenants joining and leaving, slices granted, preempted and revoked. Any
task may publish; the events wait in one bounded backlog (BACKLOG, the
oldest dropped and counted when it is full) until the socket task fans them
out (`flush`), since only that task touches sockets (server.py). The daemon
keeps no queue per subscriber: a frame goes into the connection's own
output buffer (transport.py) or, when more than LAG_BYTES wait there
unread, is not sent at all and counted; the next frame that goes out says
how many were missed, and `seq` (one counter for the whole daemon) shows
the gap. So a slow or stuck subscriber costs at most LAG_BYTES of memory
and never reaches the transport's MAX_QUEUED, at which a peer is closed.
Subscribers are capped in all and per uid: the fan-out of every event is
O(subscribers). Who may subscribe is who may ask `status` (anyone the
socket's mode admits): the feed says nothing status does not.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aqua_protocol import ErrorCode, ProtocolError
from aqua_protocol import messages as m

from .core.tenants import Peer

MAX_SUBSCRIBERS = 16
MAX_PER_UID = 4
LAG_BYTES = 256 * 1024  # unread bytes past which a subscriber misses events
BACKLOG = 4096  # events published and not yet fanned out (a burst of drops)


@dataclass(slots=True)
class _Subscriber:
    uid: int
    missed: int = 0


class Feed:
    def __init__(self, *, send: Callable[[bytes, bytes], bool],
                 queued: Callable[[bytes], int], wake: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        self._send = send  # (conn, frame) -> still connected; the socket task's
        self._queued = queued  # conn -> bytes waiting in its output buffer
        self._wake = wake  # tells the socket task there is something to flush
        self._clock = clock
        self._subs: dict[bytes, _Subscriber] = {}
        self.pending: deque[dict] = deque()
        self.seq = 0
        self.missed = 0  # events not sent to some subscriber, in all

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(self, conn: bytes, peer: Peer) -> dict:
        if conn in self._subs:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this connection is already subscribed")
        if len(self._subs) >= MAX_SUBSCRIBERS:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                                f"aquad serves at most {MAX_SUBSCRIBERS} subscribers")
        if sum(s.uid == peer.uid for s in self._subs.values()) >= MAX_PER_UID:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                                f"uid {peer.uid} already has {MAX_PER_UID} subscriptions")
        self._subs[conn] = _Subscriber(peer.uid)
        return {"seq": self.seq, "lag_bytes": LAG_BYTES}

    def forget(self, conn: bytes) -> None:
        self._subs.pop(conn, None)

    def publish(self, kind: str, data: dict) -> None:
        """From any task: queue one event for the subscribers."""
        self.seq += 1
        if not self._subs:
            return
        if len(self.pending) >= BACKLOG:
            self.pending.popleft()
            for sub in self._subs.values():
                sub.missed += 1
            self.missed += len(self._subs)
        self.pending.append({"seq": self.seq, "time": round(self._clock(), 6),
                             "kind": kind, **data})
        self._wake()

    def flush(self) -> None:
        """From the socket task: fan the backlog out."""
        while self.pending:
            self._fan_out(self.pending.popleft())

    def _fan_out(self, body: dict) -> None:
        frame = m.encode_event("feed", body)
        for conn, sub in list(self._subs.items()):
            if self._queued(conn) > LAG_BYTES:
                sub.missed += 1
                self.missed += 1
                continue
            if sub.missed:
                out = m.encode_event("feed", {**body, "missed": sub.missed})
                sub.missed = 0
            else:
                out = frame
            if not self._send(conn, out):
                self.forget(conn)
