"""aquad --metrics: scraped over real HTTP (and a Unix socket, and the
textfile) while real tenants work, parsed with prometheus_client's own
parser; the dashboard and the fleet manifest refer to what is exported."""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import aqua_protocol as p
from aquad.metrics import MetricsError, parse_target

from .conftest import Tenant, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana-aquad.json"
DAEMONSET = ROOT / "docs" / "fleet" / "aquad-daemonset.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> dict[str, list]:
    """Sample name -> [(labels, value)], through the library's parser."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    rows = [v for lab, v in samples.get(name, [])
            if all(lab.get(k) == x for k, x in labels.items())]
    assert len(rows) == 1, (name, labels, samples.get(name))
    return rows[0]


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=15) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return parse(reply.read().decode())


def fresh_scrape(url: str, since: float) -> dict:
    """A scrape of a snapshot the loop published after `since` (Unix time):
    snapshots are published once a second."""
    got: dict = {}

    def newer() -> bool:
        got.update(scrape(url))
        return value(got, "aquad_snapshot_timestamp_seconds") > since

    assert wait_until(newer, 10, interval=0.1)
    return got


# Two tenants on device 0: A leases and takes a slice it never yields, so it
# is preempted and revoked and B, queued behind it, is handed the device.
HOLDER = """
    import aqua
    client = aqua.connect(tenant="alpha", device=0)
    leases = [client.lease(1 << 20) for _ in range(3)]
    try:
        client.lease(1 << 40)
    except aqua.OutOfMemory:
        print("refused", flush=True)
    with client.turn():
        print("holding", flush=True)
        input()
"""
WAITER = """
    import aqua
    client = aqua.connect(tenant="beta", device=0)
    lease = client.lease(4 << 20, near=0)
    print("asking", flush=True)
    with client.turn():
        print("granted", flush=True)
        input()
"""


@pytest.fixture(scope="module")
def metrics_daemon(tmp_path_factory):
    from .conftest import Daemon

    sockdir = tmp_path_factory.mktemp("metrics")
    os.chmod(sockdir, 0o755)
    port = free_port()
    daemon = Daemon(str(sockdir / "aquad.sock"),
                    ["--backend", "host", "--host-devices", "2x64MiB", "--heartbeat-timeout",
                     "5", "--quantum-ms", "20", "--grace-ms", "200",
                     "--metrics", f"127.0.0.1:{port}", "--metrics-tenant-labels"]).start()
    daemon.url = f"http://127.0.0.1:{port}/metrics"
    yield daemon
    assert daemon.stop() == 0
    assert not daemon.files()


@pytest.fixture(scope="module")
def working(metrics_daemon):
    """The two tenants, after the hand-over; and a scrape of that moment."""
    daemon = metrics_daemon
    alpha = Tenant(daemon, HOLDER)
    beta = None
    try:
        assert alpha.readline(timeout=60) == "refused"  # imports, on a loaded machine
        assert alpha.readline() == "holding"
        beta = Tenant(daemon, WAITER)  # only now: alpha holds the device first
        assert beta.readline(timeout=60) == "asking"
        assert beta.readline() == "granted"  # after alpha's revocation
        yield daemon, fresh_scrape(daemon.url, time.time()), daemon.status()
    finally:
        alpha.kill()
        if beta is not None:
            beta.kill()


def test_scrape_while_tenants_work(working):
    daemon, m, status = working
    assert value(m, "aquad_build_info", backend="host", protocol="1") == 1
    assert value(m, "aquad_start_time_seconds") <= time.time()
    for d in status["devices"]:
        dev = str(d["id"])
        assert value(m, "aquad_device_capacity_bytes", device=dev) == d["capacity_bytes"]
        assert value(m, "aquad_device_leased_bytes", device=dev) == d["leased_bytes"]
        assert value(m, "aquad_device_free_bytes", device=dev) == d["free_bytes"]
        assert value(m, "aquad_device_leases", device=dev) == d["leases"]
    assert value(m, "aquad_tenants") == 2
    assert value(m, "aquad_leases") == 4
    assert sum(v for _, v in m["aquad_lease_grants_total"]) == 4
    assert value(m, "aquad_request_errors_total", op="lease", code="out_of_memory") == 1
    assert value(m, "aquad_request_duration_seconds_count", op="lease") == 5
    assert value(m, "aquad_request_duration_seconds_count", op="hello") == 2
    assert value(m, "aquad_tenant_joins_total") == 2
    # alpha never yields: preempted, revoked (a strike), and beta handed the device
    assert value(m, "aquad_slice_preemptions_total") >= 1
    assert value(m, "aquad_slice_revocations_total") >= 1
    assert value(m, "aquad_slice_handovers_total") >= 1
    assert value(m, "aquad_tenants_struck") == 1
    assert value(m, "aquad_slice_wait_seconds_count") == value(m, "aquad_slice_grants_total")
    assert value(m, "aquad_device_slice_held", device="0") == 1
    # elastic memory is not there yet: published, at zero
    assert value(m, "aquad_reclaims_total") == 0
    assert value(m, "aquad_moved_bytes_total") == 0
    # --metrics-tenant-labels: by name, never by lease id or pid
    assert value(m, "aquad_tenant_leased_bytes", tenant="alpha") == 3 << 20
    assert value(m, "aquad_tenant_leases", tenant="beta") == 1


def test_labels_stay_bounded(working):
    _, m, status = working
    allowed = {"device", "backend", "tier", "op", "code", "reason", "tenant", "le",
               "version", "protocol"}
    ops = set(p.OPS) | {"invalid"}
    for name, rows in m.items():
        for labels, _ in rows:
            assert set(labels) <= allowed, (name, labels)
            assert not any(re.fullmatch(r"L[A-Za-z0-9_-]{24}", v) for v in labels.values())
            if "op" in labels:
                assert labels["op"] in ops
            if "code" in labels:
                assert labels["code"] in {c.value for c in p.ErrorCode}


def test_histograms_are_cumulative(working):
    _, m, _ = working
    rows = [(float(lab["le"]), v) for lab, v in m["aquad_request_duration_seconds_bucket"]
            if lab["op"] == "lease"]
    assert [le for le, _ in rows] == sorted(le for le, _ in rows)
    assert [v for _, v in rows] == sorted(v for _, v in rows)
    assert rows[-1] == (float("inf"), 5)


def test_garbage_is_counted_with_a_bounded_label(metrics_daemon):
    since = time.time()
    conn = p_connection(metrics_daemon.socket)
    try:
        conn._sock.send(b"\xc1 not msgpack")  # noqa: SLF001 - the raw socket is the point
        reply = p.decode_reply(conn._sock.recv())  # noqa: SLF001
        assert reply.error.code == "bad_request"
    finally:
        conn.close()
    m = fresh_scrape(metrics_daemon.url, since)
    assert value(m, "aquad_request_errors_total", op="invalid", code="bad_request") >= 1


def p_connection(path: str):
    from aqua.client import Connection

    return Connection(path)


def test_a_silent_scraper_does_not_stall_the_daemon(metrics_daemon):
    """One scrape at a time, each within a timeout: a connection that sends
    nothing holds the exporter's thread, never the daemon's loop."""
    host, port = metrics_daemon.url.split("/")[2].split(":")
    with socket.create_connection((host, int(port))):
        assert metrics_daemon.status()["daemon"]["backend"] == "host"
        # and the scrape after it is answered once the silent one times out
        assert "aquad_tenants" in scrape(metrics_daemon.url)


# --- the other places metrics can go -----------------------------------------


def test_unix_socket_and_textfile(start_daemon, sockdir):
    where = os.path.join(sockdir, "metrics.sock")
    daemon = start_daemon("--metrics", f"unix:{where}")
    assert wait_until(lambda: os.path.exists(where), 10)
    assert os.stat(where).st_mode & 0o777 == 0o660

    class UnixHTTP(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(15)
            self.sock.connect(where)

    def unix_scrape() -> dict:
        c = UnixHTTP("localhost")
        c.request("GET", "/metrics")
        body = c.getresponse().read().decode()
        c.close()
        return parse(body)

    assert wait_until(lambda: "aquad_tenants" in unix_scrape(), 10)
    assert daemon.stop() == 0
    assert not os.path.exists(where)  # removed at exit

    prom = os.path.join(sockdir, "aquad.prom")
    daemon = start_daemon("--metrics", f"file:{prom}", name="b.sock")
    assert wait_until(lambda: os.path.exists(prom), 10)
    m = parse(pathlib.Path(prom).read_text())
    assert value(m, "aquad_device_capacity_bytes", device="0") == 64 << 20
    assert daemon.stop() == 0
    assert not os.path.exists(prom)


def test_a_port_in_use_stops_startup_cleanly(sockdir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = os.path.join(sockdir, "c.sock")
        out = subprocess.run([sys.executable, "-m", "aquad", "--socket", path, "--backend",
                              "host", "--host-devices", "1x8MiB", "--metrics",
                              f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "cannot serve metrics" in out.stderr
    assert not os.path.exists(path)


@pytest.mark.parametrize("text", ["9400", "localhost:9400", "127.0.0.1:0", "127.0.0.1:70000",
                                  "unix:relative.sock", "file:/var/lib/aquad.txt", ""])
def test_bad_targets_are_refused(text):
    with pytest.raises(MetricsError):
        parse_target(text)


def test_targets():
    assert parse_target("127.0.0.1:9400").describe() == "http://127.0.0.1:9400/metrics"
    assert parse_target("[::1]:9400").describe() == "http://[::1]:9400/metrics"
    assert parse_target("unix:/run/aqua/metrics.sock").kind == "unix"
    assert parse_target("file:/var/lib/node_exporter/aquad.prom").kind == "file"


def test_bad_metrics_flag_is_a_config_error(sockdir):
    out = subprocess.run([sys.executable, "-m", "aquad", "--socket",
                          os.path.join(sockdir, "d.sock"), "--metrics", "somewhere"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "metrics" in out.stderr


# --- the dashboard and the fleet manifest -------------------------------------


def test_the_dashboard_shows_only_exported_metrics(working):
    daemon, _, _ = working
    with urllib.request.urlopen(daemon.url, timeout=15) as reply:
        text = reply.read().decode()
    exported = set()
    for family in text_string_to_metric_families(text):  # empty families too
        exported |= {family.name, family.name + "_total", family.name + "_bucket"}
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 8
    for expr in exprs:
        names = set(re.findall(r"\baquad_[a-z_]+", expr))
        assert names, expr
        assert names <= exported, (expr, names - exported)


def test_the_daemonset_manifest_is_valid_yaml_with_what_aquad_needs():
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert "DaemonSet" in kinds
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostIPC"] is True  # tenants map the leases in the host's /dev/shm
    paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {"/run/aqua", "/dev/shm"} <= paths
    (container,) = pod["containers"]
    assert any("--metrics" in a for a in container["args"])
    assert container["ports"][0]["containerPort"] == 9400
    # alive means the loop answers (aquactl), not merely that a thread serves HTTP
    assert "aquactl" in container["livenessProbe"]["exec"]["command"][0]


def test_the_unix_socket_appears_only_once_it_listens(sockdir, monkeypatch):
    """A scraper polls for the path and connects at once; a path bound but not
    yet listening refuses it (seen as ConnectionRefused in a loaded run)."""
    import socketserver

    from aquad.metrics import Exporter

    where = os.path.join(sockdir, "early.sock")
    seen_before_listen = []
    real_activate = socketserver.UnixStreamServer.server_activate

    def activate(self) -> None:
        seen_before_listen.append(os.path.exists(where))
        real_activate(self)

    monkeypatch.setattr(socketserver.UnixStreamServer, "server_activate", activate)
    exporter = Exporter(parse_target(f"unix:{where}"))
    exporter.start()
    try:
        assert seen_before_listen == [False]
        assert os.stat(where).st_mode & 0o777 == 0o660
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(where)  # listening from the moment the path exists
        assert os.listdir(sockdir) == ["early.sock"]  # no staging name left
    finally:
        exporter.close()
    assert not os.path.exists(where)
