"""Slice hand-over latency: yield acknowledged -> next tenant granted.

Two tenant processes share one device under a short quantum. The holder
spins on respond(); when aquad asks it to yield it sends turn_yield, and the
waiter wakes on its grant. Hand-over = waiter's grant seen - holder's yield
sent (both CLOCK_MONOTONIC on one host), paging excluded (no hooks). Limits,
measured in the same run: the raw ZeroMQ echo round trip back to back and
after idling one quantum, and a hop through a bare ROUTER relay between two
peers idling a quantum (the hand-over's own path without aqua).

    python bench/handover.py [--seconds 5] [--quantum-ms 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from _common import aquad, echo_round_trips, percentiles, relay_hops, write_json

TENANT = """
import json, sys, time, aqua
socket, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = aqua.connect(tenant=name, device=0, socket=socket)
print("ready", flush=True)
sys.stdin.readline()
yields, grants = [], []
end = time.monotonic() + seconds
with client.turn():
    grants.append(client._turn.granted_at)
    while time.monotonic() < end:
        if client.respond():
            yields.append(client._turn.yielded_at)
            grants.append(client._turn.granted_at)
        time.sleep(0.001)  # the engine iteration: on a GPU host the CPU mostly waits
print(json.dumps({"yields": yields, "grants": grants}), flush=True)
client.close()
"""


def handovers(a: dict, b: dict) -> list[float]:
    """For each grant, the time since the other tenant's latest yield before it."""
    out = []
    for mine, theirs in ((a, b), (b, a)):
        yields = sorted(theirs["yields"])
        j = -1
        for g in sorted(mine["grants"]):
            while j + 1 < len(yields) and yields[j + 1] <= g:
                j += 1
            if j >= 0 and g - yields[j] < 0.5:
                out.append(g - yields[j])
    return out


def aqua_handovers(tmp: str, seconds: float, quantum_ms: float) -> list[float]:
    with aquad(tmp, "--quantum-ms", str(quantum_ms), "--grace-ms", "5000") as sock:
        procs = [subprocess.Popen([sys.executable, "-c", TENANT, sock, name, str(seconds)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for name in ("holder-a", "holder-b")]
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        docs = [json.loads(proc.communicate(timeout=seconds + 60)[0]) for proc in procs]
    return handovers(*docs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="aqua time in all")
    parser.add_argument("--quantum-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="limits and aqua alternate this many times (noise hits both)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    pause = args.quantum_ms / 1000
    samples: dict[str, list[float]] = {"echo": [], "idle_echo": [], "relay": [], "aqua": []}
    with tempfile.TemporaryDirectory(prefix="aqua-bench-") as tmp:
        for _ in range(args.rounds):
            samples["echo"] += echo_round_trips(tmp, 2000)
            samples["idle_echo"] += echo_round_trips(tmp, 400, pause=pause)
            samples["relay"] += relay_hops(tmp, pause, rounds=400)
            samples["aqua"] += aqua_handovers(tmp, args.seconds / args.rounds, args.quantum_ms)
    q = {k: percentiles(v) for k, v in samples.items()}
    h = q["aqua"]
    ratio = {f"{pct}_vs_{k}": h[f"{pct}_us"] / q[k][f"{pct}_us"]
             for k in ("echo", "idle_echo", "relay") for pct in ("p50", "p99")}
    print(f"slice hand-over, {h['n']} hand-overs (quantum {args.quantum_ms:g} ms; "
          f"paging excluded; {args.rounds} alternating rounds)")
    print(f"{'':34} {'p50 us':>8} {'p99 us':>8} {'aqua x p50':>10} {'x p99':>6}")
    for key, label in (("echo", "raw echo RTT, back to back"),
                       ("idle_echo", "raw echo RTT after a quantum idle"),
                       ("relay", "raw relay hop after a quantum idle")):
        print(f"{label:34} {q[key]['p50_us']:8.1f} {q[key]['p99_us']:8.1f} "
              f"{ratio['p50_vs_' + key]:10.2f} {ratio['p99_vs_' + key]:6.2f}")
    print(f"{'aqua: yield sent -> next grant':34} {h['p50_us']:8.1f} {h['p99_us']:8.1f}")
    if args.json:
        write_json(args.json, {**q, "ratio": ratio, "quantum_ms": args.quantum_ms})
    return 0


if __name__ == "__main__":
    sys.exit(main())
