"""A private aquad for tests, demos and benchmarks.

    from aqua.testing import private_daemon

    with private_daemon(tmpdir, "--host-devices", "2x1GiB") as daemon:
        client = aqua.connect("my-engine", socket=daemon.socket)

A real daemon process on its own socket (the host backend unless the
arguments name another: `auto` would pick cuda on a GPU machine), stopped and
checked for leftover shared memory on exit. Not imported by `import aqua`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import aqua_protocol as p
from aqua_protocol.paths import segment_prefix

from .client import request_once, wait_for_daemon
from .errors import DaemonNotRunning
from .memory import SHM_DIR


class PrivateDaemon:
    """One aquad subprocess on `socket`; start() runs it, restart() runs it again."""

    def __init__(self, socket: str, args: Sequence[str] = (), *, prefix: Sequence[str] = (),
                 log: str | None = None, preexec_fn: Callable[[], Any] | None = None) -> None:
        self.socket = socket
        if "--backend" not in args:
            args = ("--backend", "host", *args)
        self.args = list(args)
        # Where its segments are, if it can use the directory it is given
        # (aquad falls back to /dev/shm where it cannot: see aquad/shmdir.py).
        self.shm_dir = self.args[self.args.index("--shm-dir") + 1] \
            if "--shm-dir" in self.args else SHM_DIR
        self.prefix = list(prefix)  # e.g. prlimit, to run aquad under limits
        self.log_path = log  # appended to; None: aquad writes to our stdout and stderr
        self._preexec_fn = preexec_fn
        self._log: IO[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateDaemon:
        self._log = open(self.log_path, "a") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "aquad", "--socket", self.socket, *self.args],
            stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            preexec_fn=self._preexec_fn)  # noqa: PLW1509 (CPU pinning for benchmarks)
        try:
            wait_for_daemon(self.socket, self.proc)
        except DaemonNotRunning as exc:
            self.stop()
            raise DaemonNotRunning(f"{exc}\n{self.log()}") from None
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        if not self.log_path:
            return ""
        with open(self.log_path) as f:
            return f.read()

    def request(self, op: p.Op, timeout: float = 5.0) -> Any:
        """One request; its result as the op's struct (protocol/replies.py)."""
        return request_once(self.socket, op, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return self.request(p.Status())

    def files(self) -> list[str]:
        """Every file of this daemon (names), spare segments included."""
        return [os.path.basename(path) for path in self._paths()]

    def _paths(self) -> list[str]:
        """Its files in the directory it was given, and in /dev/shm, where it
        falls back to when it cannot use that one."""
        prefix = segment_prefix(self.socket)
        dirs = [d for d in dict.fromkeys((SHM_DIR, self.shm_dir)) if os.path.isdir(d)]
        return [os.path.join(d, f) for d in dirs for f in os.listdir(d) if f.startswith(prefix)]

    def remove_files(self) -> None:
        """Delete every file of this daemon: what a killed one left for a
        successor on its socket, when none is coming."""
        for path in self._paths():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def segments(self) -> list[str]:
        """Lease segments that hold pages. The daemon keeps spare files ready
        for grants, sparse until a tenant maps one (the client populates its
        mappings, so every mapped lease has pages)."""
        held = []
        for path in self._paths():
            # A file unlinked since the listing: the daemon is freeing it.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_blocks > 0:
                    held.append(os.path.basename(path))
        return held

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal aquad (SIGTERM: a clean stop) and wait for it; its exit code."""
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            return self.proc.wait(timeout=timeout)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def kill(self) -> None:
        """SIGKILL: the crash the daemon cannot clean up after."""
        self.stop(signal.SIGKILL)

    def restart(self) -> PrivateDaemon:
        """A new aquad on the same socket and arguments (after a kill, say)."""
        if self.running:
            self.stop()
        return self.start()


@contextlib.contextmanager
def private_daemon(directory: str, *args: str, name: str = "aquad.sock",
                   **kwargs: Any) -> Iterator[PrivateDaemon]:
    """A running aquad on `directory`/`name`, stopped on exit, and whatever
    files it left removed (one that was killed leaves its segments and spare
    files for a successor on the same socket, and there will be none). See
    PrivateDaemon for the keyword arguments."""
    daemon = PrivateDaemon(os.path.join(directory, name), args, **kwargs).start()
    try:
        yield daemon
    finally:
        daemon.stop()
        daemon.remove_files()
