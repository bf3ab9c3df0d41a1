"""Pieces every benchmark shares: the raw limits and a private aquad."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import zmq

import aqua_protocol as p
from aqua.testing import PrivateDaemon, private_daemon
from aqua_demo.stats import percentile
from aqua_protocol.paths import endpoint

# The fastest a Python peer can answer: a blocking ROUTER echo, nothing else.
ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.bind(sys.argv[1])
print("up", flush=True)
while True:
    sock.send_multipart(sock.recv_multipart())
"""


# A raw relay: whatever one peer sends goes to the other. With two peers that
# pass a token back and forth after a pause, it is the bare ZeroMQ path of a
# slice hand-over (holder -> daemon -> next holder), with no aqua in it.
RELAY_SERVER = """
import sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.bind(sys.argv[1])
print("up", flush=True)
peers = []
while True:
    who, msg = sock.recv_multipart()
    if msg == b"hi":
        peers.append(who)
        if len(peers) == 2:
            for p in peers:
                sock.send_multipart([p, b"start"])
        continue
    other = peers[1] if who == peers[0] else peers[0]
    sock.send_multipart([other, msg])
"""

RELAY_PEER = """
import json, sys, time, zmq
endpoint, first = sys.argv[1], sys.argv[2] == "1"
pause, rounds = float(sys.argv[3]), int(sys.argv[4])
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.connect(endpoint)
sock.send(b"hi")
assert sock.recv() == b"start"
sent, seen = [], []
mine = first
for _ in range(rounds):
    if mine:
        time.sleep(pause)
        sent.append(time.monotonic())
        sock.send(b"token")
    else:
        sock.recv()
        seen.append(time.monotonic())
    mine = not mine
print(json.dumps({"sent": sent, "seen": seen}), flush=True)
"""


def relay_hops(tmp: str, pause: float, rounds: int = 1000) -> list[float]:
    """One-way latency through a raw relay, each hop after `pause` of idling:
    the limit a slice hand-over is measured against."""
    path = endpoint(os.path.join(tmp, "relay.sock"))
    relay = subprocess.Popen([sys.executable, "-c", RELAY_SERVER, path],
                             stdout=subprocess.PIPE, text=True)
    try:
        relay.stdout.readline()
        peers = [subprocess.Popen([sys.executable, "-c", RELAY_PEER, path, first, str(pause),
                                   str(rounds)], stdout=subprocess.PIPE, text=True)
                 for first in ("1", "0")]
        a, b = (json.loads(p.communicate(timeout=rounds * pause * 4 + 60)[0]) for p in peers)
        sent = sorted(a["sent"] + b["sent"])
        seen = sorted(a["seen"] + b["seen"])
        return [s - t for t, s in zip(sent, seen)][50:]
    finally:
        relay.kill()
        relay.wait()
        relay.stdout.close()


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_us": percentile(s, 0.50) * 1e6, "p99_us": percentile(s, 0.99) * 1e6,
            "n": len(s)}


def write_json(path: str, doc: object) -> None:
    """A benchmark's figures, for --json."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def _on_cpus(cpus: set[int] | None):
    """preexec_fn that pins a child, and so all its threads, to `cpus`."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Pin this thread to `cpus` for the block. Threads started inside (the
    ZeroMQ I/O thread of a context made there) inherit it."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def echo_server(tmp: str, cpus: set[int] | None = None) -> Iterator[zmq.Socket]:
    """A raw echo process, on `cpus` if given; yields a connected DEALER."""
    path = os.path.join(tmp, "echo.sock")
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, endpoint(path)],
                            stdout=subprocess.PIPE, text=True, preexec_fn=_on_cpus(cpus))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        proc.stdout.readline()
        sock.connect(endpoint(path))
        yield sock
    finally:
        sock.close(0)
        ctx.term()
        proc.kill()
        proc.wait()
        proc.stdout.close()


def echo_round_trips(tmp: str, rounds: int, payload: bytes | None = None,
                     pause: float = 0.0) -> list[float]:
    """Round trips to the raw echo, with a request-sized payload; with
    `pause`, each after that long idle (cold caches, sleeping threads)."""
    payload = payload or p.encode_request(1, p.Lease(nbytes=65536))
    with echo_server(tmp) as sock:
        samples = []
        for i in range(rounds + 500):
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            sock.send(payload)
            sock.recv()
            if i >= 500:  # warm-up excluded
                samples.append(time.perf_counter() - t0)
        return samples


# The benchmarks' daemon is the one tests and the demo use.
Aquad = PrivateDaemon


@contextlib.contextmanager
def aquad_process(tmp: str, *args: str, cpus: set[int] | None = None,
                  prefix: Sequence[str] = (), name: str = "aquad.sock",
                  log: str | None = None) -> Iterator[PrivateDaemon]:
    """A private aquad on `tmp` (on `cpus` if given, under `prefix`, e.g.
    prlimit), logging warnings and worse to `log` if given."""
    with private_daemon(tmp, "--log-level", "warning", *args, name=name, prefix=prefix,
                        log=log, preexec_fn=_on_cpus(cpus)) as daemon:
        yield daemon


@contextlib.contextmanager
def aquad(tmp: str, *args: str, cpus: set[int] | None = None) -> Iterator[str]:
    """A private aquad on `tmp`; yields its socket path."""
    with aquad_process(tmp, *args, cpus=cpus) as daemon:
        yield daemon.socket
