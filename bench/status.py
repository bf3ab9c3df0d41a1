"""Status benchmark: what `status` and `aquactl` cost as leases pile up.

A private aquad (host backend, 4 x 2 GiB sparse devices, quotas raised so
one uid may hold 200k leases) is filled with 64 KiB leases by pipelined raw
`lease` requests (nothing is mapped, no page is touched). At each count:
  summary     `status` with leases=false: round trip p50/p99 and reply size;
              its cost must not grow with the leases (goal: under 1 ms)
  first page  a bare `status` (what an old client sends): summary + 1000 leases
  walk        every lease through the `next` cursor, 1000 a page
  aquactl     `aquactl status --json`, `aquactl status` and
              `aquactl leases --all --json` to a pipe, wall time (the
              interpreter's start-up included)

    python bench/status.py [--counts 1000,10000,100000] [--rounds 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import msgpack
import zmq
from _common import aquad, percentiles, write_json

import aqua_protocol as p
from aqua.client import Connection, iter_leases
from aqua_protocol.paths import endpoint

CONFIG = """\
max_leases_per_tenant = 200000

[quota.default]
bytes = "100%"
leases = 200000
"""
PIPELINE = 512  # lease requests in flight at once while filling


def fill(sock: zmq.Socket, count: int) -> None:
    """Grant `count` more 64 KiB leases, PIPELINE requests in flight."""
    request = p.encode_request(7, p.Lease(nbytes=65536))
    left = count
    while left:
        batch = min(left, PIPELINE)
        for _ in range(batch):
            sock.send(request)
        for _ in range(batch):
            reply = msgpack.unpackb(sock.recv())
            assert reply["ok"], reply
        left -= batch


def round_trips(conn: Connection, op: p.Status, rounds: int) -> tuple[list[float], int]:
    """Round-trip times of `op` (decode included) and the reply's size."""
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        conn.request(op)
        samples.append(time.perf_counter() - t0)
    size = len(msgpack.packb(conn.request(op)))
    return samples, size


def walk(conn: Connection) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(1 for _ in iter_leases(conn))
    return time.perf_counter() - t0, n


def aquactl(path: str, *args: str) -> float:
    """Wall time of one aquactl run with stdout a pipe (not a terminal)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", path, *args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(path: str, conn: Connection, rounds: int) -> dict:
    summary, summary_size = round_trips(conn, p.Status(leases=False), rounds)
    first, first_size = round_trips(conn, p.Status(), max(rounds // 10, 5))
    walk_s, walked = walk(conn)
    return {"summary": percentiles(summary) | {"bytes": summary_size},
            "first_page": percentiles(first) | {"bytes": first_size},
            "walk_s": walk_s, "walked": walked,
            "ctl_status_json_s": aquactl(path, "status", "--json"),
            "ctl_status_s": aquactl(path, "status"),
            "ctl_leases_all_json_s": aquactl(path, "leases", "--all", "--json")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    out: dict = {"counts": {}}
    with tempfile.TemporaryDirectory(prefix="aqua-bench-") as tmp:
        config = os.path.join(tmp, "aquad.toml")
        with open(config, "w") as f:
            f.write(CONFIG)
        with aquad(tmp, "--config", config, "--host-devices", "4x2GiB",
                   "--heartbeat-timeout", "600") as path:
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.connect(endpoint(path))
            sock.send(p.encode_request(1, p.Hello(tenant="filler", devices=[0, 1, 2, 3])))
            assert msgpack.unpackb(sock.recv())["ok"]
            conn = Connection(path)
            held = 0
            print(f"{'leases':>7} {'summary p50 us':>14} {'p99 us':>8} {'bytes':>6} "
                  f"{'bare p50 ms':>11} {'bytes':>7} {'walk s':>7} {'ctl st --json s':>15} "
                  f"{'ctl st s':>8} {'ctl leases --all --json s':>25}")
            for count in counts:
                fill(sock, count - held)
                held = count
                r = measure(path, conn, args.rounds)
                assert r["walked"] == count, r
                out["counts"][count] = r
                s, f = r["summary"], r["first_page"]
                print(f"{count:7d} {s['p50_us']:14.1f} {s['p99_us']:8.1f} {s['bytes']:6d} "
                      f"{f['p50_us'] / 1e3:11.2f} {f['bytes']:7d} {r['walk_s']:7.2f} "
                      f"{r['ctl_status_json_s']:15.2f} {r['ctl_status_s']:8.2f} "
                      f"{r['ctl_leases_all_json_s']:25.2f}", flush=True)
            conn.close()
            sock.close(0)
            ctx.term()
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
