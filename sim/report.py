"""Tables and plots of simulation results."""

from __future__ import annotations

import math

from aqua.ctl import table as ctl_table
from aqua_demo.report import figure

from .hardware import GB


def _f(v: float, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table(results: dict[str, dict], baseline: str = "fcfs") -> str:
    """One row per policy; ratios against `baseline` where it ran."""
    base = results.get(baseline)
    head = ("policy", "TTFT p50 s", "TTFT p99 s", "TTFT p99 vs fcfs", "TBT p99 s",
            "tok/s", "tok/s vs fcfs", "Jain", "preempt", "paged NVLink GB",
            "paged peer GB", "paged host GB", "paging stall s", "recomputed Ktok", "done")
    rows = []
    for name, r in results.items():
        tiers = r.get("bytes_by_tier", {})
        ttft_x = base["ttft_p99_s"] / r["ttft_p99_s"] if base and r["ttft_p99_s"] else math.nan
        tput_x = r["throughput_tok_s"] / base["throughput_tok_s"] if base else math.nan
        rows.append((
            name, _f(r["ttft_p50_s"]), _f(r["ttft_p99_s"]), f"{_f(ttft_x, 1)}x",
            _f(r["tbt_p99_s"]), _f(r["throughput_tok_s"], 0), f"{_f(tput_x, 2)}x",
            _f(r["jain"], 2), str(r["preemptions"]),
            _f(tiers.get("nvlink", 0) / GB, 0),
            _f((tiers.get("peer", 0) + tiers.get("local", 0)) / GB, 0),
            _f(tiers.get("host", 0) / GB, 0),
            _f(r["paging_stall_s"], 1), _f(r["recomputed_tokens"] / 1e3, 0),
            f"{r['completed']}/{r['requests']}"))
    return ctl_table(head, rows)


def long_prompt_table(lp: dict) -> str:
    lines = [f"long prompt: {lp['model']}, {lp['prompt_tokens']} tokens, batch 1, "
             f"{lp['offloaded_bytes'] / 2**30:.1f} of {lp['kv_bytes'] / 2**30:.1f} GiB of KV "
             f"cache read back every decode step"]
    for key, label in (("gpu_only_tok_s", "all in GPU memory (bound)"),
                       ("aqua_tok_s", "offloaded to a peer GPU over NVLink (aqua)"),
                       ("host_tok_s", "offloaded to host DRAM over PCIe")):
        if key in lp:
            lines.append(f"  {label:44s} {lp[key]:7.2f} tok/s")
    if "aqua_over_host" in lp:
        lines.append(f"  aqua / host: {lp['aqua_over_host']:.1f}x")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str, title: str) -> None:
    """TTFT and time-between-tokens CDFs, one line per policy."""
    with figure(path, 1, 2, figsize=(11, 4), dpi=110) as (fig, axes):
        for name, r in results.items():
            for ax, key in zip(axes, ("ttft_s", "tbt_s")):
                values = sorted(r.get(key, []))
                if not values:
                    continue
                # At most ~2000 points per line: the shape, not every sample.
                step = max(1, len(values) // 2000)
                xs = values[::step]
                ys = [(i * step + 1) / len(values) for i in range(len(xs))]
                ax.plot(xs, ys, label=name)
        for ax, label in zip(axes, ("time to first token (s)", "time between tokens (s)")):
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("fraction of requests" if "first" in label else "fraction of tokens")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(title)
