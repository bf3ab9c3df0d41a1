"""Scheduler cost as the queue grows: 10, 100 and 1000 waiting tenants.

In process: one slice hand-over (the holder yields, the next waiter is
granted) and one next_deadline() on one device with n tenants queued, for
the Scheduler and for the scan-everyone ReferenceScheduler it replaced.
Through a real aquad (host backend, raw DEALER sockets so that the client
side stays cheap): hand-over p50 (turn_done sent -> next tenant's grant
seen), a heartbeat's round trip sent right behind a hand-over, the time to
queue all n `turn`s, and for the largest n the time SIGTERM takes with
n - 1 queued. Every figure is also given against the n = 10 row.

    python bench/scale.py [--sizes 10,100,1000] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from _common import Aquad, aquad_process, write_json
from scheduler_ref import ReferenceScheduler

import aqua_protocol as p
from aqua_protocol.paths import endpoint
from aquad.core.scheduler import Preempt, Scheduler

CONFIG = """\
max_tenants = 2048
heartbeat_timeout_s = 3600.0
[quota.default]
tenants = "100%"
"""


# --- in process -----------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _median_call(fn: Callable[[], object], reps: int) -> float:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def in_process(cls: type, n: int, reps: int) -> dict[str, float]:
    """Seconds per hand-over and per next_deadline() with n tenants queued."""
    clock = Clock()
    sched = cls([0], clock=clock, quantum=0.01, grace=1.0)
    for i in range(n + 1):
        sched.add(f"t{i}", [0])
        sched.want(f"t{i}")
    handovers = []
    for _ in range(reps):
        clock.now += 0.01
        (preempt,) = [a for a in sched.tick() if isinstance(a, Preempt)]
        t0 = time.perf_counter()
        sched.yield_(preempt.tenant, preempt.slice)  # grants the next waiter
        handovers.append(time.perf_counter() - t0)
    clock.now += 0.001  # mid-quantum: the deadline is the holder's quantum end
    return {"handover_s": statistics.median(handovers),
            "next_deadline_s": _median_call(sched.next_deadline, reps)}


# --- through aquad ------------------------------------------------------------------

class Tenant:
    """One raw DEALER registered as a tenant."""

    def __init__(self, ctx: zmq.Context, path: str, name: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.connect(endpoint(path))
        self.rid = 0
        self.call(p.Hello(tenant=name, devices=[0]))

    def send(self, op: p.Op) -> None:
        self.rid += 1
        self.sock.send(p.encode_request(self.rid, op))

    def reply(self) -> p.Reply:
        """The reply to the last request (events before it are skipped)."""
        while True:
            msg = p.decode_reply(self.sock.recv())
            if isinstance(msg, p.Reply):
                assert msg.ok, msg
                return msg

    def call(self, op: p.Op) -> Any:
        self.send(op)
        return self.reply().result_of(type(op))

    def event(self, name: str) -> None:
        while True:
            msg = p.decode_reply(self.sock.recv())
            if isinstance(msg, p.replies.Event) and msg.event == name:
                return


def through_aquad(tmp: str, n: int, rounds: int) -> dict[str, float]:
    config = os.path.join(tmp, "scale.toml")
    with open(config, "w") as f:
        f.write(CONFIG)
    # A long quantum: hand-overs come from turn_done, never from preemption.
    with aquad_process(tmp, "--config", config, "--host-devices", "1x64MiB",
                       "--quantum-ms", "60000") as daemon:
        figures = _hand_overs(daemon, n, rounds)
    return figures


def _hand_overs(daemon: Aquad, n: int, rounds: int) -> dict[str, float]:
    proc, path = daemon.proc, daemon.socket
    ctx = zmq.Context()
    try:
        tenants = [Tenant(ctx, path, f"s{i}") for i in range(n)]
        t0 = time.perf_counter()
        states = [t.call(p.Turn()).state for t in tenants]
        fill = time.perf_counter() - t0
        assert states[0] == "granted" and set(states[1:]) <= {"queued"}, set(states)
        queue = deque(tenants[1:])
        holder = tenants[0]
        handovers, beats = [], []
        for i in range(rounds):
            nxt = queue.popleft()
            bystander = queue[-1] if queue else holder
            t0 = time.perf_counter()
            holder.send(p.TurnDone())
            if i % 2:  # every other round, a heartbeat right behind the hand-over
                bystander.send(p.Heartbeat())
            nxt.event("grant")
            handovers.append(time.perf_counter() - t0)
            if i % 2:
                bystander.reply()
                beats.append(time.perf_counter() - t0)
            holder.reply()
            assert holder.call(p.Turn()).state == "queued"  # back at the tail
            queue.append(holder)
            holder = nxt
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        sigterm = time.perf_counter() - t0
    finally:
        ctx.destroy(linger=0)
    return {"handover_p50_s": statistics.median(handovers),
            "heartbeat_behind_handover_p50_s": statistics.median(beats),
            "fill_s": fill, "fill_per_turn_s": fill / n, "sigterm_s": sigterm}


# --- report -------------------------------------------------------------------------

def _raise_nofile() -> None:
    """Room for n sockets here and n connections plus pidfds in aquad."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _ratios(rows: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    base = rows[min(rows)]
    return {n: {k: v / base[k] for k, v in row.items() if base[k] > 0} for n, row in rows.items()}


def _table(title: str, rows: dict[int, dict[str, float]]) -> None:
    """One line per figure: microseconds at each n, then each against the first."""
    ratios = _ratios(rows)
    sizes = list(rows)
    print(title)
    print(f"  {'':34}" + "".join(f"{'n=' + str(n) + ' us':>14}" for n in sizes)
          + "".join(f"{str(n) + '/' + str(sizes[0]):>9}" for n in sizes[1:]))
    for key in rows[sizes[0]]:
        print(f"  {key:34}" + "".join(f"{rows[n][key] * 1e6:14.1f}" for n in sizes)
              + "".join(f"{ratios[n][key]:9.2f}" for n in sizes[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000", help="queued tenants per row")
    parser.add_argument("--quick", action="store_true",
                        help="10 and 100 tenants, few rounds (a smoke run)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    sizes = [10, 100] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps = 20 if args.quick else 200
    _raise_nofile()
    doc: dict = {"sizes": sizes}
    for name, cls in (("scheduler", Scheduler), ("reference", ReferenceScheduler)):
        # The reference costs O(n^2) a call: fewer repetitions where it is slow.
        rows = {n: in_process(cls, n, reps if cls is Scheduler or n <= 100 else 10)
                for n in sizes}
        _table(f"in process, {name}:", rows)
        doc[name] = {"rows": rows, "ratio": _ratios(rows)}
    with tempfile.TemporaryDirectory(prefix="aqua-scale-") as tmp:
        rows = {n: through_aquad(tmp, n, 40 if args.quick else 400) for n in sizes}
    _table("through aquad (sigterm_s: with n - 1 queued):", rows)
    doc["aquad"] = {"rows": rows, "ratio": _ratios(rows)}
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
