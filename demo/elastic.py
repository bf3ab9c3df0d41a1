"""The demo's elastic-memory part: a lender takes its memory back.

Three tenant processes on a private aquad (host backend, three devices):

- the *lender* computes on device 0 and lends spare memory of it (`lend`),
  which makes device 0 the roomiest place for other tenants' offloads;
- two *borrowers* compute on device 1, offload KV-sized tensors (they land
  on the lender's device 0) and keep serving from them: a thread restores
  every tensor and compares it with the original, over and over;
- then the lender's own burst needs its device: it reclaims all of device 0
  with a deadline. aquad closes the device and tells each borrower which
  leases to move; their client libraries move them (to device 2, the next
  best place) while the borrowers keep serving, and the lender's call
  returns the daemon's report once device 0 is empty.

On the host backend every device is a pool of host shared memory, so "the
lender's GPU" and "host memory" are both host pools here; the decisions and
the copies are the real ones. A byte that differs after a move fails the
demo (exit status 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

from aqua.ctl import human_bytes, table
from aqua.testing import PrivateDaemon, private_daemon

from .report import figure

LENDER_DEVICE, BORROWER_DEVICE, SPARE_DEVICE = 0, 1, 2
BORROWERS = ("borrower-a", "borrower-b")
DEADLINE_MS = 10_000  # ample: a reclaim ends as soon as the moves are done


def lender_main(job: dict[str, Any]) -> int:
    """Lend, wait for the burst, reclaim all of the home device, report."""
    import msgspec  # noqa: PLC0415

    import aqua  # noqa: PLC0415

    with aqua.connect(tenant="lender", device=LENDER_DEVICE) as client:
        lent = msgspec.to_builtins(client.lend(job["lend_bytes"]))
        say("LENT", {"t": time.monotonic(), **lent})
        sys.stdin.readline()
        t0 = time.monotonic()
        # The burst needs every byte of the device: what was lent and what
        # aquad had there from the start.
        report = client.reclaim(lent["capacity_bytes"], deadline_ms=DEADLINE_MS)
        t1 = time.monotonic()
        say("RECLAIMED", {"t0": t0, "t1": t1, "report": msgspec.to_builtins(report)})
    return 0


def borrower_main(job: dict[str, Any]) -> int:
    """Offload, serve (restore + compare) until told to stop, verify, report."""
    import torch  # noqa: PLC0415

    import aqua  # noqa: PLC0415

    name = job["name"]
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    per_lease = job["lease_bytes"] // 2  # fp16 elements
    reference = [torch.randn(per_lease, generator=gen).to(torch.float16)
                 for _ in range(job["leases"])]
    moves: list[dict[str, Any]] = []
    checks: list[tuple[float, bool]] = []
    with aqua.connect(tenant=name, device=BORROWER_DEVICE) as client:
        saved = [client.offload(t) for t in reference]
        where = {id(s.lease): s.lease.device for s in saved}

        def on_move(lease: Any) -> None:  # on the client's event thread
            moves.append({"t": time.monotonic(), "tenant": name, "lease": lease.id,
                          "nbytes": lease.nbytes, "from": where[id(lease)],
                          "to": lease.device, "tier": lease.tier})
            where[id(lease)] = lease.device
            if job.get("corrupt") and len(moves) == 1:
                lease.buffer()[0] ^= 0xFF  # the fault the demo must catch

        for s in saved:
            s.lease.on_move = on_move

        def serve_once() -> bool:
            ok = all(torch.equal(s.restore(release=False), r) for s, r in zip(saved, reference))
            checks.append((time.monotonic(), ok))
            return ok

        serve_once()
        stop = threading.Event()

        def serve() -> None:
            while not stop.wait(0.005):  # pacing, so two borrowers leave CPU to the moves
                serve_once()

        server = threading.Thread(target=serve, name="serve")
        server.start()
        say("HOLDING", {"devices": sorted(where.values()),
                         "nbytes": sum(s.nbytes for s in saved)})
        sys.stdin.readline()
        stop.set()
        server.join()
        # The last word: every tensor restored (leases freed) and compared.
        final = all(torch.equal(s.restore(), r) for s, r in zip(saved, reference))
        checks.append((time.monotonic(), final))
        say("RESULT", {"tenant": name, "moves": moves, "checks": checks,
                        "fenced": client.fenced, "evictions": client.evictions})
    return 0 if all(ok for _, ok in checks) else 1


# The demo's tenant processes speak to it in lines `TAG {json}` on stdout
# (their other lines are echoed) and hear single words on stdin.


def say(tag: str, data: dict[str, Any]) -> None:
    print(tag, json.dumps(data), flush=True)


def expect(proc: subprocess.Popen, tag: str) -> dict[str, Any]:
    """The next `tag` line of a tenant; its other lines are echoed."""
    for line in proc.stdout:
        head, _, rest = line.partition(" ")
        if head == tag:
            return json.loads(rest)
        print("   " + line.rstrip(), flush=True)
    raise SystemExit(f"aqua-demo: a tenant exited early (code {proc.wait()})")


def spawn(role: str, job: dict[str, Any], env: dict[str, str]) -> subprocess.Popen:
    """A tenant process: `python -m aqua_demo.main role job-as-json` (main.ROLES)."""
    return subprocess.Popen([sys.executable, "-m", "aqua_demo.main", role, json.dumps(job)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def tell(proc: subprocess.Popen, word: str) -> None:
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


Procs = list[subprocess.Popen]


@contextlib.contextmanager
def aquad_for_tenants(prefix: str, *args: str) -> Iterator[tuple[PrivateDaemon, dict, Procs]]:
    """A private aquad in a fresh directory, the environment its tenant
    processes run in (AQUA_SOCKET names it), and a list for those processes:
    any still running on the way out is killed before aquad stops."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, private_daemon(tmp, *args) as daemon:
        procs: Procs = []
        try:
            yield daemon, dict(os.environ, PYTHONUNBUFFERED="1", AQUA_SOCKET=daemon.socket), procs
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()


def run_elastic(leases: int, lease_mib: int, plot: str, *, corrupt: bool = False) -> int:
    per_borrower = leases * lease_mib << 20
    # Device 2 alone can take both borrowers' leases; the lender lends twice
    # a device's size, so its device is the roomiest until the burst.
    device_bytes = 3 * per_borrower
    lend_bytes = 2 * device_bytes
    print(f"\n== elastic memory: a lender takes its memory back ({len(BORROWERS)} borrowers, "
          f"{leases} leases of {lease_mib} MiB each)", flush=True)
    with aquad_for_tenants("aqua-demo-elastic-", "--host-devices", f"3x{device_bytes}",
                           "--log-level", "warning") as (daemon, env, procs):
        lender = spawn("lender", {"lend_bytes": lend_bytes}, env)
        procs.append(lender)
        lent = expect(lender, "LENT")
        print(f"   [lender] computes on device {LENDER_DEVICE} and lends "
              f"{human_bytes(lent['lent_bytes'])} of it: capacity "
              f"{human_bytes(lent['capacity_bytes'])}", flush=True)
        borrowers = [spawn("borrower", {"name": n, "leases": leases,
                                        "lease_bytes": lease_mib << 20,
                                        "corrupt": corrupt and i == 0}, env)
                     for i, n in enumerate(BORROWERS)]
        procs += borrowers
        for name, proc in zip(BORROWERS, borrowers):
            held = expect(proc, "HOLDING")
            print(f"   [{name}] computes on device {BORROWER_DEVICE}; offloaded "
                  f"{human_bytes(held['nbytes'])} into leases on device(s) "
                  f"{sorted(set(held['devices']))}; serving from them", flush=True)
        print(f"   [lender] a burst: reclaims all of device {LENDER_DEVICE} "
              f"(deadline {DEADLINE_MS} ms)", flush=True)
        tell(lender, "burst")
        burst = expect(lender, "RECLAIMED")
        results = []
        for proc in borrowers:
            tell(proc, "stop")
            results.append(expect(proc, "RESULT"))
        codes = [proc.wait(timeout=60) for proc in procs]
    left = daemon.files()
    report = burst["report"]
    moved = sorted((mv for r in results for mv in r["moves"]), key=lambda mv: mv["t"])
    print("\n" + elastic_table(burst, moved), flush=True)
    checks = [(t, ok) for r in results for t, ok in r["checks"]]
    bad = sum(not ok for _, ok in checks)
    fenced = report["fenced_count"] + sum(r["fenced"] for r in results)
    path = os.path.abspath(plot_moves(burst, results, moved, plot))
    print(f"\n== the move timeline: {path}", flush=True)
    ok = (bad == 0 and fenced == 0 and not any(codes) and not left
          and report["state"] == "done" and len(moved) == len(BORROWERS) * leases
          and report["moved_count"] == len(moved))
    verdict = "bit-exact" if bad == 0 else f"MISMATCH in {bad} of {len(checks)} checks"
    print(f"== borrowers' bytes through the move: {verdict} ({len(checks)} checks); "
          f"shared-memory segments left behind: {len(left)}", flush=True)
    print("== elastic " + ("done" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


def elastic_table(burst: dict[str, Any], moves: list[dict[str, Any]]) -> str:
    """What moved where and when (`moves` in time order), then the reclaim's totals."""
    t0, rep = burst["t0"], burst["report"]
    rows = [(mv["tenant"], mv["lease"][:9], human_bytes(mv["nbytes"]), f"dev {mv['from']}",
             mv["to"], mv["tier"], f"{(mv['t'] - t0) * 1e3:.1f}ms") for mv in moves]
    return (table(("tenant", "lease", "bytes", "from", "to", "tier", "moved at"), rows)
            + f"\nreclaim {rep['reclaim']} of device {rep['device']}: {rep['state']}; "
            f"taken {human_bytes(rep['taken_bytes'])}, moved {rep['moved_count']} "
            f"leases ({human_bytes(rep['moved_bytes'])}), released "
            f"{rep['released_count']}, fenced = {rep['fenced_count']}; "
            f"{rep['elapsed_s'] * 1e3:.1f} ms in aquad, "
            f"{(burst['t1'] - t0) * 1e3:.1f} ms for the lender's call")


def plot_moves(burst: dict[str, Any], results: list[dict[str, Any]],
               moves: list[dict[str, Any]], path: str) -> str:
    """A PNG: borrowed bytes per device over time (top), and each tenant's
    timeline (bottom): serving checks, `moves` (in time order), the lender's
    reclaim."""
    t0 = burst["t0"]
    ms = lambda t: (t - t0) * 1e3  # noqa: E731
    start = min(ms(t) for r in results for t, _ in r["checks"])
    end = max(ms(t) for r in results for t, _ in r["checks"])
    with figure(path, 2, 1, figsize=(8, 5.6), dpi=110, sharex=True,
                gridspec_kw={"height_ratios": [3, 2]}) as (_, (top, bottom)):
        on: dict[int, int] = {LENDER_DEVICE: sum(mv["nbytes"] for mv in moves)}
        series: dict[int, list[tuple[float, int]]] = {LENDER_DEVICE: [(start, on[LENDER_DEVICE])]}
        for mv in moves:
            for dev, delta in ((mv["from"], -mv["nbytes"]), (mv["to"], mv["nbytes"])):
                on[dev] = on.get(dev, 0) + delta
                series.setdefault(dev, [(start, 0)]).append((ms(mv["t"]), on[dev]))
        for dev, points in sorted(series.items()):
            points.append((end, points[-1][1]))
            label = "lender's device" if dev == LENDER_DEVICE else "the next best place"
            top.step([x for x, _ in points], [y / 2**20 for _, y in points], where="post",
                     linewidth=2, label=f"device {dev} ({label})")
        top.axvspan(0, ms(burst["t1"]), color="#f5b041", alpha=0.25, label="lender's reclaim")
        top.set_ylabel("borrowed bytes (MiB)")
        top.legend(loc="center right", fontsize=8)
        top.grid(True, alpha=0.3)
        top.set_title("A lender takes its memory back; the borrowers' leases move")
        lanes = ["lender", *[r["tenant"] for r in results]]
        bottom.broken_barh([(0, ms(burst["t1"]))], (-0.3, 0.6), color="#f5b041")
        for y, r in enumerate(results, start=1):
            ok = [ms(t) for t, good in r["checks"] if good]
            bad = [ms(t) for t, good in r["checks"] if not good]
            bottom.plot(ok, [y] * len(ok), "|", color="#27ae60", markersize=9,
                        label="served bit-exact" if y == 1 else None)
            if bad:
                bottom.plot(bad, [y] * len(bad), "x", color="#c0392b", markersize=9,
                            label="MISMATCH")
            xs = [ms(mv["t"]) for mv in r["moves"]]
            bottom.plot(xs, [y] * len(xs), "v", color="#2471a3", markersize=7,
                        label="lease moved" if y == 1 else None)
        bottom.set_yticks(range(len(lanes)), lanes)
        bottom.set_ylim(-0.7, len(lanes) - 0.3)
        bottom.set_xlabel("ms after the lender's burst began")
        bottom.legend(loc="upper right", fontsize=8, ncol=3)
        bottom.grid(True, axis="x", alpha=0.3)
    return path

