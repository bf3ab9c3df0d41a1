"""The comparison table and the TTFT CDF plot of a baseline-vs-aqua run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

ROWS = (
    # key, label, unit scale, better when lower (None: a count, no gain shown)
    ("ttft_p50_s", "TTFT p50 (ms)", 1e3, True),
    ("ttft_p99_s", "TTFT p99 (ms)", 1e3, True),
    ("tbt_p50_s", "time between tokens p50 (ms)", 1e3, True),
    ("tbt_p99_s", "time between tokens p99 (ms)", 1e3, True),
    ("throughput_tok_s", "throughput (tokens/s)", 1.0, False),
    ("jain", "Jain fairness, prompts", 1.0, False),
    ("jain_tenants", "Jain fairness, tenants", 1.0, False),
    ("bytes_paged", "KV bytes paged (MiB)", 1 / 2**20, None),
    ("preemptions", "preemptions", 1.0, None),
    ("completed", "requests completed", 1.0, None),
)


def table(summary: dict[str, dict]) -> str:
    """Rows of metrics; columns baseline, aqua and the factor aqua gains."""
    base, aqua = summary["baseline"], summary["aqua"]
    lines = [f"{'':32} {'baseline':>10} {'aqua':>10} {'aqua gain':>10}",
             f"{'-' * 32} {'-' * 10} {'-' * 10} {'-' * 10}"]
    for key, label, scale, lower in ROWS:
        b, a = base[key] * scale, aqua[key] * scale
        over, under = (b, a) if lower else (a, b)
        gain = "" if lower is None else f"{over / under:.2f}x" if under else "-"
        fmt = "{:10.0f}" if key in ("preemptions", "completed") else "{:10.2f}"
        lines.append(f"{label:32} {fmt.format(b)} {fmt.format(a)} {gain:>10}")
    return "\n".join(lines)


@contextlib.contextmanager
def figure(path: str, *args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """A matplotlib figure and its axes (plt.subplots' arguments), laid out
    and written to `path` as a PNG when the block ends. matplotlib is
    imported only here: only a run that asks for a plot needs it."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def plot_ttft_cdf(summary: dict[str, dict], path: str) -> str:
    """Write a PNG with the TTFT CDF of each mode; returns its path."""
    with figure(path, figsize=(7, 4.2), dpi=110) as (_, ax):
        for mode, color in (("baseline", "#c0392b"), ("aqua", "#2471a3")):
            xs = [t * 1e3 for t in summary[mode]["ttft_s"]]
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", color=color, linewidth=2,
                    label=f"{mode}: p99 {summary[mode]['ttft_p99_s'] * 1e3:.0f} ms")
        ax.set_xscale("log")
        ax.set_xlabel("time to first token (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.01)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title("Time to first token under a burst")
    return path
