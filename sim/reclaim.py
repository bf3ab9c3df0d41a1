"""A lender's load step: a producer GPU's own model takes its spare memory back.

At `at_s` the model on producer GPU `gpu` needs `nbytes` of the memory it
lent (its own load rose). It is a tenant on that GPU and sends `reclaim`
for its home device with a deadline, to the same Arbiter the daemon runs.
aquad closes the device and tells each borrower (a consumer engine) which of
its leases to move; the engines move them as the client library does
(`move`: a replacement on the next-best tier, another peer else host; a
copy over the fabric; `release` of the old lease) and what is not moved by
the deadline is fenced: its bytes are lost and the request they belonged to
is recomputed when it resumes. `reclaim_cost` runs the scenario with and
without the step and says what the reclaim cost the borrowers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aqua_demo.stats import percentile, service_summary
from aqua_protocol import messages as m
from aquad.core.tenants import Peer

from .hardware import GB

if TYPE_CHECKING:
    from .simulator import Scenario, Simulation


@dataclass(frozen=True)
class LoadStep:
    at_s: float  # virtual time of the step
    nbytes: int | None = None  # capacity taken back; None: all the GPU lends
    gpu: int | None = None  # the producer GPU; None: the one lending most at at_s
    deadline_s: float = 2.0  # aquad's default reclaim deadline

    def __post_init__(self) -> None:
        if not (self.at_s >= 0 and math.isfinite(self.at_s)):
            raise ValueError(f"reclaim time must be >= 0, got {self.at_s}")
        if self.nbytes is not None and self.nbytes <= 0:
            raise ValueError(f"reclaim bytes must be > 0, got {self.nbytes}")
        if not 0 < self.deadline_s <= 600:
            raise ValueError(f"reclaim deadline must be in (0, 600] s, got {self.deadline_s}")


class Lender:
    """The producer GPU's own model: a tenant there that takes memory back."""

    def __init__(self, sim: Simulation, step: LoadStep, index: int) -> None:
        self.sim = sim
        self.step = step
        self.conn = f"lender-{index}".encode()
        self.peer = Peer(pid=200_000 + index, uid=0, gid=0)
        self._ids = iter(range(1, 1 << 62))
        self.gpu: int | None = None
        self.reply: dict[str, Any] | None = None
        self.report: dict[str, Any] | None = None
        self.done_at: float | None = None
        sim.at(step.at_s, self._load_step)

    def call(self, op: m.Op) -> dict:
        return self.sim.arbiter.handle(self.conn, self.peer, m.Request(next(self._ids), op)).result

    def _load_step(self, _: Any) -> None:
        pools = self.sim.arbiter.pools
        lenders = sorted(self.sim.scenario.spare)
        gpu = self.step.gpu
        if gpu is None:  # the lender whose memory borrowers use most now
            gpu = max(lenders, key=lambda g: (pools[g].used, -g))
        self.gpu = gpu
        self.call(m.Hello(tenant=f"producer@gpu{gpu}", devices=[gpu]))
        nbytes = self.step.nbytes or pools[gpu].capacity
        self.reply = self.call(m.Reclaim(device=gpu, nbytes=max(1, nbytes),
                                         deadline_ms=round(self.step.deadline_s * 1000)))
        if self.reply["state"] == "done":
            self._finished(self.reply["report"])

    def on_event(self, name: str, data: dict) -> None:
        if name == "reclaim_done":
            self._finished(data)

    def _finished(self, report: dict) -> None:
        self.report = report
        self.done_at = self.sim.now


def window(sim: Simulation, since: float, until: float = math.inf) -> dict:
    """TTFT and TBT of what happened in [since, until): requests that arrived
    then (TTFT), and gaps between tokens emitted then (TBT)."""
    reqs = [r for e in sim.engines for r in e.requests]
    arrived = [(r.arrival, r.token_times) for r in reqs if since <= r.arrival < until]
    gaps = sorted(b - a for r in reqs for a, b in zip(r.token_times, r.token_times[1:])
                  if since <= b < until)
    return {"requests": len(arrived), "ttft_p99_s": service_summary(arrived)["ttft_p99_s"],
            "tbt_p99_s": percentile(gaps, 0.99)}


WINDOW_S = 10.0  # latency is compared over this long before and after the step


def reclaim_cost(scenario: Scenario, step: LoadStep, policy: str = "aqua", *,
                 plain: Simulation | None = None, window_s: float = WINDOW_S) -> dict:
    """The scenario run without and with the load step: what the reclaim
    cost the borrowers. `plain`: the run without it, if already done.
    Latency is compared over `window_s` before and after the step (over the
    whole run the step's effect is diluted; the paging stall is summed over
    all of it, since the lender keeps its memory).
    Returns {"without": results, "with": results, "cost": the differences
    and the reclaim's own figures}."""
    from .simulator import Simulation  # noqa: PLC0415

    if plain is None:
        plain = Simulation(dataclasses.replace(scenario, reclaim=None), policy)
        plain.run()
    without = plain.results()
    stepped = Simulation(dataclasses.replace(scenario, reclaim=step), policy)
    with_ = stepped.run()
    rec = with_["reclaim"]
    t = step.at_s
    cost = {
        **rec,
        "extra_paging_stall_s": with_["paging_stall_s"] - without["paging_stall_s"],
        "extra_recomputed_tokens": with_["recomputed_tokens"] - without["recomputed_tokens"],
        "window_s": window_s,
        "before": window(stepped, max(0.0, t - window_s), t),
        "after_without": window(plain, t, t + window_s),
        "after_with": window(stepped, t, t + window_s),
    }
    return {"without": without, "with": with_, "cost": cost}


def reclaim_table(cost: dict) -> str:
    """The reclaim's figures, then TTFT/TBT p99 before the step and after it
    (without the step, and with it)."""
    c = cost
    tiers = ", ".join(f"{n / GB:.1f} GB to {tier}" for tier, n in
                      sorted(c["copied_by_tier"].items())) or "nothing"
    lines = [
        f"lender's load step at {c['at_s']:g} s: gpu{c['gpu']} takes back "
        f"{c['taken_bytes'] / GB:.1f} GB (deadline {c['deadline_s']:g} s); aquad asks "
        f"borrowers to move {c['leases_notified']} leases ({c['bytes_notified'] / GB:.1f} GB)",
        f"  moved {c['moved_count']} leases ({c['moved_bytes'] / GB:.1f} GB of leases), "
        f"copied {tiers} ({c['copy_s']:.3f} s of link time); the last move done after "
        f"{c['moves_done_s']:.3f} s, the reclaim after {c['elapsed_s']:.3f} s; released "
        f"{c['released_count']}, fenced {c['fenced_count']}, "
        f"dropped for want of room {c['dropped']}",
        f"  over the whole run: extra paging stall {c['extra_paging_stall_s']:+.3f} s, extra "
        f"recomputed tokens {c['extra_recomputed_tokens']:+d}",
        f"  {'':26} {'TTFT p99 s':>11} {'TBT p99 s':>10} {'requests':>9}",
    ]
    w_s = f"{c['window_s']:g} s"
    for key, label in (("before", f"{w_s} before the step"),
                       ("after_without", f"{w_s} after, no reclaim"),
                       ("after_with", f"{w_s} after, with reclaim")):
        w = c[key]
        lines.append(f"  {label:26} {w['ttft_p99_s']:11.3f} {w['tbt_p99_s']:10.4f} "
                     f"{w['requests']:9d}")
    return "\n".join(lines)
