"""Summary statistics shared by the replay, the simulator and the benchmarks."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of sorted values; NaN when empty."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one gets everything."""
    values = [v for v in values if v > 0]
    if not values:
        return math.nan
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


def token_rate(arrival: float, times: Sequence[float]) -> float:
    """A request's tokens over its time in the system (0 if it has none yet)."""
    span = times[-1] - arrival if times else 0.0
    return len(times) / span if span > 0 else 0.0


def service_summary(requests: Iterable[tuple[float, Sequence[float]]]) -> dict:
    """Latency, throughput and fairness of requests given as (arrival, token
    times): TTFT = first token - arrival; time between tokens = gaps between a
    request's tokens; throughput = all tokens / (last token - first arrival);
    Jain over each request's token rate. The raw samples (`ttft_s`, `tbt_s`,
    sorted) come along for plots."""
    reqs = list(requests)
    ttft = sorted(times[0] - arrival for arrival, times in reqs if times)
    tbt = sorted(b - a for _, times in reqs for a, b in zip(times, times[1:]))
    tokens = sum(len(times) for _, times in reqs)
    first = min((arrival for arrival, _ in reqs), default=0.0)
    last = max((times[-1] for _, times in reqs if times), default=first)
    return {
        "ttft_p50_s": percentile(ttft, 0.50), "ttft_p99_s": percentile(ttft, 0.99),
        "tbt_p50_s": percentile(tbt, 0.50), "tbt_p99_s": percentile(tbt, 0.99),
        "throughput_tok_s": tokens / (last - first) if last > first else 0.0,
        "jain": jain([token_rate(arrival, times) for arrival, times in reqs]),
        "tokens": tokens,
        "makespan_s": last - first,
        "ttft_quantiles_s": _quantiles(ttft),
        "tbt_quantiles_s": _quantiles(tbt),
        "ttft_s": ttft,
        "tbt_s": tbt,
    }


def _quantiles(ordered: Sequence[float]) -> dict[str, float]:
    """The QUANTILES of sorted values, keyed 'p10' .. 'p99.9'; {} when empty."""
    return {f"p{q * 100:g}": percentile(ordered, q) for q in QUANTILES} if ordered else {}


def cost_sums(tenants: Sequence[dict]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """What each tenant's model calls and steps cost in a run (the engine's
    StepTimes), summed by how many tenants had work when each began (a
    tenant has work from a request's arrival to its last token): per model,
    "prefill" (x: tokens in; a recompute counts) and "decode" (x: tokens
    cached) as {busy: [n, sum x, sum x^2, sum y, sum xy]} with y the call's
    seconds, enough for a least-squares line per count; and "steps" as
    {busy: [n, sum pages copied, sum bytes copied, sum seconds outside
    model calls]}; "idle_arrivals" (work arriving at an engine with none) as
    {busy: [n, sum seconds until its first step, sum seconds of that step's
    first model call, sum of that call's tokens]}. `tenants`: the replay's
    tenant documents."""
    spans = []  # per tenant, its times with work: (starts, ends), disjoint, in order
    for doc in tenants:
        starts: list[float] = []
        ends: list[float] = []
        for a, last in sorted((r["arrival"], r["times"][-1]) for r in doc["requests"]
                              if r["times"]):
            if ends and a <= ends[-1]:
                ends[-1] = max(ends[-1], last)
            else:
                starts.append(a)
                ends.append(last)
        spans.append((starts, ends))

    def busy(t: float) -> str:
        n = 0
        for starts, ends in spans:
            i = bisect.bisect_right(starts, t) - 1
            n += i >= 0 and t <= ends[i]
        return str(n)

    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for doc, (span_starts, _) in zip(tenants, spans):
        sums: dict[str, dict[str, list[float]]] = {"prefill": {}, "decode": {}, "steps": {}}
        for t0, t1, tokens, cached in doc["forwards"]:
            x, y = tokens if cached == 0 else cached, t1 - t0
            row = sums["prefill" if cached == 0 else "decode"].setdefault(busy(t0), [0.0] * 5)
            for i, v in enumerate((1.0, x, x * x, y, x * y)):
                row[i] += v
        for t0, t1, model_s, copies, nbytes in doc["steps"]:
            row = sums["steps"].setdefault(busy(t0), [0.0] * 4)
            for i, v in enumerate((1.0, copies, nbytes, t1 - t0 - model_s)):
                row[i] += v
        # Work arriving at an idle engine: how long until its first step
        # began (the tenant's poll loop waking), and that step's first
        # model call (a prefill, on caches other processes had meanwhile).
        sums["idle_arrivals"] = {}
        step_starts = [s[0] for s in doc["steps"]]
        call_starts = [f[0] for f in doc["forwards"]]
        for a in span_starts:
            i, j = bisect.bisect_left(step_starts, a), bisect.bisect_left(call_starts, a)
            if i == len(step_starts) or j == len(call_starts):
                continue
            f0, f1, tokens, _ = doc["forwards"][j]
            row = sums["idle_arrivals"].setdefault(busy(a), [0.0] * 4)
            for k, v in enumerate((1.0, step_starts[i] - a, f1 - f0, tokens)):
                row[k] += v
        out[f"llama-{doc['size']}"] = sums
    return out
