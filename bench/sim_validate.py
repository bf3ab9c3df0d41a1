"""The calibrated simulator against bench/responsiveness.py's measurements.

For every saved measurement (bench/profiles/measured/*.json, each written by
`bench/responsiveness.py --json`, naming its workload), the simulator
replays the same workload with the CPU profile's costs (aqua_sim.cpu) and a
table compares TTFT p50/p99 per mode (bound 20 %), preemptions and KV bytes
paged (bound 10 %), and the baseline/aqua TTFT ratios (within the repeats'
spread where a workload was measured more than once, else 20 %). Repeats of
a workload (same flags) are averaged.

    python bench/sim_validate.py [--profile bench/profiles/cpu-llama.json] [FILE.json ...]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from responsiveness import workload_tenants

from aqua_sim.cpu import DEFAULT_PROFILE, PROFILES, compare, load_profile, predict

MEASURED = os.path.join(PROFILES, "measured")


def group(paths: list[str]) -> dict[str, list[dict]]:
    """Measurements by workload (the flags that made them), in file order."""
    out: dict[str, list[dict]] = {}
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        doc["file"] = os.path.basename(path)
        out.setdefault(json.dumps(doc["workload"], sort_keys=True), []).append(doc)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("files", nargs="*")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    paths = args.files or sorted(glob.glob(os.path.join(MEASURED, "*.json")))
    if not paths:
        print(f"no measurements in {MEASURED}", file=sys.stderr)
        return 2
    print(f"profile {os.path.relpath(args.profile)} ({profile.doc['date']}, "
          f"load {profile.doc['machine']['loadavg_before'][0]:.1f})")
    misses = 0
    for key, docs in group(paths).items():
        w = json.loads(key)
        tenants, what = workload_tenants(w)
        rows = compare(docs, predict(tenants, profile))
        loads = ", ".join(f"{d['loadavg_before'][0]:.1f}" for d in docs)
        print(f"\n### {what}, seed {w['seed']}: {len(docs)} run(s) "
              f"({', '.join(d['file'] for d in docs)}; load average {loads})\n")
        print("| figure | measured | predicted | error | bound | ok |")
        print("|---|---:|---:|---:|---|---|")
        for r in rows:
            bound = (f"spread {r.spread[0]:.2f}-{r.spread[1]:.2f}"
                     if r.spread and r.spread[1] > r.spread[0] else f"{r.bound or 0.2:.0%}")
            print(f"| {r.figure} | {r.measured:.2f} | {r.predicted:.2f} | {r.error:+.0%} | "
                  f"{bound} | {'yes' if r.ok else '**no**'} |")
            misses += not r.ok
    print(f"\n{misses} figure(s) outside their bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
