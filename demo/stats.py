"""Summary statistics shared by the replay, the simulator and the benchmarks."""

from __future__ import annotations

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
