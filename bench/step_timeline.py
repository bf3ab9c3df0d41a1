"""Where a burst's time goes: the replay's engines' own step timelines.

Runs one mode of bench/responsiveness.py's burst (`--runs` times) and sums
what every engine timed (aqua.engine.runner.StepTimes) by model and window
of the run: before the burst, its first 150 ms, 150-500 ms, after. Per
window: the model calls by phase against what the profile's fit (each model
timed alone) says they cost, and the steps' time outside their calls, per
page copy for the steps that copied and per step for those that did not.
bench/sim_validate.py compares the runs' totals; this says *when* the
measured costs part from the fitted ones (docs/simulator.md).

    python bench/step_timeline.py [--seed 1] [--mode aqua] [--runs 3] [--save FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from responsiveness import WORKLOAD_DEFAULTS, workload_tenants

from aqua_sim.cpu import DEFAULT_PROFILE, Profile, load_profile

WINDOWS = ((0.0, "before the burst"), (0.150, "burst, first 150 ms"),
           (0.500, "burst, 150-500 ms"), (float("inf"), "after"))


def burst_start(arrivals: Sequence[float], burst: int, within: float = 0.1) -> float:
    """The first arrival from which `burst` arrivals come within `within` s."""
    ts = sorted(arrivals)
    for i in range(len(ts) - burst + 1):
        if ts[i + burst - 1] - ts[i] <= within:
            return ts[i]
    raise ValueError(f"no {burst} arrivals within {within} s")


def window(t: float, burst_t: float) -> str:
    """The window (WINDOWS) of a time `t` s into the run."""
    if t < burst_t:
        return WINDOWS[0][1]
    for end, name in WINDOWS[1:]:
        if t - burst_t < end:
            return name
    raise AssertionError("the last window is open-ended")


def tally(profile: Profile, runs: Sequence[list[dict]], burst_t: float) -> dict:
    """Sums over `runs` (each a list of tenant results, demo/replay.py's
    run_mode) by (model, window): "P"/"d" (prefill/decode calls): [calls,
    seconds, fitted seconds]; "copying": [steps, copies, seconds outside
    calls]; "plain": [steps, seconds outside calls]. Each tenant result
    carries its clock's zero ("start": its first request's arrival less that
    arrival's time in the workload)."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for results in runs:
        for doc in results:
            key = f"llama-{doc['size']}"
            fit = profile.models[key]
            start = doc["start"]
            for t0, t1, tokens, cached in doc["forwards"]:
                acc = out.setdefault((key, window(t0 - start, burst_t)), {})
                prefill = cached == 0
                row = acc.setdefault("P" if prefill else "d", [0.0, 0.0, 0.0])
                row[0] += 1
                row[1] += t1 - t0
                row[2] += (fit.calls("prefill", 1, tokens) if prefill
                           else fit.calls("decode", 1, cached))
            for t0, t1, in_calls, copies, _ in doc["steps"]:
                acc = out.setdefault((key, window(t0 - start, burst_t)), {})
                if copies:
                    row = acc.setdefault("copying", [0.0, 0.0, 0.0])
                    row[0] += 1
                    row[1] += copies
                    row[2] += t1 - t0 - in_calls
                else:
                    row = acc.setdefault("plain", [0.0, 0.0])
                    row[0] += 1
                    row[1] += t1 - t0 - in_calls
    return out


def main() -> int:
    from aqua_demo.replay import run_mode  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=("baseline", "aqua"), default="aqua")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--save", metavar="FILE", help="the runs' timelines, as JSON")
    args = parser.parse_args()
    w = {**WORKLOAD_DEFAULTS, "seed": args.seed}  # responsiveness.py's burst
    tenants, what = workload_tenants(w)
    burst_t = burst_start([a.t for t in tenants for a in t.arrivals], w["burst"])
    runs = []
    for i in range(args.runs):
        results = run_mode(args.mode, tenants, seed=args.seed)
        for spec, doc in zip(tenants, results):
            doc["start"] = doc["requests"][0]["arrival"] - spec.arrivals[0].t
        runs.append(results)
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"workload": w, "mode": args.mode, "runs": runs}, f)
    print(f"{what}, seed {args.seed}, {args.mode}, {args.runs} run(s); the burst at "
          f"{burst_t:.3f} s\n")
    print("| model | window | prefills: n, ms, x fit | decodes: n, ms, x fit "
          "| steps copying: copies, ms outside calls per copy | other steps: n, ms outside "
          "calls |")
    print("|---|---|---|---|---|---|")
    got = tally(load_profile(args.profile), runs, burst_t)
    for (key, win), acc in sorted(got.items(), key=lambda kv: (
            kv[0][0], [name for _, name in WINDOWS].index(kv[0][1]))):
        cells = []
        for phase in ("P", "d"):
            n, s, m = acc.get(phase, (0, 0.0, 0.0))
            cells.append(f"{n:.0f}, {s / n * 1e3:.2f}, {s / m:.2f}x" if n else "-")
        steps, copies, outside = acc.get("copying", (0, 0, 0.0))
        cells.append(f"{copies:.0f}, {outside / copies * 1e3:.2f}" if copies else "-")
        n, outside = acc.get("plain", (0, 0.0))
        cells.append(f"{n:.0f}, {outside / n * 1e3:.2f}" if n else "-")
        print(f"| {key} | {win} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
