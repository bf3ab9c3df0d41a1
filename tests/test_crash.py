"""A daemon that crashes or stops costs tenants no bytes and no hang.

aquad is killed at chosen points (between a tenant's copy and its release,
while turns are queued, while a call waits for its reply) and the tenant's
bytes are checked bit-exact and its waiters' errors prompt. Every test ends
with a fresh aquad on the same socket, which cleans what the dead one left.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import pytest
import torch

import aqua
from tests.conftest import Daemon, start_holder, wait_until

MiB = 1 << 20
PROMPT_S = 2.0  # how soon a waiter must hear that the daemon is gone


def _pattern(nbytes: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    """Run fn on a thread; the dict gets its exception (or result) and when."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _gone_promptly(thread: threading.Thread, out: dict, killed_at: float) -> BaseException:
    thread.join(PROMPT_S + 5)
    assert not thread.is_alive(), "the waiter still hangs"
    error = out.get("error")
    assert isinstance(error, aqua.DaemonGone), out
    assert out["at"] - killed_at < PROMPT_S, out["at"] - killed_at
    return error


def _connect(daemon: Daemon, name: str = "crash") -> aqua.Client:
    return aqua.connect(name, 0, socket=daemon.socket, reconnect=False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_restore_after_the_daemon_died_is_bit_exact(daemon, sig):
    client = _connect(daemon)
    original = _pattern(8 * MiB)
    saved = client.offload(original)
    daemon.stop(sig)
    started = time.monotonic()
    back = saved.restore()  # the release fails; the bytes must not
    assert time.monotonic() - started < PROMPT_S
    assert torch.equal(back, original)
    client.close()
    daemon.restart()  # cleans what a killed daemon left


def test_pager_between_copy_and_release_loses_nothing(daemon):
    client = _connect(daemon)
    k, v = _pattern(3 * MiB, 1).view(torch.int32), _pattern(MiB, 2).view(torch.int16)
    want = (k.clone(), v.clone())
    pager = aqua.TensorPager(client, [k, v])
    pager.page_out()
    assert k.numel() == 0
    daemon.kill()
    pager.page_in()
    assert torch.equal(k, want[0]) and torch.equal(v, want[1])
    pager.close()  # its releases are best effort
    client.close()
    daemon.restart()


def test_a_waiter_in_turn_hears_of_a_crash_at_once(start_daemon, tenants):
    daemon = start_daemon("--grace-ms", "30000")
    holder = start_holder(tenants, daemon)
    client = _connect(daemon, "waiter")

    def wait_turn() -> None:
        with client.turn():
            pass

    thread, out = _in_thread(wait_turn)
    assert wait_until(lambda: daemon.status()["slices"][0]["queue"], 5)
    daemon.kill()
    _gone_promptly(thread, out, time.monotonic())
    assert not client.connected
    holder.kill()
    client.close()
    daemon.restart()


def test_respond_queued_behind_a_holder_fails_promptly_and_pages_back_in(start_daemon,
                                                                         tenants):
    daemon = start_daemon("--quantum-ms", "50", "--grace-ms", "30000")
    client = _connect(daemon, "engine")
    kv = _pattern(2 * MiB, 3)
    want = kv.clone()
    aqua.TensorPager(client, [kv]).install()
    held = threading.Event()

    def engine() -> None:
        with client.turn():
            held.set()
            while True:
                if client.respond():
                    continue
                time.sleep(0.005)

    thread, out = _in_thread(engine)
    assert held.wait(5)
    holder = start_holder(tenants, daemon)  # granted once the engine yields
    # The engine paged out, yielded and is queued again: it waits in respond().
    assert wait_until(lambda: client.id in daemon.status()["slices"][0]["queue"], 5)
    assert kv.numel() == 0
    daemon.kill()
    _gone_promptly(thread, out, time.monotonic())
    assert torch.equal(kv, want)  # paged back in from the leases' mappings
    holder.kill()
    client.close()
    daemon.restart()


def test_a_call_waiting_for_its_reply_hears_of_a_crash_at_once(daemon):
    client = _connect(daemon)
    daemon.proc.send_signal(signal.SIGSTOP)  # the call is sent, never answered
    thread, out = _in_thread(lambda: client.lease(MiB))
    thread.join(0.3)  # an absence: no reply while the daemon is stopped
    assert thread.is_alive()
    daemon.kill()
    _gone_promptly(thread, out, time.monotonic())
    with pytest.raises(aqua.DaemonGone):
        client.status()  # and every later call, at once
    client.close()
    daemon.restart()


def test_an_idle_tenant_notices_within_a_heartbeat(daemon):
    client = _connect(daemon)
    daemon.kill()
    # The test daemon's heartbeat interval is 0.4 s (timeout 2 s / 5).
    assert wait_until(lambda: not client.connected, PROMPT_S)
    client.close()
    daemon.restart()


def test_a_killed_private_daemon_leaves_no_files_once_its_context_ends(tmp_path):
    """aqua.testing.private_daemon: a killed aquad leaves its spare files
    and segments for a successor on its socket; the context it ran in, with
    none coming, removes them (runs of the suite left them in /dev/shm)."""
    from aqua.testing import private_daemon

    with private_daemon(str(tmp_path), "--host-devices", "1x64MiB") as daemon:
        assert wait_until(lambda: len(daemon.files()) > 0, 10.0)
        daemon.kill()
        assert daemon.files()  # nothing could clean up after a SIGKILL
    assert daemon.files() == []
