"""Fixtures that run the real daemon and real tenant processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator

import pytest

import aqua_protocol as p
from aqua.client import request_once, wait_for_daemon
from aqua.errors import DaemonNotRunning
from aqua_protocol.paths import segment_prefix
from aquad.backends.host import SHM_DIR


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Daemon:
    """A real aquad subprocess on a private socket."""

    def __init__(self, socket: str, args: list[str], prefix: list[str] = ()) -> None:
        self.socket = socket
        self.args = args
        self.prefix = list(prefix)  # e.g. prlimit, to run aquad under limits
        self.proc: subprocess.Popen | None = None
        self.log_path = socket + ".log"

    def start(self) -> Daemon:
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "aquad", "--socket", self.socket, *self.args],
            stdout=self._log, stderr=subprocess.STDOUT)

        try:
            wait_for_daemon(self.socket, self.proc)
        except DaemonNotRunning as exc:
            raise AssertionError(f"{exc}:\n{self.log()}") from None
        return self

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def request(self, op: p.Op, timeout: float = 5.0) -> dict:
        return request_once(self.socket, op, timeout=timeout)

    def status(self) -> dict:
        return self.request(p.Status())

    def segments(self) -> list[str]:
        """Lease segments in /dev/shm that hold pages. The daemon also keeps
        spare files ready for grants, sparse until a tenant maps one (the
        client populates its mappings, so every mapped lease has pages)."""
        held = []
        for f in self.files():
            try:
                if os.stat(os.path.join(SHM_DIR, f)).st_blocks > 0:
                    held.append(f)
            except FileNotFoundError:
                pass  # unlinked since the listing: the daemon is freeing it
        return held

    def files(self) -> list[str]:
        """Every file of this daemon in /dev/shm, spares included."""
        prefix = segment_prefix(self.socket)
        return [f for f in os.listdir(SHM_DIR) if f.startswith(prefix)]

    def kill(self) -> None:
        """SIGKILL: the crash the daemon cannot clean up after."""
        self.stop(signal.SIGKILL)

    def restart(self) -> Daemon:
        """A new aquad on the same socket and arguments (after a kill)."""
        if self.proc.poll() is None:
            self.stop()
        return self.start()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=15)
        finally:
            self._log.close()


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
        daemon = Daemon(os.path.join(sockdir, name), [*base, *args], prefix).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.stop()
    for daemon in started:  # after every one stopped: they may share a socket
        leftover = daemon.files()
        assert not leftover, f"aquad left shared memory behind: {leftover}"


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


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

    def readline(self, timeout: float = 20.0) -> str:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.proc.kill()
            raise AssertionError(f"tenant said nothing in {timeout}s: {self.proc.stderr.read()}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"tenant exited {self.proc.wait()}: {self.proc.stderr.read()}")
        return line.strip()

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


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
