"""Core benchmark: control-path latency and data-path bandwidth of aquad.

Each figure is a ratio against the limit measured in the same run:
  latency    raw pyzmq echo round trip (a blocking ROUTER echo process, the
             fastest a Python peer can answer) vs a lease grant and a lease
             release through a real aquad, same client loop, same socket type;
             also the full aqua.Client call (encode, lock, map the memory).
  bandwidth  offload + restore of a tensor through a host lease vs the same
             two copies into a plain in-process tensor (the data path must add
             no copy: target ratio >= 0.9).
  codec      decoding a lease grant reply into what the client reads, the
             daemon encoding it, the daemon decoding a lease request into its
             typed op and the client encoding it, alone (no socket) vs plain
             msgpack unpackb / packb of the same frame or map.
  end to end aqua.offload() + restore() with everything they do (lease, map,
             populate, copy, unmap, release) vs the same two copies into
             freshly allocated tensors (torch.empty + copy_, twice: the pages
             are new on both sides), at 1 MiB, 16 MiB, 256 MiB and 2 GiB;
             and the longest stall of another Python thread during each (a
             thread sleeping 1 ms at a time that records how late it wakes:
             what a tenant's heartbeat thread would suffer). Goals: >= 0.9x
             from 16 MiB up, >= 0.5x at 1 MiB, no stall over 5 ms. Per setup:
               shm   a fresh lease each time, segments in /dev/shm (4 KiB pages)
               huge  a fresh lease each time, segments in a tmpfs aquad mounts
                     huge=within_size (--shm-dir --shm-mount; root only, else
                     aquad falls back to /dev/shm and the row says so)
               kept  as huge, the client keeping finished leases for reuse
                     (aqua.connect(keep_bytes=...)): the first offload leases,
                     every later one reuses it

Where the client and the server run decides what a round trip costs (on a
small VM a wake-up across cores costs twice one on the same core), and left
to itself the kernel places the echo and aquad differently. So the control
path is measured per CPU layout, the echo and aquad pinned alike in each:
  split   the client on one CPU, the server on another (how a host runs it)
  shared  client and server on one CPU (the worst case for a server doing work)
  free    no pinning: the kernel's choice, which may differ between the two

    python bench/core.py [--rounds 5000] [--mib 256] [--layouts split,shared,free]
                         [--e2e-mib 1,16,256,2048] [--e2e-setups shm,huge,kept]
                         [--json FILE] [--aquad-args ARGS]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import tempfile
import threading
import time

import msgpack
import torch
import zmq
from _common import aquad, echo_server, percentiles, pinned, write_json

import aqua
import aqua_protocol as p
from aqua_protocol.paths import endpoint
from aquad.shmdir import huge_setting

CHUNK = 250  # round trips per turn; echo and aquad alternate so noise hits both


def layouts(names: list[str]) -> dict[str, tuple[set[int] | None, set[int] | None]]:
    """(client CPUs, server CPUs) per layout this machine can run."""
    cpus = sorted(os.sched_getaffinity(0))
    known = {"free": (None, None)}
    if len(cpus) >= 2:
        known["split"] = ({cpus[0]}, {cpus[1]})
    known["shared"] = ({cpus[0]}, {cpus[0]})
    unknown = set(names) - {"split", "shared", "free"}
    if unknown:
        raise SystemExit(f"unknown layout(s) {', '.join(sorted(unknown))}; "
                         f"choose from split, shared, free")
    return {name: known[name] for name in names if name in known}


def bench_control(tmp: str, rounds: int, client_cpus: set[int] | None = None,
                  server_cpus: set[int] | None = None,
                  extra: tuple[str, ...] = ()) -> dict[str, list[float]]:
    """Raw echo, lease grant and lease release round trips, interleaved in
    chunks on the same client loop and socket type, both servers on the same
    CPUs."""
    lease_req = p.encode_request(2, p.Lease(nbytes=65536))
    echo_payload = lease_req  # same size as a lease request
    heartbeat = p.encode_request(4, p.Heartbeat())
    out: dict[str, list[float]] = {"echo": [], "heartbeat": [], "grant": [], "release": []}
    # Pinned before any context exists: ZeroMQ's I/O threads inherit it.
    with pinned(client_cpus), echo_server(tmp, server_cpus) as echo, \
            aquad(tmp, "--host-devices", "2x64MiB", *extra, cpus=server_cpus) as path:
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


# A lease grant's result, as the daemon's core builds it (host backend).
GRANT = {"lease": "L" + "a" * 24, "device": 1, "nbytes": 65536, "tier": "host",
         "handle": {"kind": "posix_shm", "name": "aqua-0123456789-" + "b" * 24, "nbytes": 65536},
         "capability": "c" * 32}


def bench_codec(rounds: int, repeats: int = 15) -> dict:
    """Per call, best of `repeats` alternating loops of `rounds` calls: the
    client's decode of a grant reply (frame to the typed result) vs
    msgpack.unpackb of it, the daemon's encode vs msgpack.packb, and the
    daemon's decode of a lease request (frame to the validated op) vs
    msgpack.unpackb of it, and the client's encode of that request (from its
    op) vs msgpack.packb of the same map."""
    frame = p.encode_result(7, GRANT)
    request = p.encode_request(7, p.Lease(nbytes=65536, near=1))
    envelope = {"v": p.PROTOCOL_VERSION, "id": 7, "ok": True, "result": GRANT}
    calls = range(rounds)

    def decode() -> None:
        for _ in calls:
            p.decode_reply(frame).result_of(p.Lease)

    def unpack() -> None:
        for _ in calls:
            msgpack.unpackb(frame)

    def encode() -> None:
        for _ in calls:
            p.encode_result(7, GRANT)

    def pack() -> None:
        for _ in calls:
            msgpack.packb(envelope)

    def decode_request() -> None:
        for _ in calls:
            p.decode_request(request)

    def unpack_request() -> None:
        for _ in calls:
            msgpack.unpackb(request)

    lease, as_map = p.Lease(nbytes=65536, near=1), msgpack.unpackb(request)

    def encode_request() -> None:
        for _ in calls:
            p.encode_request(7, lease)

    def pack_request() -> None:
        for _ in calls:
            msgpack.packb(as_map)

    out = {}
    for key, ours, plain in (("decode", decode, unpack), ("encode", encode, pack),
                             ("request", decode_request, unpack_request),
                             ("request_encode", encode_request, pack_request)):
        a, b = best_of_alternating(ours, plain, repeats)
        out[key] = {"us": a / rounds * 1e6, "msgpack_us": b / rounds * 1e6, "ratio": a / b}
    return out


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


def best_of_alternating(a, b, repeats: int) -> tuple[float, float]:
    """Best time of each, the two run in turn so that the VM's memory
    bandwidth, which drifts by tens of percent, is shared alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return min(times[0]), min(times[1])


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
            leased.copy_(src)  # noqa: F821 (deleted only after the last call)
            dst.copy_(leased)  # noqa: F821

        def via_plain() -> None:
            plain.copy_(src)
            dst.copy_(plain)

        via_lease(), via_plain()  # warm up
        t_lease, t_plain = best_of_alternating(via_lease, via_plain, repeats)
        via_lease()
        assert torch.equal(dst, src)
        del leased
    moved = 2 * n  # offload + restore
    return {"bytes": n, "lease_gbps": moved / t_lease / 1e9, "plain_gbps": moved / t_plain / 1e9,
            "ratio": t_plain / t_lease}


class StallWatch:
    """A thread that sleeps 1 ms at a time and keeps the worst lateness of
    its wake-ups since the last reset(): any stretch in which the process
    keeps other threads from running (the GIL held) shows up here."""

    TICK = 0.001

    def __init__(self) -> None:
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self.TICK)
            self.worst = max(self.worst, time.perf_counter() - t0 - self.TICK)

    def reset(self) -> None:
        self.worst = 0.0

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


E2E_SETUPS = ("shm", "huge", "kept")
BATCH_BYTES = 16 * 2**20


@contextlib.contextmanager
def unmounted_after(path: str):
    """Unmount what aquad mounted at `path` once it has stopped (a mount
    outlives its daemon on purpose: a restarted one adopts its leases)."""
    try:
        yield
    finally:
        if os.path.ismount(path):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.umount2(os.fsencode(path), 2)  # MNT_DETACH


def bench_end_to_end(tmp: str, sizes_mib: list[int], setups: list[str],
                     repeats: int = 5) -> dict[str, dict]:
    """offload() + restore() through a real aquad vs fresh-tensor copies,
    per setup (E2E_SETUPS)."""
    big = max(sizes_mib)
    out = {}
    huge_dir = os.path.join(tmp, "segments")
    for setup in setups:
        # Two devices: a uid may hold half the capacity by default.
        args = ["--host-devices", f"2x{big + 64}MiB"]
        if setup != "shm":
            args += ["--shm-dir", huge_dir, "--shm-mount"]
        keep = 2 * big * 2**20 if setup == "kept" else 0
        with unmounted_after(huge_dir), aquad(tmp, *args) as path, \
                aqua.connect("bench-e2e", 0, socket=path, keep_bytes=keep) as client, \
                StallWatch() as watch:
            with client.lease(2**20) as probe:
                where = probe.handle.get("dir", "/dev/shm")
            huge = huge_setting(where)[1]  # while aquad's mount is there
            rows = [end_to_end_row(client, mib * 2**20, watch, repeats) for mib in sizes_mib]
        out[setup] = {"dir": where, "huge": huge, "keep_bytes": keep, "rows": rows}
        print_end_to_end({setup: out[setup]})
    return out


def end_to_end_row(client: aqua.Client, n: int, watch: StallWatch, repeats: int) -> dict:
    src = torch.randint(0, 255, (n,), dtype=torch.uint8)
    out: list[torch.Tensor] = []

    def via_aqua() -> None:
        out[:] = [client.offload(src).restore()]

    def via_plain() -> None:
        held = torch.empty_like(src)
        held.copy_(src)
        back = torch.empty_like(src)
        back.copy_(held)
        out[:] = [back]

    stalls: dict[str, list[float]] = {"aqua": [], "plain": []}
    times: dict[str, list[float]] = {"aqua": [], "plain": []}
    # Small sizes run a batch per timing (16 at 1 MiB): one call of a tenth
    # of a millisecond is at the mercy of a single preemption on a busy VM.
    batch = max(1, BATCH_BYTES // n)
    for i in range(repeats + 1):  # the first round warms up
        for name, fn in (("aqua", via_aqua), ("plain", via_plain)):
            out.clear()
            watch.reset()
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            elapsed = (time.perf_counter() - t0) / batch
            time.sleep(3 * StallWatch.TICK)  # a stall at the very end is seen too
            if i:
                times[name].append(elapsed)
                stalls[name].append(watch.worst)
            if name == "aqua":
                assert torch.equal(out[0], src), "restore is not bit-exact"
    t_aqua, t_plain = min(times["aqua"]), min(times["plain"])
    row = {"bytes": n, "aqua_ms": t_aqua * 1e3, "plain_ms": t_plain * 1e3,
           "ratio": t_plain / t_aqua, "batch": batch}
    # Median and worst over the repeats: on a loaded 2-CPU machine the
    # scheduler alone makes a sleeping thread late now and then, and the
    # plain row shows how much of that any copy suffers.
    for name, worst in stalls.items():
        worst.sort()
        row[f"stall_{name}_p50_ms"] = worst[len(worst) // 2] * 1e3
        row[f"stall_{name}_max_ms"] = worst[-1] * 1e3
    return row


def print_end_to_end(setups: dict[str, dict]) -> None:
    for name, setup in setups.items():
        print(f"\n {name}: segments in {setup['dir']} (tmpfs huge={setup['huge'] or '-'}), "
              f"client keep_bytes={setup['keep_bytes'] >> 20} MiB")
        print_end_to_end_rows(setup["rows"])


def print_end_to_end_rows(rows: list[dict]) -> None:
    print(f"  {'size':>8} {'aqua ms':>9} {'plain ms':>9} {'ratio':>6} "
          f"{'stall aqua p50/max ms':>21} {'stall plain p50/max ms':>22}")
    for r in rows:
        size = f"{r['bytes'] >> 20} MiB"
        aqua_stall = f"{r['stall_aqua_p50_ms']:.1f} / {r['stall_aqua_max_ms']:.1f}"
        plain_stall = f"{r['stall_plain_p50_ms']:.1f} / {r['stall_plain_max_ms']:.1f}"
        print(f"  {size:>8} {r['aqua_ms']:9.2f} {r['plain_ms']:9.2f} {r['ratio']:6.2f} "
              f"{aqua_stall:>21} {plain_stall:>22}")


def control_rows(control: dict[str, list[float]]) -> dict:
    e = percentiles(control["echo"])
    out = {"echo": e}
    for key in ("heartbeat", "grant", "release"):
        q = percentiles(control[key])
        q["ratio_p50"] = q["p50_us"] / e["p50_us"]
        q["ratio_p99"] = q["p99_us"] / e["p99_us"]
        q["ratio_paired"] = paired_ratio(control[key], control["echo"])
        out[key] = q
    return out


LABELS = {"echo": "raw pyzmq echo", "heartbeat": "heartbeat (no work)", "grant": "lease grant",
          "release": "lease release", "api": "client.lease()+release()"}


def print_rows(rows: dict, echo: dict) -> None:
    print(f"  {'':26} {'p50 us':>8} {'p99 us':>8} {'x p50':>6} {'x p99':>6} {'paired':>6}")
    for key, q in rows.items():
        paired = f"{q['ratio_paired']:6.2f}" if "ratio_paired" in q else \
            ("  1.00" if key == "echo" else "     -")
        print(f"  {LABELS[key]:26} {q['p50_us']:8.1f} {q['p99_us']:8.1f} "
              f"{q['p50_us'] / echo['p50_us']:6.2f} {q['p99_us'] / echo['p99_us']:6.2f} {paired}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--mib", type=int, default=256, help="tensor size for bandwidth")
    parser.add_argument("--layouts", default="split,shared,free",
                        help="CPU layouts for the control path (split, shared, free)")
    parser.add_argument("--e2e-mib", default="1,16,256,2048",
                        help="sizes for the end-to-end offload + restore rows ('' for none)")
    parser.add_argument("--e2e-setups", default=",".join(E2E_SETUPS),
                        help="end-to-end setups: shm, huge, kept (see the module doc)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--aquad-args", default="", metavar="ARGS",
                        help="more aquad flags for the control path, e.g. "
                             "'--metrics 127.0.0.1:9400' (split on spaces)")
    args = parser.parse_args()
    setups = [name for name in args.e2e_setups.split(",") if name]
    if set(setups) - set(E2E_SETUPS):
        parser.error(f"unknown setup(s) {', '.join(sorted(set(setups) - set(E2E_SETUPS)))}; "
                     f"choose from {', '.join(E2E_SETUPS)}")
    torch.set_num_threads(1)  # same for both sides; keeps the ratio stable on 2 cores
    plan = layouts([name for name in args.layouts.split(",") if name])
    out: dict = {"rounds": args.rounds, "layouts": {}}
    print(f"control path, {args.rounds} round trips per row (x = vs the raw echo in the same "
          f"layout; paired = median over chunks of chunk p50 / the echo chunk's just before it)")
    with tempfile.TemporaryDirectory(prefix="aqua-bench-") as tmp:
        for name, (client_cpus, server_cpus) in plan.items():
            rows = control_rows(bench_control(tmp, args.rounds, client_cpus, server_cpus,
                                              tuple(args.aquad_args.split())))
            where = "unpinned" if client_cpus is None else \
                f"client on CPU {min(client_cpus)}, servers on CPU {min(server_cpus)}"
            print(f"\n{name} ({where})")
            print_rows(rows, rows["echo"])
            out["layouts"][name] = {"client_cpus": sorted(client_cpus or []),
                                    "server_cpus": sorted(server_cpus or []), **rows}
        d = bench_api(tmp, args.rounds // 5, args.mib)
    codec = out["codec"] = bench_codec(args.rounds)
    print("\ncodec, a lease grant reply and a lease request alone "
          "(x = vs plain msgpack on the same map)")
    for key, what in (("decode", "client decode to its result"), ("encode", "daemon encode"),
                      ("request", "daemon decode of a request"),
                      ("request_encode", "client encode of a request")):
        c = codec[key]
        print(f"  {what:28} {c['us']:6.2f} us  msgpack {c['msgpack_us']:6.2f} us  "
              f"{c['ratio']:5.2f}x")
    api = percentiles(d["api"])
    out["api"] = api
    print(f"\nfull library call, unpinned: client.lease()+release() p50 {api['p50_us']:.1f} us, "
          f"p99 {api['p99_us']:.1f} us (includes mapping and unmapping the segment)")
    b = d["bandwidth"]
    out["bandwidth"] = b
    print(f"\ndata path, {b['bytes'] >> 20} MiB offload + restore")
    print(f"  through a host lease   {b['lease_gbps']:6.2f} GB/s")
    print(f"  plain in-process copy  {b['plain_gbps']:6.2f} GB/s")
    print(f"  ratio                  {b['ratio']:6.3f}")
    sizes = [int(m) for m in args.e2e_mib.split(",") if m]
    if sizes and setups:
        print("\nend to end: offload() + restore() (lease, map, copy, unmap, release) vs "
              "torch.empty + copy_ twice; best of 5 (per call, in batches of 16 MiB below that)",
              flush=True)
        with tempfile.TemporaryDirectory(prefix="aqua-bench-") as tmp:
            out["end_to_end"] = bench_end_to_end(tmp, sizes, setups)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
