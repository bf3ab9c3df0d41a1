"""The real daemon with real tenant processes, sockets and shared memory."""

from __future__ import annotations

import mmap
import os
import signal
import socket as pysocket
import stat
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import torch
import zmq

import aqua
import aqua_protocol as p
from aqua_protocol.paths import endpoint

from .conftest import start_holder, wait_until

MiB = 2**20


def test_lease_write_and_read_back_from_a_second_mapping(daemon, tenants):
    tenant = tenants(daemon, """
        import sys, torch, aqua, aqua_protocol as p
        client = aqua.connect(tenant="writer", device=0)
        lease = client.lease(3 * 2**20)
        t = lease.tensor(torch.int32)
        t.copy_(torch.arange(t.numel(), dtype=torch.int32))
        info = client._conn.request(p.LeaseInfo(lease=lease.id))
        print(lease.id, info.handle.name, lease.device, flush=True)
        sys.stdin.readline()
        lease.release()
        print("released", flush=True)
        sys.stdin.readline()
        client.close()
    """)
    lease_id, name, device = tenant.readline().split()
    path = f"/dev/shm/{name}"
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    # A second, independent mapping in this process sees the tenant's bytes.
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 3 * MiB, prot=mmap.PROT_READ) as mm:
        seen = torch.frombuffer(bytearray(mm), dtype=torch.int32)
    assert torch.equal(seen, torch.arange(3 * MiB // 4, dtype=torch.int32))
    status = daemon.status()
    assert [l["id"] for l in status["leases"]] == [lease_id]
    assert status["leases"][0]["device"] == int(device)
    assert status["tenants"][0]["leased_bytes"] == 3 * MiB
    tenant.send("release")
    assert tenant.readline() == "released"
    # Unlinked in maintain(), just after the reply went out.
    assert wait_until(lambda: not os.path.exists(path), timeout=2)
    assert sum(d["leased_bytes"] for d in daemon.status()["devices"]) == 0
    tenant.send("bye")
    assert tenant.finish()[0] == 0
    assert daemon.status()["tenants"] == []


def test_two_tenants_are_isolated(inprocess):
    daemon = inprocess
    with daemon.connect("alice", 0) as a, daemon.connect("bob", 1) as b:
        lease = a.lease(MiB)
        lease.tensor().fill_(0xA5)
        before = daemon.status()
        for op in (p.Release(lease=lease.id), p.LeaseInfo(lease=lease.id)):
            with pytest.raises(aqua.NoSuchLease) as theirs:
                b._conn.request(op)
            with pytest.raises(aqua.NoSuchLease) as missing:
                b._conn.request(type(op)(lease="L" + "x" * 22))
            # Someone else's lease is indistinguishable from no lease at all.
            assert str(theirs.value).replace(lease.id, "?") == \
                str(missing.value).replace("L" + "x" * 22, "?")
        after = daemon.status()
        assert [l["id"] for l in after["leases"]] == [l["id"] for l in before["leases"]]
        assert after["devices"] == before["devices"]
        assert bool((lease.tensor() == 0xA5).all())
        lease.release()


def test_a_tenant_holding_thousands_of_descriptors_is_served(daemon, tenants):
    # A vLLM engine may hold more than FD_SETSIZE (1024) descriptors, so the
    # client's socket gets a number select() refuses; its event thread must
    # still wait (not spin) and every call be answered.
    tenant = tenants(daemon, """
        import os, resource, time, aqua
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
        null = os.open("/dev/null", os.O_RDONLY)
        spare = [os.dup(null) for _ in range(1100)]
        client = aqua.connect(tenant="many-fds", device=0)
        lease = client.lease(1 << 20)
        cpu = time.process_time()
        time.sleep(1.0)
        idle_cpu = time.process_time() - cpu
        for _ in range(20):
            client.status(leases=False)
        lease.release()
        print(min(spare) > 1024 or max(spare) > 1024, round(idle_cpu, 3), flush=True)
        client.close()
    """)
    high, idle_cpu = tenant.readline(timeout=60).split()
    assert high == "True"
    assert float(idle_cpu) < 0.3  # the event thread waited instead of spinning
    assert tenant.finish()[0] == 0


def test_sigkilled_tenant_loses_its_leases_within_seconds(daemon, tenants):
    tenant = tenants(daemon, """
        import time, aqua
        client = aqua.connect(tenant="doomed", device=0)
        leases = [client.lease(4 * 2**20) for _ in range(3)]
        for l in leases:
            l.tensor().fill_(1)
        print("ready", flush=True)
        time.sleep(60)
    """)
    assert tenant.readline() == "ready"
    assert sum(d["leased_bytes"] for d in daemon.status()["devices"]) == 12 * MiB
    assert len(daemon.segments()) == 3
    killed_at = time.monotonic()
    tenant.proc.send_signal(signal.SIGKILL)
    freed = wait_until(lambda: not daemon.status()["leases"], timeout=5)
    elapsed = time.monotonic() - killed_at
    assert freed, daemon.status()
    assert elapsed < 3, f"took {elapsed:.2f}s"
    status = daemon.status()
    assert status["tenants"] == []
    assert all(d["leased_bytes"] == 0 and d["free_bytes"] == d["capacity_bytes"]
               for d in status["devices"])
    assert daemon.segments() == []
    # Whichever the daemon saw first: the connection's end or the process's.
    assert "exited" in daemon.log() or "lost its connection" in daemon.log()


def test_frozen_tenant_is_dropped_after_missed_heartbeats(daemon, tenants):
    # SIGSTOP: the process lives (no pidfd event) but stops heartbeating.
    tenant = tenants(daemon, """
        import time, aqua
        client = aqua.connect(tenant="frozen", device=0)
        client.lease(2**20)
        print("ready", flush=True)
        time.sleep(60)
    """)
    assert tenant.readline() == "ready"
    tenant.proc.send_signal(signal.SIGSTOP)
    try:
        assert wait_until(lambda: not daemon.status()["tenants"], timeout=6)
        # Unlinked in maintain(), just after the reply that showed no tenants.
        assert wait_until(lambda: daemon.segments() == [], timeout=2), daemon.segments()
        assert "missed its heartbeats" in daemon.log()
    finally:
        tenant.proc.send_signal(signal.SIGCONT)


class Raw:
    """A bare DEALER for sending what no well-behaved client would."""

    def __init__(self, socket: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint(socket))

    def ask(self, *frames: bytes, timeout: float = 5.0) -> dict:
        self.sock.send_multipart(list(frames))
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return msgpack.unpackb(self.sock.recv())

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def req(op: str, args: dict | None = None, v: int = 1, rid: int = 7, **extra) -> bytes:
    body = {"v": v, "id": rid, "op": op, "args": args or {}}
    body.update(extra)
    return msgpack.packb(body)


@pytest.mark.parametrize("frames, code", [
    ([b"\xc1\xc1garbage"], "bad_request"),
    ([msgpack.packb([1, 2, 3])], "bad_request"),
    ([msgpack.packb({"v": 1, "op": "status"})], "bad_request"),  # no id
    ([req("lease", {"nbytes": "lots"})], "bad_request"),
    ([req("lease", {"nbytes": True})], "bad_request"),
    ([req("lease", {"nbytes": -5})], "bad_request"),
    ([req("lease", {"nbytes": 10, "color": "red"})], "bad_request"),
    ([req("hello", {"tenant": "../etc", "devices": [0]})], "bad_request"),
    ([req("hello", {"tenant": "x", "devices": []})], "bad_request"),
    ([req("release", {"lease": "nope"})], "bad_request"),
    ([req("status", extra_field=1)], "bad_request"),
    ([req("status"), b"second frame"], "bad_request"),
    ([req("format_disk")], "unknown_op"),
    ([req("status", v=2)], "unsupported_version"),
    ([req("lease", {"nbytes": 10})], "not_registered"),
    ([req("status", {"pad": "x" * 70_000})], "frame_too_large"),
])
def test_bad_input_gets_an_error_and_changes_nothing(daemon, frames, code):
    with aqua.connect("bystander", 0, socket=daemon.socket) as c:
        lease = c.lease(MiB)
        before = daemon.status()
        raw = Raw(daemon.socket)
        try:
            reply = raw.ask(*frames)
            assert reply["ok"] is False
            assert reply["error"]["code"] == code, reply
            assert reply["error"]["message"]
            # The daemon keeps serving the same connection and everyone else.
            assert raw.ask(req("status", rid=8))["ok"] is True
        finally:
            raw.close()
        after = daemon.status()
        assert after["devices"] == before["devices"]
        assert [l["id"] for l in after["leases"]] == [lease.id]
        assert [t["name"] for t in after["tenants"]] == ["bystander"]
        lease.release()


def test_unsupported_version_names_the_supported_ones(daemon):
    raw = Raw(daemon.socket)
    try:
        reply = raw.ask(req("hello", {"tenant": "future", "devices": [0]}, v=9, rid=99))
    finally:
        raw.close()
    assert reply["id"] == 99
    assert reply["error"]["code"] == "unsupported_version"
    assert reply["error"]["details"]["supported"] == [1]
    assert "9" in reply["error"]["message"]


def test_oversized_frame_beyond_hard_cap_does_not_hurt_the_daemon(daemon):
    raw = Raw(daemon.socket)
    raw.sock.send(b"\x00" * (p.HARD_MAX_FRAME_BYTES + 10))
    raw.close()
    assert daemon.status()["tenants"] == []


def test_out_of_memory_says_how_much_is_free(inprocess):
    daemon = inprocess
    with daemon.connect("greedy", 0) as c:
        keep = c.lease(60 * MiB)
        with pytest.raises(aqua.OutOfMemory) as err:
            c.lease(100 * MiB)
        assert str(64 * MiB) in str(err.value)
        assert err.value.details["largest_free_bytes"] == 64 * MiB
        assert err.value.code == "out_of_memory"
        assert len(daemon.status()["leases"]) == 1
        keep.release()


def test_offload_and_restore_a_tensor_bit_exactly(inprocess):
    daemon = inprocess
    with daemon.connect("engine", 0) as c:
        for t in (torch.randn(37, 129, dtype=torch.bfloat16),
                  torch.randint(-2**31, 2**31 - 1, (5, 5, 5), dtype=torch.int32),
                  torch.tensor(3.5, dtype=torch.float64),
                  torch.randn(64, 64)[:, ::2],  # not contiguous
                  torch.zeros(0)):
            saved = c.offload(t)
            back = saved.restore()
            assert back.dtype == t.dtype and back.shape == t.shape
            assert torch.equal(back.view(-1).view(torch.uint8) if back.numel() else back,
                               t.contiguous().view(-1).view(torch.uint8) if t.numel() else t)
        assert daemon.status()["leases"] == []


def test_shutdown_tells_clients_and_cleans_up(daemon):
    client = aqua.connect("witness", 0, socket=daemon.socket)
    lease = client.lease(MiB)
    tensor = lease.tensor()
    tensor.fill_(9)
    assert daemon.segments()
    assert daemon.stop() == 0
    assert daemon.files() == []  # spares too
    assert not os.path.exists(daemon.socket)
    started = time.monotonic()
    with pytest.raises(aqua.DaemonGone) as err:
        wait_until(lambda: False, 0.3)  # let the heartbeat thread read the goodbye
        client.lease(MiB)
    assert time.monotonic() - started < 2
    assert "shut down" in str(err.value) or "not answer" in str(err.value)
    assert int(tensor[0]) == 9  # the tenant's own mapping is still valid
    client.close()


def test_second_daemon_on_the_same_socket_is_refused(daemon):
    out = subprocess.run([sys.executable, "-m", "aquad", "--socket", daemon.socket,
                          "--host-devices", "1x16MiB"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "already serving" in out.stderr
    assert daemon.status()["daemon"]["protocol"] == 1  # the first one still serves


def test_client_errors_are_clear_without_a_daemon(sockdir):
    missing = os.path.join(sockdir, "none.sock")
    with pytest.raises(aqua.DaemonNotRunning, match="not running"):
        aqua.connect("x", 0, socket=missing)
    stale = os.path.join(sockdir, "stale.sock")
    s = pysocket.socket(pysocket.AF_UNIX)
    s.bind(stale)
    s.close()  # file exists, nobody listens
    with pytest.raises(aqua.DaemonNotRunning, match="stale"):
        aqua.connect("x", 0, socket=stale)


def test_client_times_out_on_a_mute_listener(sockdir):
    path = os.path.join(sockdir, "mute.sock")
    with pysocket.socket(pysocket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(8)  # connections complete in the backlog, never answered
        started = time.monotonic()
        with pytest.raises(aqua.DaemonNotResponding):
            aqua.connect("x", 0, socket=path, timeout=0.5)
        assert time.monotonic() - started < 3


def test_aquactl_against_a_running_daemon(daemon):
    import json

    with aqua.connect("shown", 1, socket=daemon.socket) as c, c.lease(2 * MiB) as lease:
        env = dict(os.environ, AQUA_SOCKET=daemon.socket)
        out = subprocess.run([sys.executable, "-m", "aqua.ctl"], capture_output=True,
                             text=True, env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "shown" in out.stdout and lease.id in out.stdout and "CAPACITY" in out.stdout
        out = subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket,
                              "status", "--json"], capture_output=True, text=True, timeout=30)
        doc = json.loads(out.stdout)
        dev = doc["devices"][lease.device]
        assert {"id", "backend", "capacity_bytes", "leased_bytes", "free_bytes"} <= set(dev)
        assert dev["leased_bytes"] == 2 * MiB
        assert dev["free_bytes"] == dev["capacity_bytes"] - 2 * MiB
        assert doc["tenants"][0]["pid"] == os.getpid()
        assert doc["tenants"][0]["leased_bytes"] == 2 * MiB
        assert doc["leases"][0] | {"id": lease.id, "tenant": c.id, "device": lease.device,
                                   "nbytes": 2 * MiB} == doc["leases"][0]
        for view in ("leases", "tenants"):
            out = subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket,
                                  view, "--json"], capture_output=True, text=True, timeout=30)
            assert [x["id"] for x in json.loads(out.stdout)] == [x["id"] for x in doc[view]]


def test_aquactl_without_a_daemon_exits_2_with_one_line(sockdir):
    out = subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket",
                          os.path.join(sockdir, "no.sock"), "status"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1
    assert "not running" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run tenants as other users")
def test_leases_belong_to_the_tenants_uid(start_daemon, tenants):
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    daemon = start_daemon("--socket-group", group)
    st = os.stat(daemon.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == nobody.pw_gid
    tenant = tenants(daemon, """
        import sys, aqua, aqua_protocol as p
        client = aqua.connect(tenant="unprivileged", device=0)
        lease = client.lease(2**20)
        lease.tensor().fill_(7)
        info = client._conn.request(p.LeaseInfo(lease=lease.id))
        print(info.handle.name, flush=True)
        sys.stdin.readline()
    """, user=(nobody.pw_uid, nobody.pw_gid))
    name = tenant.readline()
    st = os.stat(f"/dev/shm/{name}")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == \
        (nobody.pw_uid, nobody.pw_gid, 0o600)
    assert daemon.status()["tenants"][0]["uid"] == nobody.pw_uid
    # Another unprivileged user can neither map that memory nor reach aquad.
    other = tenants(daemon, f"""
        import os, aqua
        try:
            os.open("/dev/shm/{name}", os.O_RDWR)
            print("mapped")
        except PermissionError:
            print("no-map")
        try:
            aqua.connect(tenant="intruder", device=0)
            print("connected")
        except aqua.PermissionDenied as exc:
            print("no-connect")
    """, user=(nobody.pw_uid + 1000, nobody.pw_gid + 1000))
    assert other.finish()[1].split() == ["no-map", "no-connect"]
    tenant.send("done")
    assert tenant.finish()[0] == 0


def test_bad_flags_are_refused_clearly(sockdir):
    for flags, words in ((["--host-devices", "4xlots"], "binary unit"),
                         (["--host-devices", "2x1GB"], "binary unit"),
                         (["--host-devices", "two"], "COUNTxSIZE"),
                         (["--backend", "tpu"], "invalid choice")):
        out = subprocess.run([sys.executable, "-m", "aquad", "--socket",
                              os.path.join(sockdir, "bad.sock"), *flags],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, (flags, out.stderr)
        assert words in out.stderr, (flags, out.stderr)


def test_config_file_sets_the_devices(sockdir, start_daemon):
    cfg = os.path.join(sockdir, "aquad.toml")
    with open(cfg, "w") as f:
        f.write('[aquad]\nbackend = "host"\nhost_devices = "3x8MiB"\nheartbeat_timeout_s = 3\n')
    daemon = start_daemon("--config", cfg, defaults=False)
    devices = daemon.status()["devices"]
    assert [d["capacity_bytes"] for d in devices] == [8 * MiB] * 3


def test_a_claimed_routing_id_names_no_tenant(daemon, tenants):
    """aquad names connections itself: a second process announcing the
    routing id a tenant announced gets nothing of the tenant's, and the
    tenant goes on being served on its own connection."""
    victim = tenants(daemon, """
        import sys, time, zmq, msgpack, aqua_protocol as p
        ctx = zmq.Context(); s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, b"fixed-id")
        s.connect("ipc://" + __import__("os").environ["AQUA_SOCKET"])
        s.send(p.encode_request(1, p.Hello(tenant="victim", devices=[0]))); s.recv()
        s.send(p.encode_request(2, p.Lease(nbytes=2**20)))
        lease = msgpack.unpackb(s.recv())["result"]["lease"]
        print(lease, flush=True)
        sys.stdin.readline()
        s.send(p.encode_request(3, p.LeaseInfo(lease=lease)))
        print(msgpack.unpackb(s.recv())["ok"], flush=True)
    """)
    lease_id = victim.readline()
    raw = Raw.__new__(Raw)
    raw.ctx = zmq.Context()
    raw.sock = raw.ctx.socket(zmq.DEALER)
    raw.sock.setsockopt(zmq.ROUTING_ID, b"fixed-id")
    raw.sock.linger = 0
    raw.sock.connect(endpoint(daemon.socket))
    try:
        for op in (p.LeaseInfo(lease=lease_id), p.Release(lease=lease_id), p.Turn()):
            reply = raw.ask(p.encode_request(5, op))
            assert reply["ok"] is False and reply["error"]["code"] == "not_registered", reply
    finally:
        raw.close()
    assert [l["id"] for l in daemon.status()["leases"]] == [lease_id]
    victim.send("again")
    assert victim.readline() == "True"


def test_a_request_flood_does_not_hold_back_scheduler_events(start_daemon):
    daemon = start_daemon("--quantum-ms", "20", "--grace-ms", "100")
    holder = aqua.connect("holder", 0, socket=daemon.socket)
    waiter = aqua.connect("waiter", 0, socket=daemon.socket)
    stop = threading.Event()

    def flood():
        raw = Raw(daemon.socket)
        frame = req("status")
        while not stop.is_set():
            for _ in range(50):
                raw.sock.send(frame)
            while raw.sock.poll(0):
                raw.sock.recv()
        raw.close()

    flooder = threading.Thread(target=flood, daemon=True)
    try:
        with holder.turn():
            flooder.start()
            # The holder never yields: the waiter must be granted once its
            # slice is revoked (20 ms + 100 ms), flood or not.
            t0 = time.monotonic()
            with waiter.turn(timeout=5):
                waited = time.monotonic() - t0
    finally:
        stop.set()
        flooder.join(5)
        holder.close()
        waiter.close()
    assert waited < 2, waited


def test_a_dropped_tenant_is_told_instead_of_waiting_forever(start_daemon, tenants):
    daemon = start_daemon("--grace-ms", "30000")  # the holder keeps its slice
    start_holder(tenants, daemon)
    waiter = tenants(daemon, """
        import aqua
        client = aqua.connect(tenant="waiter", device=0)
        print("waiting", flush=True)
        try:
            with client.turn(timeout=30):
                print("granted", flush=True)
        except aqua.DaemonGone as exc:
            print("gone:", exc, flush=True)
    """)
    assert waiter.readline() == "waiting"
    assert wait_until(lambda: daemon.status()["slices"][0]["queue"], 5)  # its turn is queued
    waiter.proc.send_signal(signal.SIGSTOP)  # past the 2 s heartbeat timeout
    assert wait_until(lambda: len(daemon.status()["tenants"]) == 1, timeout=8)
    waiter.proc.send_signal(signal.SIGCONT)
    line = waiter.readline(timeout=10)
    assert line.startswith("gone:") and "dropped" in line, line


def test_pager_refused_a_lease_loses_nothing(inprocess):
    daemon = inprocess
    with daemon.connect("pager", 0) as client:
        small = torch.arange(1000, dtype=torch.float32)
        huge = torch.zeros(100 * MiB, dtype=torch.uint8)  # no 64 MiB device holds it
        pager = aqua.TensorPager(client, [small, huge])
        with pytest.raises(aqua.OutOfMemory):
            pager.page_out()
        assert small.numel() == 1000 and torch.equal(small, torch.arange(1000.0))
        assert huge.numel() == 100 * MiB
        assert not pager.paged_out
        pager.unregister(huge)
        pager.page_out()
        assert small.numel() == 0
        pager.page_in()
        assert torch.equal(small, torch.arange(1000.0))
        pager.close()
        assert daemon.status()["leases"] == []
