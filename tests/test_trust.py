"""A hostile local user: an impostor daemon for tenants, planted files for aquad.

The attacker is uid 65534; the victim tenant runs as uid 1000, for which
nothing exists on disk. Both are real processes on real sockets.
"""

from __future__ import annotations

import os
import signal
import socket as pysocket
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

import aqua
from aqua.client import check_socket, wait_for_daemon
from aqua.memory import SHM_DIR, open_handle
from aqua_protocol.paths import segment_prefix

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play other users")

ATTACKER = 65534
VICTIM = (1000, 1000)
NBYTES = 65536

# A fake aquad as the attacker: answers hello and lease, handing out a
# segment of its own making. On release and bye it reads the segment back.
IMPOSTOR = r"""
import hashlib, os, secrets, sys
import msgpack, zmq

path, how, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.umask(0)  # anyone may connect, and open what it hands out
digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:10]
name = f"aqua-{digest}-{secrets.token_hex(12)}"
segment = os.path.join("/dev/shm", name)
if how == "file":
    os.ftruncate(os.open(segment, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), nbytes)
else:
    os.symlink(how, segment)
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind("ipc://" + path)
print("listening", segment, flush=True)
devices = [{"id": 0, "name": "host0", "backend": "host", "capacity_bytes": 2**30,
            "leased_bytes": 0, "free_bytes": 2**30, "granule_bytes": 65536}]
results = {
    "hello": {"tenant_id": "T1", "protocol": 1, "backend": "host", "weight": 1.0,
              "devices": devices,
              "heartbeat_interval_s": 0.4, "heartbeat_timeout_s": 2.0},
    "lease": {"lease": "L" + "a" * 24, "device": 0, "nbytes": nbytes, "tier": "host",
              "handle": {"kind": "posix_shm", "name": name, "nbytes": nbytes}},
    "release": {"released_bytes": nbytes},
}
while True:
    peer, frame = sock.recv_multipart()
    req = msgpack.unpackb(frame)
    print("op", req["op"], flush=True)
    reply = {"v": 1, "id": req["id"], "ok": True, "result": results.get(req["op"], {})}
    sock.send_multipart([peer, msgpack.packb(reply)])
    if req["op"] in ("release", "bye") and how == "file":
        with open(segment, "rb") as f:
            print("saw", f.read(12), flush=True)
"""

# The victim: offloads a few bytes, or says why it would not.
VICTIM_CODE = """
    try:
        with aqua.connect(tenant="victim", device=0) as client:
            lease = client.lease({nbytes})
            lease.buffer()[:12] = b"tenant-bytes"
            print("offloaded", flush=True)
    except aqua.AquaError as exc:
        print("refused", type(exc).__name__, exc, flush=True)
"""


class Impostor:
    """The attacker's daemon on `socket`; `how` is `file` (a segment it owns,
    mode 0666) or the target of a symlink it hands out as the segment."""

    def __init__(self, socket: str, how: str = "file") -> None:
        self.socket = socket
        self.proc = subprocess.Popen([sys.executable, "-c", IMPOSTOR, socket, how, str(NBYTES)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        words = self.proc.stdout.readline().split()
        assert words[:1] == ["listening"], self.proc.stderr.read()
        self.segment = words[1]

    def stop(self) -> list[str]:
        """Kill it; what it said after starting, line by line."""
        self.proc.send_signal(signal.SIGKILL)
        out, _ = self.proc.communicate(timeout=10)
        if os.path.lexists(self.segment):
            os.unlink(self.segment)
        return out.splitlines()


def attacker_dir(parent: str, name: str = "evil") -> str:
    path = os.path.join(parent, name)
    os.mkdir(path)
    os.chown(path, ATTACKER, ATTACKER)
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def impostors() -> Iterator[list[Impostor]]:
    made: list[Impostor] = []
    yield made
    for imp in made:
        if imp.proc.poll() is None:
            imp.stop()


def victim_says(tenants, imp: Impostor, code: str = VICTIM_CODE) -> str:
    tenant = tenants(imp, code.format(nbytes=NBYTES), user=VICTIM)
    rc, out, err = tenant.finish()
    assert rc == 0, err
    return out.strip()


@pytest.mark.parametrize("layout", ["attacker's directory", "sticky world-writable directory"])
def test_tenant_refuses_a_socket_directory_it_cannot_trust(sockdir, tenants, impostors, layout):
    if layout == "attacker's directory":
        directory = attacker_dir(sockdir)
        problem = f"owned by uid {ATTACKER} (mode 0755)"
    else:
        directory = os.path.join(sockdir, "tmp")
        os.mkdir(directory)
        os.chmod(directory, 0o1777)
        problem = "writable by group or others (mode 1777"
    imp = Impostor(os.path.join(directory, "aquad.sock"))
    impostors.append(imp)
    said = victim_says(tenants, imp)
    assert said.startswith("refused UntrustedDaemon"), said
    assert directory in said and problem in said
    assert not [line for line in imp.stop() if line.startswith("op")]  # not even a hello


def test_tenant_refuses_a_daemon_of_another_user(sockdir, tenants, impostors):
    directory = attacker_dir(sockdir)
    imp = Impostor(os.path.join(directory, "aquad.sock"))
    impostors.append(imp)
    os.chown(directory, 0, 0)  # the directory is fine now; the daemon is not
    said = victim_says(tenants, imp)
    assert said.startswith("refused UntrustedDaemon"), said
    assert f"runs as uid {ATTACKER} (pid {imp.proc.pid})" in said and "AQUA_DAEMON_UID" in said
    assert not [line for line in imp.stop() if line.startswith("op")]


def test_tenant_refuses_a_segment_it_does_not_own(sockdir, tenants, impostors, monkeypatch):
    monkeypatch.setenv("AQUA_DAEMON_UID", str(ATTACKER))  # trusted, yet it must not fool us
    imp = Impostor(os.path.join(attacker_dir(sockdir), "aquad.sock"))
    impostors.append(imp)
    said = victim_says(tenants, imp)
    assert said.startswith("refused UntrustedDaemon"), said
    assert f"owned by uid {ATTACKER} with mode 0666" in said and "uid 1000" in said
    lines = imp.stop()
    assert "op release" in lines  # the lease was given back
    assert not [line for line in lines if "tenant-bytes" in line]


def test_tenant_does_not_follow_a_symlinked_segment(sockdir, tenants, impostors, monkeypatch):
    # The link leads to the tenant's own private file, which passes every
    # owner and mode check: only O_NOFOLLOW stands between it and the bytes.
    monkeypatch.setenv("AQUA_DAEMON_UID", str(ATTACKER))
    target = os.path.join(SHM_DIR, f"aqua-test-victim-{os.getpid()}")
    imp = Impostor(os.path.join(attacker_dir(sockdir), "aquad.sock"), how=target)
    impostors.append(imp)
    code = f"""
    fd = os.open({target!r}, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, {NBYTES})
    os.write(fd, b"precious")
    os.close(fd)
    """ + VICTIM_CODE + f"""
    with open({target!r}, "rb") as f:
        print(f.read(8).decode())
    """
    try:
        said = victim_says(tenants, imp, code).splitlines()
    finally:
        if os.path.exists(target):
            os.unlink(target)
    assert said[0].startswith("refused UntrustedDaemon"), said
    assert "symlink" in said[0]
    assert said[1] == "precious"
    assert "op release" in imp.stop()


# --- the same rules in-process (root trusts only root) ---------------------------


def _symlinked(sockdir: str) -> str:
    real = os.path.join(sockdir, "real")
    os.mkdir(real, 0o755)
    os.symlink(real, os.path.join(sockdir, "link"))
    return os.path.join(sockdir, "link")


def _under_group_writable(sockdir: str) -> str:
    shared = os.path.join(sockdir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o775)  # not sticky: a group member could rename what is below
    inner = os.path.join(shared, "aqua")
    os.mkdir(inner, 0o755)
    return inner


@pytest.mark.parametrize("make, words", [
    (lambda d: attacker_dir(d), f"owned by uid {ATTACKER}"),
    (_symlinked, "is a symlink"),
    (_under_group_writable, "shared is writable by group or others (mode 0775"),
])
def test_socket_path_checks_cover_the_whole_path(sockdir, make, words):
    path = os.path.join(make(sockdir), "aquad.sock")
    with pytest.raises(aqua.UntrustedDaemon, match="refusing") as err:
        check_socket(path)
    assert words in str(err.value)


def test_a_trusted_directory_without_a_socket_is_just_not_running(sockdir):
    with pytest.raises(aqua.DaemonNotRunning):
        check_socket(os.path.join(sockdir, "aquad.sock"))
    with pytest.raises(aqua.DaemonNotRunning):
        check_socket(os.path.join(sockdir, "missing", "aquad.sock"))


def test_a_symlinked_socket_is_refused(sockdir):
    real = os.path.join(sockdir, "real.sock")
    listener = pysocket.socket(pysocket.AF_UNIX)
    listener.bind(real)
    listener.listen(1)
    os.symlink(real, os.path.join(sockdir, "aquad.sock"))
    try:
        with pytest.raises(aqua.DaemonNotRunning, match="symlink"):
            check_socket(os.path.join(sockdir, "aquad.sock"))
    finally:
        listener.close()


PREFIX = segment_prefix("/run/aqua-test/aquad.sock")


def _segment(mode: int = 0o600, size: int = NBYTES, owner: int = 0, name: str = "") -> str:
    name = name or f"{PREFIX}{os.getpid():08x}{'0' * 16}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    os.fchmod(fd, mode)
    os.fchown(fd, owner, owner)
    os.close(fd)
    return name


@pytest.mark.parametrize("kw, words", [
    ({"mode": 0o644}, "mode 0644"),
    ({"owner": ATTACKER}, f"owned by uid {ATTACKER}"),
    ({"size": NBYTES - 1}, f"holds {NBYTES - 1} bytes"),
    ({"name": f"aqua-0123456789-{os.getpid():08x}{'0' * 16}"}, "not a segment of this daemon"),
])
def test_a_segment_must_be_the_tenants_own_and_the_daemons(kw, words):
    name = _segment(**kw)
    try:
        with pytest.raises(aqua.UntrustedDaemon, match=words):
            open_handle({"kind": "posix_shm", "name": name, "nbytes": NBYTES}, prefix=PREFIX)
    finally:
        os.unlink(os.path.join(SHM_DIR, name))


def test_a_hard_linked_segment_is_refused():
    name = _segment()
    path, second = os.path.join(SHM_DIR, name), os.path.join(SHM_DIR, name + "-second")
    handle = {"kind": "posix_shm", "name": name, "nbytes": NBYTES}
    os.link(path, second)
    try:
        with pytest.raises(aqua.UntrustedDaemon, match="has 2 links"):
            open_handle(handle, prefix=PREFIX)
        os.unlink(second)
        mapping = open_handle(handle, prefix=PREFIX)  # the same file, linked once: fine
        assert len(mapping.buffer()) == NBYTES
        mapping.close()
    finally:
        for leftover in (path, second):
            if os.path.exists(leftover):
                os.unlink(leftover)


# --- aquad's side: planted files and open directories ----------------------------


def aquad_refuses(socket: str) -> str:
    """Run aquad on `socket`; it must exit 1 before it serves (at once; the
    60 s allow for its imports on a loaded machine). Its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "aquad", "--socket", socket,
                             "--backend", "host", "--host-devices", "1x16MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)  # its imports, on a loaded machine
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        raise AssertionError(f"aquad started on {socket}:\n{err}") from None
    assert proc.returncode == 1, err
    return err


@pytest.mark.parametrize("plant, words", [(os.symlink, "is a symlink"),
                                          (os.link, "has 2 links")])
def test_aquad_does_not_write_through_a_planted_lock(sockdir, plant, words):
    precious = os.path.join(sockdir, "precious")
    with open(precious, "w") as f:
        f.write("root's own data\n")
    socket = os.path.join(sockdir, "aquad.sock")
    plant(precious, socket + ".lock")
    err = aquad_refuses(socket)
    assert socket + ".lock" in err and words in err
    with open(precious) as f:
        assert f.read() == "root's own data\n"
    assert not os.path.lexists(socket)


@pytest.mark.parametrize("owner, mode, words", [
    (0, 0o777, "writable by group or others (mode 0777"),
    (0, 0o1777, "writable by group or others (mode 1777"),
    (ATTACKER, 0o755, f"owned by uid {ATTACKER} (mode 0755)"),
])
def test_aquad_refuses_a_socket_directory_others_control(sockdir, owner, mode, words):
    directory = os.path.join(sockdir, "run")
    os.mkdir(directory)
    os.chown(directory, owner, owner)
    os.chmod(directory, mode)
    err = aquad_refuses(os.path.join(directory, "aquad.sock"))
    assert directory in err and words in err
    assert os.listdir(directory) == []  # no lock, no socket made in it


def test_aquad_makes_a_missing_socket_directory_0755(sockdir):
    socket = os.path.join(sockdir, "new", "aquad.sock")
    proc = subprocess.Popen([sys.executable, "-m", "aquad", "--socket", socket, "--backend",
                             "host", "--host-devices", "1x16MiB"], stderr=subprocess.PIPE)
    try:
        wait_for_daemon(socket, proc)
        st = os.lstat(os.path.dirname(socket))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
        assert st.st_uid == os.geteuid()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
