"""Server.open(): a startup that fails says why and leaves the socket's lock free."""

from __future__ import annotations

import grp
import os
import secrets
import stat
import time

import pytest

from aquad.backends.host import HostBackend
from aquad.core.arbiter import Arbiter
from aquad.rundir import StartupError
from aquad.server import Server


def _server(sockdir: str, **kwargs: object) -> Server:
    backend = HostBackend(1, 2**20, prefix=f"aqua-{secrets.token_hex(5)}-", shm_dir=sockdir)
    return Server(Arbiter(backend, clock=time.monotonic), os.path.join(sockdir, "aquad.sock"),
                  **kwargs)


def test_an_unknown_socket_group_is_refused_before_anything_is_made(sockdir: str) -> None:
    with pytest.raises(StartupError, match="no such group 'no-such-group-aqua'"):
        _server(sockdir, socket_group="no-such-group-aqua").open()
    assert not os.path.exists(os.path.join(sockdir, "aquad.sock"))
    server = _server(sockdir)
    server.open()  # the lock was never kept
    try:
        assert stat.S_ISSOCK(os.lstat(server.socket_path).st_mode)
    finally:
        server.close_socket()


def test_a_socket_group_owns_the_socket(sockdir: str) -> None:
    group = grp.getgrgid(os.getegid()).gr_name
    server = _server(sockdir, socket_group=group)
    server.open()
    try:
        st = os.lstat(server.socket_path)
        assert st.st_gid == os.getegid() and stat.S_IMODE(st.st_mode) == 0o660
    finally:
        server.close_socket()
    assert not os.path.exists(server.socket_path)
    again = _server(sockdir)
    again.open()  # close_socket() let the lock go
    again.close_socket()
