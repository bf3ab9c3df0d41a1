"""The socket's directory and the lock next to the socket.

aquad (often root) creates and changes files in whatever directory
`--socket` names, so it first makes sure nobody else can change what that
directory holds (aqua_protocol.paths.directory_problem, the rule tenants check too),
and opens the lock file without following links. The socket itself is made
by bind(): only a path names it (fchmod or fchown on a socket's descriptor
change the socket, not the file), which is safe once the directory is
checked, because nobody but root and aquad's own uid can replace the file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from aqua_protocol.paths import directory_problem


class StartupError(Exception):
    """aquad cannot start; the message tells the operator what to do."""


def _refuse_untrusted(socket_path: str, directory: str, *, holds_socket: bool) -> None:
    try:
        problem = directory_problem(directory, {0, os.geteuid()}, holds_socket=holds_socket)
    except OSError as exc:
        raise StartupError(f"cannot use {socket_path}: {exc.filename}: {exc.strerror}") from None
    if problem:
        raise StartupError(
            f"refusing to serve {socket_path}: {problem}. The socket's directory and every "
            f"one above it must belong to root or aquad's own uid ({os.geteuid()}) and be "
            f"writable by their owner only (sticky ones like /tmp may sit above it); fix "
            f"the owner and mode, or pass a --socket in such a directory")


def prepare_directory(socket_path: str) -> None:
    """Make the socket's directory if it is missing (mode 0755: tenants of
    other users must reach the socket), and refuse one others can write."""
    directory = os.path.dirname(socket_path)
    # The parent first: mkdir must not go through a symlink or into a
    # directory where someone else could swap ours for theirs.
    _refuse_untrusted(socket_path, os.path.dirname(directory), holds_socket=False)
    old = os.umask(0o022)  # the mode is set at birth, never by path later
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot create {directory}: {exc.strerror}") from None
    finally:
        os.umask(old)
    _refuse_untrusted(socket_path, directory, holds_socket=True)


def open_own(path: str, flags: int, mode: int = 0o600) -> int:
    """A descriptor of `path` (the lock, the journal), opened with `flags`
    but never through a link, once it is a regular file of aquad's own with
    one name: a link or a second name planted here would have aquad write
    the file it points to. StartupError otherwise; FileNotFoundError passes."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StartupError(f"refusing {path}: it is a symlink; remove it") from None
        raise StartupError(f"cannot open {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} links"  # a hard link to some other file
    if problem:
        os.close(fd)
        raise StartupError(f"refusing {path}: it {problem}; remove it")
    return fd


class SocketLock:
    """An flock next to the socket: bind() silently replaces an existing
    socket file, so without it a second daemon would steal the first's clients."""

    def __init__(self, socket_path: str) -> None:
        self.path = socket_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        # The lock file, made or reused (see open_own).
        fd = open_own(self.path, os.O_RDWR | os.O_CREAT | os.O_NOCTTY, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"another aquad (pid {holder}) is already serving this socket; "
                f"stop it first or pass a different --socket") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        # The lock file stays: unlinking it would let a newcomer lock a fresh
        # inode while a slow starter still holds the old one.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
