"""Daemon crash and restart under load: bytes lost, time to serve again.

16 tenant processes hold 4 host leases each (64 in all) and churn through
them without pause: restore a lease (checked bit-exact against what was put
there), then offload fresh bytes into a new one. So at any instant some are
mid-offload, some mid-restore. Each cycle SIGKILLs aquad at a random moment
and starts it again on the same socket; tenants reconnect by themselves.

Reported: bytes lost (restores that did not return what was offloaded; goal
0), time from the restart (the new aquad's spawn, and its socket answering)
until every tenant has completed an offload on the new daemon (goal p99 <=
2 s), leases the new daemon kept for adoption vs freed, and shared-memory
segments left once the cycle settles and after the final stop (goal 0).

    .venv/bin/python bench/restart.py [--cycles 50] [--tenants 16] [--leases 64] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time

import aqua_protocol as p
from aqua.client import Connection, wait_for_daemon
from aqua_demo.stats import percentile
from aqua_protocol.paths import segment_prefix

SHM = "/dev/shm"
SETTLE_S = 2.0  # how long the books may take to match the segments after a restart

TENANT = r"""
import json, select, sys, time, torch, aqua
sock, name = sys.argv[1], sys.argv[2]
slots, nbytes, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(1)
client = aqua.connect(tenant=name, device=0, socket=sock)
gen = torch.Generator().manual_seed(seed)
fresh = lambda: torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
want = [fresh() for _ in range(slots)]
saved = [None] * slots

def put(i):
    while True:
        try:
            saved[i] = client.offload(want[i])
            return
        except aqua.DaemonUnavailable:
            client.wait_connected(60)  # the source tensor is still ours: nothing lost

for i in range(slots):
    put(i)
print(json.dumps({"ready": client.id}), flush=True)
last, lost, checked = 0, 0, 0
while not select.select([sys.stdin], [], [], 0)[0]:
    for i in range(slots):
        back = saved[i].restore()  # returns the bytes even if aquad just died
        checked += 1
        if not torch.equal(back, want[i]):
            lost += nbytes
        want[i] = fresh()
        put(i)
        if client.reconnects != last:  # the first offload on a new daemon
            last = client.reconnects
            print(json.dumps({"serving": time.time(), "id": client.id}), flush=True)
    time.sleep(0.002)
print(json.dumps({"lost": lost, "checked": checked}), flush=True)
client.close()
"""

_LEFT = re.compile(r"left \d+ live lease\(s\): (\d+) kept .*?, (\d+) freed")


class Aquad:
    def __init__(self, sock: str, args: list[str]) -> None:
        self.sock, self.args = sock, args
        self.log = open(sock + ".log", "a+")
        self.proc: subprocess.Popen | None = None

    def start(self) -> tuple[float, float]:
        """(spawn time, time its socket answered), both time.time()."""
        spawned = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "aquad", "--socket", self.sock,
                                      *self.args], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_daemon(self.sock, self.proc)
        return spawned, time.time()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop()
        self.log.close()

    def status(self) -> dict:
        conn = Connection(self.sock)
        try:
            return conn.request(p.Status())
        finally:
            conn.close()

    def kept_and_freed(self) -> tuple[int, int]:
        self.log.seek(0)
        found = _LEFT.findall(self.log.read())
        return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(percentile(ordered, 0.5), 3), "p99": round(percentile(ordered, 0.99), 3),
            "max": round(ordered[-1], 3)}


_RECLAIMED = re.compile(r"(\d+) lease\(s\) reclaimed, (\d+) lost")


def tenant_reclaims(sock: str) -> tuple[int, int]:
    """Leases the tenants got back from restarted daemons, and those they
    did not (granted too late to be journaled before the kill)."""
    with open(sock + ".tenants.log") as f:
        found = _RECLAIMED.findall(f.read())
    return sum(int(a) for a, _ in found), sum(int(b) for _, b in found)


def segments_with_pages(sock: str) -> int:
    """Files of this daemon holding pages (spares are sparse until mapped)."""
    prefix, count = segment_prefix(sock), 0
    for f in os.listdir(SHM):
        try:
            count += f.startswith(prefix) and os.stat(os.path.join(SHM, f)).st_blocks > 0
        except FileNotFoundError:
            pass  # unlinked meanwhile: the churn goes on
    return count


def files_left(sock: str) -> int:
    prefix = segment_prefix(sock)
    return sum(1 for f in os.listdir(SHM) if f.startswith(prefix))


def settled(daemon: Aquad, sock: str, timeout: float) -> tuple[dict, int]:
    """Once the churn has settled into the new daemon's books (every segment
    with pages is a lease it knows), or at the deadline: its status, and the
    segments with pages beyond its leases."""
    deadline = time.monotonic() + timeout
    while True:
        status = daemon.status()
        extra = max(0, segments_with_pages(sock) - len(status["leases"]))
        if extra == 0 or time.monotonic() > deadline:
            return status, extra
        time.sleep(0.02)  # the interval of the poll


def read_lines(procs: list[subprocess.Popen], want: str, since: float,
               timeout: float) -> dict[int, dict]:
    """The first line with key `want` (a value >= since, for times) from each process."""
    sel = selectors.DefaultSelector()
    for i, proc in enumerate(procs):
        sel.register(proc.stdout, selectors.EVENT_READ, i)
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(procs) and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            line = key.fileobj.readline()
            if not line:
                sel.unregister(key.fileobj)
                continue
            msg = json.loads(line)
            value = msg.get(want)
            if value is not None and (not isinstance(value, float) or value >= since):
                got.setdefault(key.data, msg)
    sel.close()
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--leases", type=int, default=64, help="in all, spread evenly")
    ap.add_argument("--mib", type=float, default=1.0, help="size of each lease")
    ap.add_argument("--quick", action="store_true", help="3 cycles: a smoke test")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    cycles = 3 if args.quick else args.cycles
    slots = max(1, args.leases // args.tenants)
    nbytes = int(args.mib * 2**20)
    tmp = tempfile.mkdtemp(prefix="aqua-restart-")
    sock = os.path.join(tmp, "aquad.sock")
    daemon = Aquad(sock, ["--backend", "host", "--host-devices", "2x512MiB"])
    daemon.start()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tenant_log = open(sock + ".tenants.log", "w")  # their reconnect warnings
    procs = [subprocess.Popen([sys.executable, "-c", TENANT, sock, f"t{i}", str(slots),
                               str(nbytes), str(i)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=tenant_log, text=True, env=env)
             for i in range(args.tenants)]
    code = 1
    try:
        code = run(args, cycles, slots, nbytes, sock, daemon, procs)
        return code
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        daemon.close()
        tenant_log.close()
        if code == 0:  # otherwise the logs stay for a look
            subprocess.run(["rm", "-rf", tmp], check=False)


def run(args: argparse.Namespace, cycles: int, slots: int, nbytes: int, sock: str,
        daemon: Aquad, procs: list[subprocess.Popen]) -> int:
    rng = random.Random(1)
    assert len(read_lines(procs, "ready", 0, 120)) == len(procs), "tenants did not start"
    from_spawn, from_ready, kept, freed, leftover, leases_seen = [], [], 0, 0, [], []
    for cycle in range(cycles):
        time.sleep(rng.uniform(0.1, 0.4))  # tenants churn; kill at a random moment
        daemon.kill()
        spawned, ready = daemon.start()
        serving = read_lines(procs, "serving", spawned, 60)
        if len(serving) < len(procs):
            print(f"cycle {cycle + 1}: only {len(serving)} of {len(procs)} tenants came back "
                  f"(logs: {sock}.log, {sock}.tenants.log)", file=sys.stderr)
            return 1
        last = max(msg["serving"] for msg in serving.values())
        from_spawn.append(last - spawned)
        from_ready.append(last - ready)
        k, f = daemon.kept_and_freed()
        kept, freed = kept + k, freed + f
        status, extra = settled(daemon, sock, SETTLE_S)
        leases_seen.append(len(status["leases"]))
        leftover.append(extra)
        print(f"cycle {cycle + 1}/{cycles}: all {len(procs)} serving {from_spawn[-1]:.3f} s "
              f"after the restart ({from_ready[-1]:.3f} s after its socket answered); "
              f"kept {k}, freed {f}", flush=True)
    for proc in procs:
        proc.stdin.write("stop\n")
        proc.stdin.flush()
    done = read_lines(procs, "checked", 0, 60)
    for proc in procs:
        proc.wait(timeout=30)
    daemon.stop()
    reclaimed, lost = tenant_reclaims(sock)
    result = {
        "cycles": cycles, "tenants": len(procs), "leases": slots * len(procs),
        "lease_bytes": nbytes,
        "restores_checked": sum(m["checked"] for m in done.values()),
        "bytes_lost": sum(m["lost"] for m in done.values()),
        "serving_after_restart_s": _spread(from_spawn),
        "serving_after_socket_s": _spread(from_ready),
        "leases_kept_for_adoption": kept, "leases_freed_at_restart": freed,
        "leases_reclaimed_by_tenants": reclaimed, "leases_lost_by_tenants": lost,
        "unadopted_segments_after_cycle_max": max(leftover),
        "segments_left_after_stop": files_left(sock),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    ok = result["bytes_lost"] == 0 and result["segments_left_after_stop"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
