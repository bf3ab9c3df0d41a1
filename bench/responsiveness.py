"""Responsiveness under a burst: baseline (fcfs + admission control) vs aqua.

Real tenant processes (small Llama models of three sizes on the CPU, seeded
random weights) replay the same arrivals twice: once as vLLM-style engines
do under a burst (requests that do not fit wait; no preemption), once with
aqua (prompt-level fair time sharing, preempted KV caches paged into leases
of a real aquad). The table compares TTFT, time between tokens, throughput,
Jain's fairness and bytes paged; `--json FILE` writes both summaries.

    python bench/responsiveness.py [--requests 26] [--burst 18] [--max-new 40] [--seed 0]
                                   [--trace conv|code --time-scale 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime

from aqua_demo.replay import compare, default_tenants, trace_tenants
from aqua_demo.report import plot_ttft_cdf, table

TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces")
# The flags that make a workload, and their defaults (the burst).
WORKLOAD_DEFAULTS = {"requests": 26, "burst": 18, "max_new": 40, "concurrency": 3, "seed": 0,
                     "trace": None, "time_scale": 4.0}
WORKLOAD_KEYS = tuple(WORKLOAD_DEFAULTS)


def cpu_ticks() -> dict[str, int]:
    """The machine's CPU time so far by kind (/proc/stat, clock ticks; {}
    where there is none): over a run, "nice" is what other users' niced
    work took, "steal" what the hypervisor gave elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:9]
    except OSError:
        return {}
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"),
                    map(int, fields)))


def autogroup_nice() -> int | None:
    """This process's scheduling group's nice (Linux autogroups: the CPU is
    shared fairly between sessions whatever their processes' own nice, so
    other users' `nice -n 19` work does not yield to a measurement unless
    their group's nice is raised or this one's lowered)."""
    try:
        with open("/proc/self/autogroup") as f:
            return int(f.read().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return None


def workload_tenants(w: dict) -> tuple[list, str]:
    """The tenants a workload (WORKLOAD_KEYS, as the flags give them)
    replays, and a line that says what it is."""
    if w["trace"]:
        path = os.path.join(TRACES, f"azure-llm-2023-{w['trace']}.csv")
        tenants = trace_tenants(path, w["requests"], time_scale=w["time_scale"],
                                seed=w["seed"], max_new=w["max_new"],
                                concurrency=w["concurrency"])
        return tenants, (f"Azure 2023 {w['trace']} trace, {w['requests']} requests per tenant, "
                         f"{w['time_scale']:g}x faster, prompts /10, outputs /8")
    tenants = default_tenants(w["requests"], w["burst"], w["seed"],
                              max_new=w["max_new"], concurrency=w["concurrency"])
    return tenants, (f"{w['requests']} requests per tenant, a burst of {w['burst']}, "
                     f"{w['max_new']} new tokens each")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = WORKLOAD_DEFAULTS
    parser.add_argument("--requests", type=int, default=d["requests"], help="per tenant (load)")
    parser.add_argument("--burst", type=int, default=d["burst"],
                        help="of those, arriving together")
    parser.add_argument("--max-new", type=int, default=d["max_new"],
                        help="tokens generated per request")
    parser.add_argument("--concurrency", type=int, default=d["concurrency"],
                        help="requests a tenant's KV budget holds at once")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--trace", choices=("conv", "code"),
                        help="replay an Azure 2023 trace instead of a synthetic burst")
    parser.add_argument("--time-scale", type=float, default=d["time_scale"],
                        help="with --trace: arrivals this many times faster than recorded")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--plot", metavar="PNG", default="ttft-cdf.png")
    args = parser.parse_args()
    workload = {k: getattr(args, k) for k in WORKLOAD_KEYS}
    tenants, what = workload_tenants(workload)
    print(f"{len(tenants)} tenants ({', '.join(t.name for t in tenants)}); {what}", flush=True)
    load_before = os.getloadavg()
    ticks_before = cpu_ticks()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    result = compare(tenants, seed=args.seed, progress=True)
    print(table(result))
    print(f"\nwall time {result['wall_s']:.0f} s (both modes)")
    print(f"TTFT CDFs: {os.path.abspath(plot_ttft_cdf(result, args.plot))}")
    if args.json:
        with open(args.json, "w") as f:
            # What made it, so the simulator can replay the same workload
            # (bench/sim_validate.py) and a reader can judge the load.
            json.dump({"command": "python bench/responsiveness.py " + " ".join(sys.argv[1:]),
                       "date": started, "workload": workload, "wall_s": result["wall_s"],
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                       # What the whole machine did meanwhile (this run is
                       # "user"; other engineers' niced tests "nice").
                       "cpu_ticks": {k: v - ticks_before.get(k, 0)
                                     for k, v in cpu_ticks().items()},
                       "autogroup_nice": autogroup_nice(),
                       # Every TTFT (sorted), so a tail can be compared whole.
                       **{mode: {k: v for k, v in result[mode].items() if k != "tbt_s"}
                          for mode in ("baseline", "aqua")}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
