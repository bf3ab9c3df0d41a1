"""How well bench/responsiveness.py's measurements repeat: two sets of the
same workloads, measured apart in time with the same code, side by side.

For every workload both sets measured, each figure sim_validate.py holds
the simulator to (TTFT p50/p99 per mode, preemptions, KV bytes paged, the
baseline/aqua TTFT ratios): each set's mean and its standard error, the
second over the first, and that difference in standard errors. Then two
verdicts, by sim_validate's own rule (aqua_sim.cpu.Row: within 20 % or 10 %
of the measured mean, a ratio inside the runs' spread):

- whether the first set's mean, taken as the prediction, passes against
  the second set: what a simulator that reproduced the first set exactly
  would score on the second;
- whether any one prediction could pass against both sets (for a 20 %
  bound: the larger mean at most 1.5x the smaller). Where none could, the
  machine, not the model, is the limit.

    python bench/repeatability.py --first FILE.json ... --second FILE.json ...
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass

from sim_validate import group

from aqua_sim.cpu import TIME_BOUND, Row, compare


def sem(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def one_value_fits(a: float, b: float, bound: float) -> bool:
    """Whether some prediction p is within `bound` (relative) of both means:
    |p - m| <= bound * m for m = a and b, which holds for some p iff the
    larger times (1 - bound) is at most the smaller times (1 + bound)."""
    lo, hi = sorted((a, b))
    if hi == 0:
        return True  # both zero: a zero prediction
    return lo > 0 and hi * (1 - bound) <= lo * (1 + bound)


def accepted(values: list[float]) -> tuple[float, float]:
    """The predictions sim_validate accepts for a ratio measured as
    `values`: their spread, or (repeats that agree) the time bound around
    their mean."""
    lo, hi = min(values), max(values)
    if hi > lo:
        return lo, hi
    return lo * (1 - TIME_BOUND), hi * (1 + TIME_BOUND)


@dataclass(frozen=True)
class SetRow:
    # sim_validate's own row with the second set as the measurement and the
    # first set's runs in the place of the simulator's draws (compare_sets).
    row: Row

    @property
    def figure(self) -> str:
        return self.row.figure

    @property
    def first(self) -> list[float]:
        return list(self.row.draws)

    @property
    def second(self) -> list[float]:
        return list(self.row.runs)

    @property
    def bound(self) -> float | None:
        """Relative; None: judged against the second set's spread."""
        return self.row.bound

    @property
    def means(self) -> tuple[float, float]:
        return statistics.fmean(self.first), statistics.fmean(self.second)

    @property
    def apart_se(self) -> float:
        """The second mean less the first, in their combined standard error."""
        (a, b), se = self.means, math.hypot(sem(self.first), sem(self.second))
        return (b - a) / se if se > 0 else (0.0 if a == b else math.copysign(math.inf, b - a))

    @property
    def predicts(self) -> bool:
        """Whether the first set's mean, taken as the prediction, passes
        against the second set exactly as sim_validate.py judges the
        simulator's (aqua_sim.cpu.Row): what a model that reproduced the
        first set exactly would score on the second."""
        a, b = self.means
        spread = None if self.bound is not None else (min(self.second), max(self.second))
        return Row(self.figure, b, a, self.bound, spread, runs=tuple(self.second)).ok

    @property
    def fits(self) -> bool:
        """Whether one prediction could pass against both sets."""
        if self.bound is not None:
            return one_value_fits(*self.means, self.bound)
        (lo1, hi1), (lo2, hi2) = accepted(self.first), accepted(self.second)
        return max(lo1, lo2) <= min(hi1, hi2)


def compare_sets(first: list[dict], second: list[dict]) -> list[SetRow]:
    """Both sets' runs of one workload, figure by figure: sim_validate's
    comparison (aqua_sim.cpu.compare) with the first set's runs as the
    prediction of the second's."""
    return [SetRow(row) for row in compare(second, first)]


def span(docs: list[dict]) -> str:
    """When a set's runs began: first to last (ISO dates, UTC)."""
    dates = sorted(d["date"] for d in docs)
    return f"{dates[0][:10]} {dates[0][11:16]} to {dates[-1][11:16]} UTC"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", nargs="+", required=True, metavar="FILE")
    parser.add_argument("--second", nargs="+", required=True, metavar="FILE")
    args = parser.parse_args()
    first, second = group(args.first), group(args.second)
    both = [k for k in first if k in second]
    if not both:
        print("the two sets measured no workload in common", file=sys.stderr)
        return 2
    apart = unmet = compared = 0
    for key in both:
        a, b = first[key], second[key]
        w = json.loads(key)
        what = (f"{w['trace']} trace, {w['requests']} requests x{w['time_scale']:g}" if w["trace"]
                else f"burst, {w['requests']} requests, a burst of {w['burst']}")
        print(f"\n### {what}, seed {w['seed']}: {len(a)} runs ({span(a)}) and {len(b)} runs "
              f"({span(b)})\n")
        print("| figure | first: mean (s.e.) | second: mean (s.e.) | second / first "
              "| apart, in s.e. | the first's mean passes against the second | one value could "
              "pass against both |")
        print("|---|---:|---:|---:|---:|---|---|")
        for row in compare_sets(a, b):
            ma, mb = row.means
            apart += not row.fits
            unmet += not row.predicts
            compared += 1
            if ma == 0 and mb == 0:
                print(f"| {row.figure} | 0 | 0 | - | - | yes | yes |")
                continue
            rel = [f"{sem(v) / m:.0%}" if m else "-" for v, m in ((row.first, ma),
                                                                  (row.second, mb))]
            print(f"| {row.figure} | {ma:.2f} ({rel[0]}) | {mb:.2f} ({rel[1]}) | "
                  + (f"{mb / ma:.2f}" if ma else "-") + f" | {row.apart_se:+.1f} | "
                  f"{'yes' if row.predicts else '**no**'} "
                  + ("(spread)" if row.bound is None else f"({row.bound:.0%})") + " | "
                  f"{'yes' if row.fits else '**no**'} |")
    print(f"\n{unmet} of {compared} figures: the first set's mean, taken as the prediction, "
          f"fails against the second set; {apart}: no one prediction could pass against both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
