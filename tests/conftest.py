"""Fixtures that run the real daemon and real tenant processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest

from aqua.inprocess import InProcessDaemon
from aqua.testing import PrivateDaemon
from aqua_protocol.paths import segment_prefix
from aquad.core.limits import Limits


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# The one launcher tests, the demo and the benchmarks share.
Daemon = PrivateDaemon


@pytest.fixture
def sockdir() -> Iterator[str]:
    # World-traversable, so tests can run tenants as another user.
    path = tempfile.mkdtemp(prefix="aqua-test-")
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


@pytest.fixture
def start_daemon(sockdir: str) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, name: str = "aquad.sock", defaults: bool = True,
              prefix: list[str] = ()) -> Daemon:
        # --backend host: `auto` would pick the cuda backend on a GPU machine.
        base = ["--backend", "host", "--host-devices", "2x64MiB",
                "--heartbeat-timeout", "2"] if defaults else []
        socket = os.path.join(sockdir, name)
        daemon = Daemon(socket, [*base, *args], prefix=prefix, log=socket + ".log").start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
    for daemon in started:  # after every one stopped: they may share a socket
        leftover = daemon.files()
        assert not leftover, f"aquad left shared memory behind: {leftover}"


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


@pytest.fixture
def start_inprocess(sockdir: str) -> Iterator[Callable[..., InProcessDaemon]]:
    """Arbiters in the test's own process (aqua.inprocess), set like
    start_daemon's: two host devices of 64 MiB, heartbeat timeout 2 s; for
    tests of what the arbiter decides, not of the socket or the shell."""
    started: list[InProcessDaemon] = []

    def start(*, quantum_ms: float = 100, grace_ms: float = 1000) -> InProcessDaemon:
        limits = Limits(heartbeat_timeout_s=2.0, heartbeat_interval_s=0.4,
                        quantum_s=quantum_ms / 1000, grace_s=grace_ms / 1000)
        daemon = InProcessDaemon(sockdir, devices=2, capacity=64 * 2**20, limits=limits)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()
        prefix = segment_prefix(daemon.socket)
        leftover = [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]
        assert not leftover, f"the arbiter left shared memory behind: {leftover}"


@pytest.fixture
def inprocess(start_inprocess: Callable[..., InProcessDaemon]) -> InProcessDaemon:
    return start_inprocess()


class Tenant:
    """A tenant process running a snippet; talks to the test over lines."""

    def __init__(self, daemon: Daemon, code: str, *, user: tuple[int, int] | None = None):
        env = dict(os.environ, AQUA_SOCKET=daemon.socket, PYTHONUNBUFFERED="1",
                   PYTHONDONTWRITEBYTECODE="1")
        code = textwrap.dedent(code)
        if user is not None:
            # Drop privileges after the imports (the interpreter may live where
            # that user cannot read) and before connecting: SO_PEERCRED records
            # the credentials at connect time.
            code = (f"import os, aqua, torch\nos.setgroups([])\nos.setgid({user[1]})\n"
                    f"os.setuid({user[0]})\n" + code)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/")
        self._out = b""  # read from stdout, not yet returned by readline()

    def readline(self, timeout: float = 20.0) -> str:
        # Straight from the pipe into our own buffer: a select() on the file
        # object would miss lines its buffer already read (two lines printed
        # back to back, read by one read(), the second then looks "silent").
        import select  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._out:
            remaining = deadline - time.monotonic()
            poller = select.poll()  # not select(): this process may hold fds past 1024
            poller.register(fd, select.POLLIN)
            if remaining <= 0 or not poller.poll(remaining * 1000):
                self.proc.kill()
                raise AssertionError(
                    f"tenant said nothing in {timeout}s: {self.proc.stderr.read()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(
                    f"tenant exited {self.proc.wait()}: {self.proc.stderr.read()}")
            self._out += chunk
        line, self._out = self._out.split(b"\n", 1)
        return line.decode().strip()

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, self._out.decode() + out, err

    def kill(self) -> None:
        """End the process if it still runs, and close our ends of its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(BrokenPipeError):  # it died with our line unread
            self.proc.stdin.close()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def tenants() -> Iterator[Callable[..., Tenant]]:
    made: list[Tenant] = []

    def make(daemon: Daemon, code: str, **kw) -> Tenant:
        t = Tenant(daemon, code, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.kill()


HOLDER = """
    import time, aqua
    client = aqua.connect(tenant="holder", device=0)
    with client.turn():
        print("holding", flush=True)
        time.sleep(60)        # holds its slice and never calls respond()
"""


def start_holder(make_tenant: Callable[..., Tenant], daemon: Daemon) -> Tenant:
    """A tenant process that takes a slice on device 0 and sits on it."""
    holder = make_tenant(daemon, HOLDER)
    assert holder.readline() == "holding"
    return holder


# --- shared by the files that run real vLLM engines ----------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random fp32 Llama (tests/vllm_support.py), built once per module."""
    from tests.vllm_support import tiny_llama

    return tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def module_daemon() -> Iterator[Daemon]:
    """One aquad for a module's engines; it must leave no shared memory behind."""
    path = tempfile.mkdtemp(prefix="aqua-vllm-")
    daemon = Daemon(os.path.join(path, "aquad.sock"),
                    ["--backend", "host", "--host-devices", "2x64MiB"]).start()
    yield daemon
    daemon.stop()
    assert not daemon.files(), f"aquad left shared memory behind: {daemon.files()}"
    subprocess.run(["rm", "-rf", path], check=False)
