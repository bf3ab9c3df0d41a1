"""Core benchmark: control-path latency and data-path bandwidth of aquad.

Each figure is a ratio against the limit measured in the same run:
  latency    raw pyzmq echo round trip (a blocking ROUTER echo process, the
             fastest a Python peer can answer) vs a lease grant and a lease
             release through a real aquad, same client loop, same socket type;
             also the full aqua.Client call (encode, lock, map the memory).
  bandwidth  offload + restore of a tensor through a host lease vs the same
             two copies into a plain in-process tensor (the data path must add
             no copy: target ratio >= 0.9).

    python bench/core.py [--rounds 5000] [--mib 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import msgpack
import torch
import zmq

import aqua
from aqua import protocol as p
from aqua.paths import endpoint

from _common import aquad, echo_server, percentiles


CHUNK = 250  # round trips per turn; echo and aquad alternate so noise hits both


def bench_control(tmp: str, rounds: int) -> dict[str, list[float]]:
    """Raw echo, lease grant and lease release round trips, interleaved in
    chunks on the same client loop and socket type."""
    lease_req = p.encode_request(2, p.Lease(nbytes=65536))
    echo_payload = lease_req  # same size as a lease request
    heartbeat = p.encode_request(4, p.Heartbeat())
    out: dict[str, list[float]] = {"echo": [], "heartbeat": [], "grant": [], "release": []}
    with echo_server(tmp) as echo, aquad(tmp, "--host-devices", "2x64MiB") as path:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(endpoint(path))
        sock.send(p.encode_request(1, p.Hello(tenant="bench", devices=[0])))
        assert msgpack.unpackb(sock.recv())["ok"]
        for chunk in range(rounds // CHUNK + 2):
            keep = chunk >= 2  # the first chunks warm up
            for _ in range(CHUNK):
                t0 = time.perf_counter()
                echo.send(echo_payload)
                echo.recv()
                if keep:
                    out["echo"].append(time.perf_counter() - t0)
            for _ in range(CHUNK):
                t0 = time.perf_counter()
                sock.send(heartbeat)
                sock.recv()
                if keep:
                    out["heartbeat"].append(time.perf_counter() - t0)
            for _ in range(CHUNK):
                # Only the round trips are timed; client-side encoding is not.
                t0 = time.perf_counter()
                sock.send(lease_req)
                raw = sock.recv()
                t1 = time.perf_counter()
                lease_id = msgpack.unpackb(raw)["result"]["lease"]
                release_req = p.encode_request(3, p.Release(lease=lease_id))
                t2 = time.perf_counter()
                sock.send(release_req)
                raw = sock.recv()
                t3 = time.perf_counter()
                assert msgpack.unpackb(raw)["ok"], raw
                if keep:
                    out["grant"].append(t1 - t0)
                    out["release"].append(t3 - t2)
        sock.close(0)
        ctx.term()
    return out


def paired_ratio(samples: list[float], echo: list[float]) -> float:
    """Median over chunks of (chunk p50 / the same chunk index's echo p50).
    Chunks alternate within a few milliseconds, so each pair sees the same
    machine state; this shrugs off the drift that moves pooled p50s."""
    ratios = []
    for i in range(0, min(len(samples), len(echo)) - CHUNK + 1, CHUNK):
        a, b = sorted(samples[i:i + CHUNK]), sorted(echo[i:i + CHUNK])
        ratios.append(a[CHUNK // 2] / b[CHUNK // 2])
    ratios.sort()
    return ratios[len(ratios) // 2] if ratios else float("nan")


def bench_api(tmp: str, rounds: int, mib: int) -> dict:
    """The full client call (encode, lock, map, unmap) and the data path."""
    with aquad(tmp, "--host-devices", f"2x{max(2 * mib, 64)}MiB") as path:
        api = []
        with aqua.connect("bench-api", 0, socket=path) as client:
            for i in range(rounds + 100):
                t0 = time.perf_counter()
                client.lease(65536).release()
                if i >= 100:
                    api.append(time.perf_counter() - t0)
            bandwidth = bench_bandwidth(client, mib)
    return {"api": api, "bandwidth": bandwidth}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_bandwidth(client: aqua.Client, mib: int, repeats: int = 7) -> dict:
    n = mib * 2**20
    src = torch.randint(0, 255, (n,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    plain = torch.empty_like(src)
    plain.fill_(0)  # touched, like a populated lease mapping
    dst.fill_(0)
    with client.lease(n) as lease:
        leased = lease.tensor()

        def via_lease() -> None:
            leased.copy_(src)
            dst.copy_(leased)

        def via_plain() -> None:
            plain.copy_(src)
            dst.copy_(plain)

        via_lease(), via_plain()  # warm up
        t_lease = best_of(via_lease, repeats)
        t_plain = best_of(via_plain, repeats)
        via_lease()
        assert torch.equal(dst, src)
        del leased
    moved = 2 * n  # offload + restore
    return {"bytes": n, "lease_gbps": moved / t_lease / 1e9, "plain_gbps": moved / t_plain / 1e9,
            "ratio": t_plain / t_lease}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--mib", type=int, default=256, help="tensor size for bandwidth")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)  # same for both sides; keeps the ratio stable on 2 cores
    with tempfile.TemporaryDirectory(prefix="aqua-bench-") as tmp:
        control = bench_control(tmp, args.rounds)
        d = bench_api(tmp, args.rounds // 5, args.mib)
    d.update(control)
    e = percentiles(control["echo"])
    rows = [("raw pyzmq echo", e)]
    out = {"echo": e, "rounds": args.rounds}
    for key, label in (("heartbeat", "heartbeat (no work)"), ("grant", "lease grant"),
                       ("release", "lease release"),
                       ("api", "client.lease()+release()")):
        q = percentiles(d[key])
        q["ratio_p50"] = q["p50_us"] / e["p50_us"]
        q["ratio_p99"] = q["p99_us"] / e["p99_us"]
        if key in control:
            q["ratio_paired"] = paired_ratio(control[key], control["echo"])
        rows.append((label, q))
        out[key] = q
    print(f"control path, {args.rounds} round trips (ratio = vs raw echo; paired = median "
          f"over chunks of chunk p50 / the echo chunk's just before it)")
    print(f"{'':26} {'p50 us':>8} {'p99 us':>8} {'x p50':>6} {'x p99':>6} {'paired':>6}")
    for label, q in rows:
        paired = f"{q['ratio_paired']:6.2f}" if "ratio_paired" in q else \
            ("  1.00" if label.startswith("raw") else "     -")
        print(f"{label:26} {q['p50_us']:8.1f} {q['p99_us']:8.1f} "
              f"{q.get('ratio_p50', 1):6.2f} {q.get('ratio_p99', 1):6.2f} {paired}")
    b = d["bandwidth"]
    out["bandwidth"] = b
    print(f"\ndata path, {b['bytes'] >> 20} MiB offload + restore")
    print(f"  through a host lease   {b['lease_gbps']:6.2f} GB/s")
    print(f"  plain in-process copy  {b['plain_gbps']:6.2f} GB/s")
    print(f"  ratio                  {b['ratio']:6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
