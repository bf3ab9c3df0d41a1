"""Prometheus metrics of aquad (`aquad --metrics WHERE`), off the request path.

Two halves on two threads. On the daemon's loop, `take_snapshot` copies the
arbiter's counters and the few gauges a scrape needs (O(devices + tenants +
ops), microseconds) into a `Snapshot`, once per PUBLISH_S (server.py's
observer task); handing it over is one attribute store. The `Exporter` runs
in a thread of its own and renders the latest snapshot with the
prometheus-client library when scraped (or writes it to a file), so a scrape
never waits for the loop and the loop never formats a metric. A loop that
wedges shows as `aquad_snapshot_timestamp_seconds` falling behind (and the
systemd watchdog restarts it: notify.py).

Where the metrics go (`--metrics`):
- `HOST:PORT`, an IP literal (`127.0.0.1:9400`, `[::1]:9400`): HTTP, GET any
  path. One request at a time, each within REQUEST_TIMEOUT_S: a scraper per
  host needs no more, and nobody who can connect can make the daemon hold
  more than one connection's worth.
- `unix:PATH`: the same HTTP on a Unix socket (mode 0660), for hosts where
  aquad may not open TCP (the unit's RestrictAddressFamilies); a local agent
  or proxy scrapes it.
- `file:PATH.prom`: the text format written every TEXTFILE_S (atomically, by
  rename), for node_exporter's textfile collector; removed at exit.

Labels stay bounded: device, backend, tier, op (the protocol's, or
`invalid`), error code, drop reason; a tenant's name only with
`--metrics-tenant-labels` (tenants choose names, and there are at most
max_tenants); never a lease id or a pid.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import socketserver
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .core.stats import Buckets, RequestStats, Stats

if TYPE_CHECKING:
    from .server import Server

PUBLISH_S = 1.0  # how often the loop publishes a snapshot
TEXTFILE_S = 5.0  # how often the textfile is rewritten
REQUEST_TIMEOUT_S = 5.0  # per scrape connection


class MetricsError(ValueError):
    """A --metrics value aquad cannot serve."""


@dataclass(frozen=True, slots=True)
class DeviceRow:
    id: int
    name: str
    backend: str
    capacity: int
    leased: int
    free: int
    leases: int
    held: bool
    waiting: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float  # Unix time
    started_at: float  # Unix time
    version: str
    backend: str
    protocol: int
    devices: tuple[DeviceRow, ...]
    tenants: int
    leases: int
    orphans: int
    connections: int
    subscribers: int
    struck: int  # tenants whose quanta are shortened by strikes
    refused_connections: int
    feed_missed: int
    stats: Stats
    requests: RequestStats
    by_tenant: dict[str, tuple[int, int]] | None = field(default=None)  # name -> leases, bytes


def take_snapshot(server: Server, *, tenant_labels: bool = False) -> Snapshot:
    """On the loop: copy what a scrape shows."""
    from aqua_protocol import PROTOCOL_VERSION

    from . import __version__

    arb = server.arbiter
    sched = arb.scheduler
    waiting: Counter = Counter()
    struck = 0
    for runner in sched.runners.values():
        if runner.state == "waiting":
            waiting.update(runner.devices)
        struck += runner.strikes > 0
    devices = tuple(
        DeviceRow(d.id, d.name, d.backend, arb.pools[d.id].capacity, arb.pools[d.id].used,
                  arb.pools[d.id].free, arb.leases.device_count.get(d.id, 0),
                  sched.holder.get(d.id) is not None, waiting[d.id])
        for d in arb.topology.devices)
    by_tenant = None
    if tenant_labels:
        by_tenant = {}
        for t in arb.tenants:
            leases, nbytes = by_tenant.get(t.name, (0, 0))
            by_tenant[t.name] = (leases + len(t.leases),
                                 nbytes + arb.leases.tenant_bytes.get(t.id, 0))
    now = time.time()
    return Snapshot(
        taken_at=now, started_at=server.started_at,
        version=__version__, backend=arb.backend.name, protocol=PROTOCOL_VERSION,
        devices=devices, tenants=len(arb.tenants), leases=sum(d.leases for d in devices),
        orphans=len(arb.orphans), connections=len(server.transport.conns),
        subscribers=len(server.feed), struck=struck,
        refused_connections=server.transport.turned_away, feed_missed=server.feed.missed,
        stats=arb.stats.copy(), requests=server.requests.copy(), by_tenant=by_tenant)


# --- rendering (the exporter's thread) ------------------------------------


def _histogram(family: Any, labels: list[str], b: Buckets) -> None:
    cumulative, total = [], 0
    for bound, n in zip((*(repr(float(le)) for le in b.bounds), "+Inf"), b.counts):
        total += n
        cumulative.append((bound, total))
    family.add_metric(labels, cumulative, sum_value=b.sum)


def families(s: Snapshot) -> Iterator[Any]:
    """The metric families of one snapshot (prometheus_client's core types)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    def by(family: Any, name: str, doc: str, labels: list[str],
           samples: Iterable[tuple[list[str], float]]) -> Any:
        """A family of one sample per label set."""
        fam = family(name, doc, labels=labels)
        for values, value in samples:
            fam.add_metric(values, value)
        return fam

    yield by(GaugeMetricFamily, "aquad_build_info", "aquad's version, backend and protocol",
             ["version", "backend", "protocol"], [([s.version, s.backend, str(s.protocol)], 1)])
    per_device = [
        ("aquad_device_capacity_bytes", "bytes aquad may lease on the device", "capacity"),
        ("aquad_device_leased_bytes", "bytes leased on the device (charged, rounded up "
         "to the granule)", "leased"),
        ("aquad_device_free_bytes", "bytes still free to lease on the device", "free"),
        ("aquad_device_leases", "leases held on the device", "leases"),
        ("aquad_device_slice_held", "1 while a tenant holds a GPU-time slice on the device",
         "held"),
        ("aquad_device_slice_waiting", "tenants waiting for a slice on the device",
         "waiting"),
    ]
    for name, doc, attr in per_device:
        yield by(GaugeMetricFamily, name, doc, ["device", "backend"],
                 (([str(d.id), d.backend], float(getattr(d, attr))) for d in s.devices))

    st = s.stats
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    scalars = [
        (gauge, "aquad_start_time_seconds", "when aquad started, Unix time", s.started_at),
        (gauge, "aquad_snapshot_timestamp_seconds", "when the daemon's loop last published "
         "these figures, Unix time (falls behind if the loop is stuck)", s.taken_at),
        (gauge, "aquad_tenants", "registered tenants", s.tenants),
        (gauge, "aquad_leases", "leases held by tenants", s.leases),
        (gauge, "aquad_orphan_leases", "leases of a previous aquad awaiting adoption",
         s.orphans),
        (gauge, "aquad_connections", "open connections to the socket", s.connections),
        (gauge, "aquad_subscribers", "connections subscribed to the event feed",
         s.subscribers),
        (gauge, "aquad_tenants_struck", "tenants whose quanta revocations have shortened",
         s.struck),
        (counter, "aquad_lease_frees", "leases freed (released, or their tenant left)",
         st.lease_frees),
        (counter, "aquad_lease_freed_bytes", "bytes freed (charged)", st.freed_bytes),
        (counter, "aquad_lease_adoptions", "leases of a previous aquad adopted by their "
         "owners", st.adoptions),
        (counter, "aquad_slice_grants", "GPU-time slices granted", st.slice_grants),
        (counter, "aquad_slice_handovers", "slices granted to a tenant that had queued "
         "(sent as a grant event)", st.handovers),
        (counter, "aquad_slice_preemptions", "holders asked to yield", st.preemptions),
        (counter, "aquad_slice_revocations", "slices revoked (not yielded within the grace "
         "period); each is a strike", st.revocations),
        (counter, "aquad_tenant_joins", "tenants registered (hello)", st.tenant_joins),
        (counter, "aquad_reclaims", "leased memory reclaimed for a device's own use "
         "(elastic memory)", st.reclaims),
        (counter, "aquad_reclaimed_bytes", "bytes reclaimed (elastic memory)",
         st.reclaimed_bytes),
        (counter, "aquad_moved_bytes", "lease bytes moved between devices (elastic memory)",
         st.moved_bytes),
        (counter, "aquad_connections_refused", "connections turned away (over a connection "
         "limit, or out of descriptors)", s.refused_connections),
        (counter, "aquad_feed_missed_events", "events not sent to a subscriber that read too "
         "slowly", s.feed_missed),
    ]
    for family, name, doc, value in scalars:
        yield family(name, doc, value=value)

    tiers = sorted(st.lease_grants)
    yield by(CounterMetricFamily, "aquad_lease_grants", "leases granted, by link tier from "
             "the tenant's device", ["tier"], (([t], st.lease_grants[t]) for t in tiers))
    yield by(CounterMetricFamily, "aquad_lease_granted_bytes", "bytes granted (charged), by "
             "tier", ["tier"], (([t], st.granted_bytes[t]) for t in tiers))
    waits = HistogramMetricFamily("aquad_slice_wait_seconds",
                                  "time from asking for a slice to its grant")
    _histogram(waits, [], st.slice_waits)
    yield waits
    yield by(CounterMetricFamily, "aquad_tenant_drops", "tenants that left, by reason",
             ["reason"], (([why], st.tenant_drops[why]) for why in sorted(st.tenant_drops)))

    latency = HistogramMetricFamily("aquad_request_duration_seconds",
                                    "time the daemon spent on a request, by op",
                                    labels=["op"])
    for op in sorted(s.requests.latency):
        _histogram(latency, [op], s.requests.latency[op])
    yield latency
    yield by(CounterMetricFamily, "aquad_request_errors", "requests refused, by op and "
             "error code", ["op", "code"],
             (([op, code], n) for (op, code), n in sorted(s.requests.errors.items())))

    if s.by_tenant is not None:
        names = sorted(s.by_tenant.items())
        yield by(GaugeMetricFamily, "aquad_tenant_leases", "leases held, by tenant name",
                 ["tenant"], (([name], n) for name, (n, _) in names))
        yield by(GaugeMetricFamily, "aquad_tenant_leased_bytes", "bytes leased (as "
                 "requested), by tenant name", ["tenant"], (([name], b) for name, (_, b) in names))


# --- where the metrics go --------------------------------------------------


@dataclass(frozen=True)
class Target:
    kind: str  # tcp | unix | file
    address: Any  # (host, port) | path

    def describe(self) -> str:
        if self.kind == "tcp":
            host, port = self.address
            return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
        return f"{self.kind}:{self.address}"


def parse_target(text: str) -> Target:
    """`HOST:PORT` (an IP literal), `unix:PATH` or `file:PATH.prom`."""
    if text.startswith("unix:") or text.startswith("file:"):
        kind, path = text.split(":", 1)
        if not os.path.isabs(path):
            raise MetricsError(f"metrics {text!r}: the path must be absolute")
        if kind == "file" and not path.endswith(".prom"):
            raise MetricsError(f"metrics {text!r}: node_exporter reads only *.prom files")
        return Target(kind, path)
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 < number < 65536:
        raise MetricsError(f"cannot read metrics address {text!r}: write HOST:PORT with an "
                           f"IP address (127.0.0.1:9400, [::1]:9400), unix:PATH or "
                           f"file:PATH.prom")
    return Target("tcp", (host, number))


class Exporter:
    def __init__(self, target: Target) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import MetricsHandler

        self.target = target
        self.snapshot: Snapshot | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # a collector: collect() below
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._published = threading.Event()
        handler = MetricsHandler.factory(self.registry)
        handler.timeout = REQUEST_TIMEOUT_S  # a scraper that stalls loses its turn
        self._handler = handler

    def start(self) -> None:
        """Bind (errors raise OSError here, at startup) and start the thread."""
        kind, address = self.target.kind, self.target.address
        if kind == "tcp":
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            server_cls = type("_Server", (socketserver.TCPServer,),
                              {"address_family": family, "allow_reuse_address": True})
            self._server = server_cls(address, self._handler)
            run = self._serve
        elif kind == "unix":
            _unlink_stale_socket(address)
            # Bind and listen under a staging name, then rename: a socket file
            # that exists before listen() refuses connections, and a scraper
            # that polls for the path would take that as aquad being down.
            staging = f"{address}.{os.getpid()}.new"
            old = os.umask(0o117)  # 0660, as the daemon's socket
            try:
                self._server = socketserver.UnixStreamServer(staging, self._handler)
                os.replace(staging, address)
            except OSError:
                if self._server is not None:
                    self._server.server_close()
                    self._server = None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staging)
                raise
            finally:
                os.umask(old)
            run = self._serve
        else:
            directory = os.path.dirname(address)
            if not os.path.isdir(directory):
                raise OSError(f"no directory {directory}")
            run = self._write_files
        self._thread = threading.Thread(target=run, name="aquad-metrics", daemon=True)
        self._thread.start()

    def collect(self) -> Iterator[Any]:
        """prometheus_client's collector call: the newest snapshot's families."""
        snapshot = self.snapshot
        if snapshot is not None:
            yield from families(snapshot)

    def publish(self, snapshot: Snapshot) -> None:
        """From the loop: one store, one flag."""
        self.snapshot = snapshot
        self._published.set()

    def _serve(self) -> None:
        self._server.serve_forever(poll_interval=0.5)

    def _write_files(self) -> None:
        from prometheus_client import write_to_textfile

        while not self._stop.is_set():
            self._published.wait(TEXTFILE_S)
            if self.snapshot is not None:
                self._published.clear()
                with contextlib.suppress(OSError):  # a full or read-only disk: try again next time
                    write_to_textfile(self.target.address, self.registry)
            self._stop.wait(TEXTFILE_S)

    def close(self) -> None:
        self._stop.set()
        self._published.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT_S + 1)
        if self.target.kind in ("unix", "file"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.target.address)


def _unlink_stale_socket(path: str) -> None:
    """A predecessor's socket goes; anything else at the path is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)
