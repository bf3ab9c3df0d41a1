"""systemd's notify protocol without libsystemd: READY, STATUS, WATCHDOG.

One datagram per message to $NOTIFY_SOCKET (sd_notify(3)). The watchdog
interval comes from $WATCHDOG_USEC, for this process only if
$WATCHDOG_PID is unset or names it (sd_watchdog_enabled(3)). The pings are
sent by a task of the daemon's event loop (server.py), never by a thread of
their own: a loop that wedges stops them, and systemd restarts the daemon.
"""

from __future__ import annotations

import logging
import os
import socket

from .logs import quote

log = logging.getLogger("aquad")


class Notifier:
    """The daemon's line to systemd; every method is a no-op outside it."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address
        self.watchdog_s = watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._status = ""
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, state: str) -> bool:
        """One message (lines of KEY=VALUE); False if it could not be sent."""
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # on the loop: never wait on systemd
            self._sock.sendto(state.encode(), self.address)
            return True
        except OSError as exc:
            if not self._warned:  # once: a gone socket would otherwise flood the log
                self._warned = True
                log.warning("notify_failed error=%s", quote(exc.strerror or str(exc)))
            return False

    def ping(self) -> None:
        if self.watchdog_s is not None:
            self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """STATUS= for `systemctl status`, sent only when it changes."""
        if text != self._status and self.send("STATUS=" + text.replace("\n", " ")):
            self._status = text

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: dict[str, str]) -> float | None:
    """Seconds systemd waits for a ping (WatchdogSec=), or None."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a wrapper's parent or child)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None

