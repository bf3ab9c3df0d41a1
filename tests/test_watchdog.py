"""systemd's watchdog and STATUS=: pings come from the daemon's own loop.

A fake notify socket (a datagram socket of the test's) stands in for
systemd. The daemon pings WATCHDOG=1 and says STATUS= with its tenants and
leases; a loop that is frozen stops the pings, while a thread of the same
process (the metrics exporter) keeps answering: what keeps the daemon
alive under systemd is its loop, not merely its process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import trio

from aquad.config import load_config
from aquad.main import build
from aquad.notify import Notifier, watchdog_interval

from .conftest import Tenant, wait_until
from .test_metrics import free_port, parse, value

WATCHDOG_S = 0.3  # pings every 0.1 s


class FakeSystemd:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def next(self, timeout: float = 20.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def until(self, predicate, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            if predicate(msg):
                return msg

    def quiet_for(self, seconds: float) -> list[str]:
        """Everything that arrives within `seconds` (proving an absence
        needs a window: here several ping intervals)."""
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(sockdir):
    fake = FakeSystemd(os.path.join(sockdir, "notify"))
    yield fake
    fake.close()


def test_pings_and_status_from_a_real_daemon(sockdir, systemd):
    env = dict(os.environ, NOTIFY_SOCKET=systemd.path,
               WATCHDOG_USEC=str(int(WATCHDOG_S * 1e6)))
    env.pop("WATCHDOG_PID", None)
    path = os.path.join(sockdir, "aquad.sock")
    proc = subprocess.Popen([sys.executable, "-m", "aquad", "--socket", path, "--backend",
                             "host", "--host-devices", "2x64MiB"], env=env,
                            stderr=subprocess.DEVNULL)
    tenant = None
    try:
        assert systemd.until(lambda m: not m.startswith("STATUS=")) == "READY=1"
        # STATUS= goes out once, when it changes; pings keep coming
        systemd.until(lambda m: m.startswith("STATUS=serving 0 tenant(s), 0 lease(s)"))
        for _ in range(3):
            systemd.until(lambda m: m == "WATCHDOG=1")

        class Where:
            socket = path

        tenant = Tenant(Where, """
            import aqua
            client = aqua.connect(tenant="st", device=0)
            lease = client.lease(1 << 20)
            print("leased", flush=True)
            input()
        """)
        assert tenant.readline(timeout=60) == "leased"
        systemd.until(lambda m: m.startswith("STATUS=serving 1 tenant(s), 1 lease(s)"))

        # A stopped process sends nothing: systemd would restart it.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            systemd.quiet_for(0.05)  # what was sent before the stop
            assert "WATCHDOG=1" not in systemd.quiet_for(4 * WATCHDOG_S)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        systemd.until(lambda m: m == "WATCHDOG=1")
        tenant.kill()
        systemd.until(lambda m: m.startswith("STATUS=serving 0 tenant(s), 0 lease(s)"))
        proc.terminate()
        assert systemd.until(lambda m: m.startswith("STOPPING")) == "STOPPING=1"
        assert proc.wait(timeout=15) == 0
    finally:
        if tenant is not None:
            tenant.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_frozen_loop_stops_the_pings_but_not_the_exporter(sockdir, systemd,
                                                                  monkeypatch):
    """In process: the daemon's loop is blocked by a task that waits on a
    thread (what a wedged handler looks like). No WATCHDOG=1 goes out
    meanwhile, though the exporter's thread still answers scrapes, with a
    snapshot that stopped ageing at the freeze."""
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.path)
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    port = free_port()
    config = load_config(["--socket", os.path.join(sockdir, "inproc.sock"), "--backend",
                          "host", "--host-devices", "1x16MiB", "--metrics",
                          f"127.0.0.1:{port}"])
    server = build(config)  # bound, exporter started: as aquad does
    release = threading.Event()
    seen: dict = {}

    def watch() -> None:
        """The test's side, on a thread: sees the freeze, scrapes, lifts it."""
        try:
            systemd.until(lambda m: m == "MARK")  # the loop is blocked from here on
            seen["during"] = systemd.quiet_for(4 * WATCHDOG_S)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=15) as r:
                seen["scrape"] = parse(r.read().decode())
            seen["scraped_at"] = time.time()
        finally:
            release.set()
        seen["after"] = systemd.until(lambda m: m == "WATCHDOG=1", timeout=10)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            assert await trio.to_thread.run_sync(
                lambda: systemd.until(lambda m: m == "WATCHDOG=1"))
            await trio.sleep(0)
            watcher = threading.Thread(target=watch)
            watcher.start()
            frozen_at = time.time()
            server.notifier.send("MARK")
            release.wait(30)  # blocks the loop itself: no await
            await trio.to_thread.run_sync(watcher.join, 30)
            nursery.cancel_scope.cancel()
    finally:
        server.exporter.close()
        server.notifier.close()
    assert "WATCHDOG=1" not in seen["during"]
    assert seen["after"] == "WATCHDOG=1"  # the loop back, the pings back
    stamp = value(seen["scrape"], "aquad_snapshot_timestamp_seconds")
    assert stamp <= frozen_at < seen["scraped_at"]


def test_watchdog_interval_is_for_this_process_only():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) \
        == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "zero"}) is None
    assert watchdog_interval({}) is None


def test_status_is_sent_only_when_it_changes(systemd):
    notifier = Notifier({"NOTIFY_SOCKET": systemd.path})
    try:
        notifier.status("serving 1 tenant(s)")
        notifier.status("serving 1 tenant(s)")
        notifier.status("serving 2 tenant(s)")
        notifier.ping()  # no WATCHDOG_USEC: no pings
        assert systemd.quiet_for(0.2) == ["STATUS=serving 1 tenant(s)",
                                          "STATUS=serving 2 tenant(s)"]
    finally:
        notifier.close()


def test_a_gone_notify_socket_is_not_fatal(sockdir):
    notifier = Notifier({"NOTIFY_SOCKET": os.path.join(sockdir, "nobody"),
                         "WATCHDOG_USEC": "1000000"})
    assert not notifier.send("READY=1")
    notifier.ping()  # warns once, raises nothing
    notifier.close()


# --- journald-friendly logs -------------------------------------------------


def test_log_lines_are_events_with_stable_keys():
    from aquad.logs import line

    assert line("tenant_left", tenant="t1", name="llama", pid=42, reason="heartbeat",
                why="missed its heartbeats", devices=[0, 1], gone=None) == \
        'tenant_left tenant=t1 name=llama pid=42 reason=heartbeat why="missed its heartbeats" ' \
        'devices=0,1'
    assert line("x", text='say "hi"\nbye') == r'x text="say \"hi\"\nbye"'
    assert line("x", empty="") == 'x empty=""'


def test_under_journald_lines_carry_their_priority(tmp_path):
    """stderr is the journal when $JOURNAL_STREAM names its device:inode."""
    err = tmp_path / "stderr"
    code = ("import logging, os, sys\n"
            "from aquad import logs\n"
            "st = os.fstat(2)\n"
            "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
            "logs.setup('info')\n"
            "log = logging.getLogger('aquad')\n"
            "logs.event(log, logging.WARNING, 'slice_revoked', tenant='t1')\n"
            "logs.event(log, logging.INFO, 'tenant_joined', tenant='t2')\n"
            "logs.event(log, logging.DEBUG, 'slice_granted', tenant='t2')\n")
    with open(err, "w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, timeout=60)
    assert err.read_text().splitlines() == ["<4>slice_revoked tenant=t1",
                                            "<6>tenant_joined tenant=t2"]
    # the same variable inherited with stderr elsewhere: plain timestamped lines
    with open(err, "w") as f:
        subprocess.run([sys.executable, "-c", code.replace(
            "st = os.fstat(2)\n", "st = os.fstat(0)\n")], stderr=f, check=True, timeout=60,
            stdin=subprocess.DEVNULL)
    text = err.read_text()
    assert "<4>" not in text and " aquad WARNING slice_revoked tenant=t1" in text


def test_nothing_is_logged_per_request_at_the_default_level(start_daemon):
    import aqua

    daemon = start_daemon()
    with aqua.connect("quiet", 0, socket=daemon.socket) as client:
        for _ in range(50):
            client.lease(1 << 16).release()
        with client.turn():
            pass
    assert wait_until(lambda: "tenant_left" in daemon.log(), 10)
    events = [ln.split()[4] for ln in daemon.log().splitlines() if " aquad " in ln]
    assert events == ["started", "tenant_joined", "tenant_left"], daemon.log()
