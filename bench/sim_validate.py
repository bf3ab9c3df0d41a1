"""The calibrated simulator against bench/responsiveness.py's measurements.

For every saved measurement (bench/profiles/measured/*.json, each written by
`bench/responsiveness.py --json`, naming its workload), the simulator
replays the same workload with the CPU profile's costs (aqua_sim.cpu) and a
table compares TTFT p50/p99 per mode (bound 20 %), preemptions and KV bytes
paged (bound 10 %), and the baseline/aqua TTFT ratios (within the repeats'
spread where a workload was measured more than once, else 20 %). Repeats of
a workload (same flags) are averaged, and so are the simulator's draws
(`--draws`, each forward's cost scattered as calibration measured; 0: one
run at the mean costs). The table gives the measured mean's standard error
beside the prediction's error.

    python bench/sim_validate.py [--profile bench/profiles/cpu-llama.json] [--draws N]
                                 [FILE.json ...]
    python bench/sim_validate.py --fit FILE.json [FILE.json ...]

`--fit` takes two things from the named runs only, and writes them into the
profile with the files they came from (the other measurements are held out):
what a page copy cost inside them (aqua_sim.cpu.copy_cost, from the engines'
own timing of their steps: timed alone, a copy and a lease round trip cost
a fraction of what they cost while three tenants and aquad share the cores),
and then the one free parameter, the load factor (how much dearer compute
was in the measured runs than when bench/calibrate.py timed it), by TTFT
p50/p99 of both modes.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys

from responsiveness import workload_tenants

from aqua_sim.cpu import (
    DEFAULT_PROFILE,
    PROFILES,
    call_costs,
    compare,
    copy_cost,
    load_profile,
    other_work,
    predict,
)

MEASURED = os.path.join(PROFILES, "measured")


def natural(path: str) -> list:
    """A sort key that puts run i9 before i10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def group(paths: list[str]) -> dict[str, list[dict]]:
    """Measurements by workload (the flags that made them), in file order."""
    out: dict[str, list[dict]] = {}
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        doc["file"] = os.path.basename(path)
        out.setdefault(json.dumps(doc["workload"], sort_keys=True), []).append(doc)
    return out


def fit_load_factor(profile, paths: list[str], draws: int) -> tuple[float, float]:
    """The load factor (0.5-4, log grid) that minimises the mean |log|
    error of the TTFT figures on `paths`; and that error."""
    groups = [(workload_tenants(json.loads(k))[0], docs) for k, docs in group(paths).items()]
    best = (math.inf, 1.0)
    for i in range(61):
        factor = 0.5 * 8 ** (i / 60)
        trial = dataclasses.replace(profile, load_factor=factor)
        errs = [abs(math.log(r.predicted / r.measured)) for tenants, docs in groups
                for r in compare(docs, predict(tenants, trial, draws=draws))
                if r.figure.startswith("TTFT") and r.spread is None
                and r.measured > 0 and r.predicted > 0]
        best = min(best, (sum(errs) / len(errs), factor))
    return best[1], best[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--fit", nargs="+", metavar="FILE")
    parser.add_argument("--draws", type=int, default=0,
                        help="simulator draws with scattered step costs, averaged (default 0: "
                             "one run at the mean costs; 30 was tried, docs/simulator.md)")
    parser.add_argument("files", nargs="*")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    if args.fit:
        runs = [doc for docs in group(args.fit).values() for doc in docs]
        try:
            copy_s, copies = copy_cost(runs)
        except ValueError as exc:
            print(f"--fit: {exc}", file=sys.stderr)
            return 2
        factor, err = fit_load_factor(dataclasses.replace(profile, load_factor=1.0,
                                                          run_copy_s=copy_s),
                                      args.fit, args.draws)
        doc = dict(profile.doc)
        doc["fit"] = {"load_factor": factor, "mean_abs_log_error": err,
                      "copy_s": copy_s, "copies": copies,
                      "files": [os.path.basename(p) for p in args.fit], "draws": args.draws,
                      "command": f"python bench/sim_validate.py --draws {args.draws} --fit "
                                 + " ".join(os.path.relpath(p) for p in args.fit)}
        with open(args.profile, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"a page copy in those runs: {copy_s * 1e3:.2f} ms ({copies} copies; timed alone "
              f"{profile.copy_latency_s * 1e3:.2f} ms + a {profile.lease_rtt_s * 1e3:.2f} ms "
              f"lease round trip); load factor {factor:.3f} (mean |log error| {err:.3f}) on "
              f"{', '.join(doc['fit']['files'])}: written to {args.profile}")
        profile = load_profile(args.profile)
    paths = args.files or sorted(glob.glob(os.path.join(MEASURED, "*.json")), key=natural)
    if not paths:
        print(f"no measurements in {MEASURED}", file=sys.stderr)
        return 2
    fitted = profile.doc.get("fit", {}).get("files", [])
    print(f"profile {os.path.relpath(args.profile)} ({profile.doc['date']}, "
          f"load {profile.doc['machine']['loadavg_before'][0]:.1f}); load factor "
          f"{profile.load_factor:.3f}" + (f" fitted on {', '.join(fitted)}" if fitted else "")
          + ("" if profile.run_copy_s is None
             else f"; a page copy {profile.run_copy_s * 1e3:.2f} ms, as those runs paid it")
          + (f"; mean of {args.draws} simulator draws" if args.draws > 0
             else "; one simulator run at the mean costs"))
    misses = wide = 0
    for key, docs in group(paths).items():
        w = json.loads(key)
        tenants, what = workload_tenants(w)
        rows = compare(docs, predict(tenants, profile, draws=args.draws))
        loads = ", ".join(f"{d['loadavg_before'][0]:.1f}" for d in docs)
        shares = [other_work(d) for d in docs]
        others = ", ".join("?" if x is None else f"{x:.0%}" for x in shares)
        role = "fit" if any(d["file"] in fitted for d in docs) else "held out"
        print(f"\n### {what}, seed {w['seed']} ({role}): {len(docs)} run(s) "
              f"({', '.join(d['file'] for d in docs)}; load average {loads}; "
              f"other work {others} of the CPU)\n")
        print("| figure | measured (mean) | mean's s.e. | runs' spread | predicted | error "
              "| bound | ok |")
        print("|---|---:|---:|---:|---:|---:|---|---|")
        for r in rows:
            judged = r.spread is not None and r.spread[1] > r.spread[0]
            bound = (f"spread {r.spread[0]:.2f}-{r.spread[1]:.2f}" if judged
                     else f"{r.bound or 0.2:.0%}")
            # The runs' own spread ((max - min) / mean), flagged where it is
            # wider than the bound the prediction is held to.
            over = not judged and len(r.runs) > 1 and r.run_spread > (r.bound or 0.2)
            spread = f"{r.run_spread:.0%}" + (" (> bound)" if over else "") \
                if len(r.runs) > 1 else "1 run"
            sem = f"{r.sem:.0%}" if len(r.runs) > 1 else "-"
            print(f"| {r.figure} | {r.measured:.2f} | {sem} | {spread} | {r.predicted:.2f} | "
                  f"{r.error:+.0%} | {bound} | {'yes' if r.ok else '**no**'} |")
            misses += not r.ok
            wide += over
        timed = sum("cost_sums" in d["baseline"] for d in docs)
        if timed:
            # The cost model itself, against the engines' own timing of
            # every model call in these runs.
            print(f"\nModel calls ({timed} of the runs timed them), measured over what the "
                  "simulator charges, by tenants with work:")
            for mode in ("baseline", "aqua"):
                # All models, then each: one load factor for all of them
                # cannot be right where they slow down differently.
                for model in (None, *profile.models):
                    by_busy = call_costs(profile, docs, mode, model)
                    if not by_busy:  # a model these runs did not run
                        continue
                    n, s, m = (sum(v[i] for v in by_busy.values()) for i in range(3))
                    print(("- " if model is None else "  - ") + f"{mode}"
                          + ("" if model is None else f", {model}") + ": "
                          + ", ".join(f"{b}: {sb / mb:.2f}x ({nb} calls)"
                                      for b, (nb, sb, mb) in by_busy.items())
                          + f"; all: {s / m:.2f}x")
    print(f"\n{misses} figure(s) outside their bound; {wide} figure(s) whose repeats alone "
          "spread wider than the bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
