"""The paper-scale simulator: accounting, formulas, and that it runs the real objects."""

from __future__ import annotations

import dataclasses

import pytest

import aquad.core.arbiter as arbiter_mod
from aqua.engine.scheduler import PromptScheduler
from aqua_sim import GPUS, MODELS, Arrival, Costs, Scenario, ServerSpec, SimTenant, Simulation
from aqua_sim.fabric import Fabric
from aqua_sim.hardware import GB, load_server, server_from_dict
from aqua_sim.long_prompt import long_prompt
from aqua_sim.report import table
from aqua_sim.scenarios import paper_scenario
from aqua_sim.workload import bursty, fit, from_trace
from aquad.core.arbiter import Arbiter
from aquad.core.scheduler import Scheduler
from aquad.core.topology import Tier

H100 = GPUS["h100-sxm"]


def burst_scenario(*, requests: int = 120, incremental: str = "host", consumers: int = 2,
                   gpus: int = 4, prompt: int = 3000, new: int = 60) -> Scenario:
    """A burst far beyond one GPU's KV room, on a small NVLinked server."""
    server = ServerSpec(H100, gpus=gpus)
    rows = [(0.0, prompt, new)]
    sc = paper_scenario(server, rows, requests=requests, consumers=consumers,
                        burst=(2.0, requests // 2, 5.0))
    return dataclasses.replace(sc, incremental=incremental)


def finished_cleanly(sim: Simulation) -> None:
    assert list(sim.arbiter.leases) == []
    assert all(pool.used == 0 for pool in sim.arbiter.pools.values())
    assert sim.arbiter.backend.live == {}


# --- accounting -----------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "host_swap", "aqua", "recompute"])
def test_every_request_completes_and_every_lease_comes_back(policy):
    sc = burst_scenario()
    sim = Simulation(sc, policy)
    r = sim.run()
    assert r["requests"] == r["completed"] == len(sc.arrivals)
    reqs = [q for e in sim.engines for q in e.requests]
    assert all(len(q.token_times) == q.max_new_tokens for q in reqs)
    assert all(q.token_times[0] >= q.arrival for q in reqs)
    assert all(a <= b for q in reqs for a, b in zip(q.token_times, q.token_times[1:]))
    assert r["tokens"] == sum(a.max_new for a in sc.arrivals)
    finished_cleanly(sim)


def test_whole_cache_paging_moves_every_byte_back_the_way_it_went():
    sim = Simulation(burst_scenario(incremental="none"), "aqua")
    r = sim.run()
    assert r["preemptions"] > 0 and r["lease_failures"] == 0
    pairs = sim.fabric.bytes
    assert pairs
    for (src, dst), n in pairs.items():
        assert pairs[dst, src] == n, f"{src}->{dst} carried {n}, back {pairs[dst, src]}"
    assert sum(r["bytes_by_tier"].values()) == r["bytes_paged"] == sum(pairs.values())


def test_incremental_paging_writes_less_than_it_reads_back():
    def written(sim: Simulation) -> int:  # consumers are the low GPU ids
        return sum(n for (src, dst), n in sim.fabric.bytes.items() if src < dst)

    whole = Simulation(burst_scenario(incremental="none"), "aqua")
    whole.run()
    inc = Simulation(burst_scenario(incremental="all"), "aqua")
    inc.run()
    for (src, dst), n in inc.fabric.bytes.items():
        if src < dst:
            assert n <= inc.fabric.bytes[dst, src]
    assert 0 < written(inc) < written(whole)
    finished_cleanly(inc)


# --- formulas ---------------------------------------------------------------------


def test_a_lone_request_takes_exactly_the_roofline_times():
    server = ServerSpec(H100, gpus=1, nvlink_islands=())
    spec = MODELS["llama-2-7b"]
    prompt, new = 1000, 4
    sc = Scenario(server, (SimTenant("t", "llama-2-7b", 0),),
                  (Arrival(2.0, prompt, new, 0),))
    sim = Simulation(sc, "aqua")
    sim.run()
    (req,) = sim.engines[0].requests
    hbm = H100.hbm_bw * 0.8
    flops = H100.peak_flops * 0.6
    weights = spec.params * 2
    # Prefill: compute-bound, 2 FLOPs per parameter per token.
    t = 2.0 + max(2 * spec.params * prompt / flops, weights / hbm)
    expected = [t]
    for k in range(1, new):
        # Each decode step streams the weights and the request's KV once.
        ctx = prompt + k
        t += max((weights + ctx * spec.kv_bytes_per_token) / hbm, 2 * spec.params / flops)
        expected.append(t)
    assert req.token_times == pytest.approx(expected, rel=1e-12)


def test_copies_take_latency_plus_bytes_over_bandwidth_and_queue_per_port():
    server = ServerSpec(H100, gpus=4, nvlink_islands=((0, 1), (2, 3)))
    f = Fabric(server)
    nv, pcie, lat = H100.nvlink_bw * 0.9, H100.pcie_bw * 0.7, 10e-6
    assert f.copy(0, 1, 9 * GB, 0.0) == pytest.approx(lat + 9 * GB / nv)
    # Same outbound port: queues behind the first copy.
    assert f.copy(0, 1, 9 * GB, 0.0) == pytest.approx(2 * (lat + 9 * GB / nv))
    # Another pair, another island: independent, and over PCIe.
    assert f.copy(2, 0, 1 * GB, 0.0) == pytest.approx(lat + 1 * GB / pcie)
    assert f.tier(0, 1) == "nvlink" and f.tier(0, 2) == "peer"
    assert f.tier(0, server.host_device) == "host"
    assert f.bytes[0, 1] == 18 * GB
    # Within one GPU (a lease on its own GPU): read and write the same HBM.
    hbm = H100.hbm_bw * 0.8
    assert f.copy(3, 3, 4 * GB, 0.0) == pytest.approx(lat + 8 * GB / hbm)
    assert f.tier(3, 3) == "local"
    with pytest.raises(ValueError):
        f.copy(server.host_device, server.host_device, 10, 0.0)


def test_a_copy_booked_for_later_does_not_hold_back_one_that_can_run_now():
    server = ServerSpec(H100, gpus=2)
    f = Fabric(server)
    lat, nv = 10e-6, H100.nvlink_bw * 0.9
    later = f.copy(1, 0, int(nv), 5.0)  # one second of copying, from t = 5
    assert later == pytest.approx(6.0 + lat)
    # Same inbound port of GPU 0, but it fits in the gap before t = 5.
    assert f.copy(1, 0, int(nv / 10), 1.0) == pytest.approx(1.1 + lat)
    # One that does not fit in the gap before t = 5 runs after the booking.
    assert f.copy(1, 0, int(nv * 2), 4.0) == pytest.approx(6.0 + lat + 2.0 + lat)


def test_long_prompt_throughput_follows_the_link():
    lp = long_prompt(ServerSpec(H100))
    assert lp["gpu_only_tok_s"] > lp["aqua_tok_s"] > lp["host_tok_s"]
    spec, costs = MODELS["opt-30b"], Costs(MODELS["opt-30b"], H100)
    remote = int(8192 * spec.kv_bytes_per_token * 0.5)
    step = costs.decode(1, 8192)
    assert lp["host_tok_s"] == pytest.approx(1 / (step + 10e-6 + remote / (H100.pcie_bw * 0.7)))
    assert lp["aqua_over_host"] > 3


# --- the real objects ---------------------------------------------------------------


def test_the_simulator_drives_the_daemons_own_objects(monkeypatch):
    calls = []
    real_place = arbiter_mod.Placer.__call__

    def spy(self, *args, **kwargs):
        calls.append(args[1])
        return real_place(self, *args, **kwargs)

    monkeypatch.setattr(arbiter_mod.Placer, "__call__", spy)
    sim = Simulation(burst_scenario(), "aqua")
    assert type(sim.arbiter) is Arbiter
    assert type(sim.arbiter.scheduler) is Scheduler
    assert all(type(e.sched) is PromptScheduler for e in sim.engines)
    r = sim.run()
    # Page-outs got their leases through the daemon's placer (a request that
    # already holds one, from an earlier page-out, reuses it)...
    assert 0 < len(calls) <= r["preemptions"]
    # ...which put leases on NVLink peers first.
    assert r["bytes_by_tier"].get("nvlink", 0) > 0
    assert any(k.startswith("gpu") for k in r["peak_leased_bytes"])
    # And the daemon's scheduler granted the engines their GPU turns.
    assert all(sim.arbiter.scheduler.runners[f"t{i + 1}"].grants >= 1
               for i in range(len(sim.engines)))


def test_policies_page_where_they_say():
    sc = burst_scenario()
    res = {p: Simulation(sc, p).run() for p in ("fcfs", "host_swap", "aqua", "recompute")}
    assert res["fcfs"]["preemptions"] == 0 and res["fcfs"]["bytes_paged"] == 0
    assert set(res["host_swap"]["bytes_by_tier"]) == {"host"}
    assert res["aqua"]["bytes_by_tier"]["nvlink"] > 0
    assert res["recompute"]["bytes_paged"] == 0 and res["recompute"]["recomputed_tokens"] > 0
    assert res["aqua"]["paging_stall_s"] < res["host_swap"]["paging_stall_s"]
    # Fair time sharing answers a burst sooner than admission control.
    assert res["aqua"]["ttft_p99_s"] < res["fcfs"]["ttft_p99_s"]
    text = table(res)
    assert "aqua" in text and "host_swap" in text


def test_a_tenant_asked_to_yield_after_its_last_request_gives_the_gpu_back():
    # One tenant's work ends while the other waits for the GPU: it is asked
    # to yield during its last step and must hand the slice back, not queue.
    server = ServerSpec(H100, gpus=1)
    tenants = (SimTenant("a", "llama-2-7b", 0, share=0.5),
               SimTenant("b", "llama-2-7b", 0, share=0.5))
    for n in (10, 20, 30):
        arrivals = (Arrival(0.0, 100, 100, 0), Arrival(0.01, 100, n, 1))
        sim = Simulation(Scenario(server, tenants, arrivals, quantum_s=0.05), "aqua")
        r = sim.run()
        assert r["completed"] == 2
        assert all(not e.turns.active for e in sim.engines)
        assert all(run.state == "idle" for run in sim.arbiter.scheduler.runners.values())


def test_models_sharing_a_gpu_leave_room_for_each_others_weights():
    server = ServerSpec(H100, gpus=1)
    alone = Simulation(Scenario(server, (SimTenant("a", "llama-2-13b", 0),), ()), "aqua")
    pair = Simulation(Scenario(server, (SimTenant("a", "llama-2-13b", 0, share=0.5),
                                        SimTenant("b", "llama-2-7b", 0, share=0.5)), ()),
                      "aqua")
    kvb = MODELS["llama-2-13b"].kv_bytes_per_token
    room = 80 * GB - 26e9 - 6 * GB
    assert alone.engines[0].sched.budget == int(room // kvb)
    room_shared = (80 * GB - 26e9 - 6.74e9 * 2 - 6 * GB) * 0.5
    assert pair.engines[0].sched.budget == int(room_shared // kvb)


def test_host_leases_are_sized_to_be_kept():
    # host_swap only ever gets host leases, so keeping host leases ("host")
    # must cost about what keeping every lease ("all") does.
    # Fixed 5-step slices: requests are paged out again and again.
    stall = {mode: Simulation(dataclasses.replace(burst_scenario(incremental=mode),
                                                  max_overhead=None), "host_swap").run()
             ["paging_stall_s"] for mode in ("host", "all", "none")}
    assert stall["host"] == pytest.approx(stall["all"], rel=0.05)
    assert stall["all"] < stall["none"]


def test_tenants_sharing_a_gpu_take_turns_through_the_scheduler():
    server = ServerSpec(H100, gpus=2)
    tenants = (SimTenant("a", "llama-2-7b", 0, share=0.5),
               SimTenant("b", "llama-2-7b", 0, share=0.5))
    arrivals = tuple(Arrival(0.01 * i, 200, 400, i % 2) for i in range(20))
    sc = Scenario(server, tenants, arrivals, quantum_s=0.05)
    sim = Simulation(sc, "aqua")
    r = sim.run()
    assert r["completed"] == 20
    runners = sim.arbiter.scheduler.runners
    assert runners["t1"].grants > 1 and runners["t2"].grants > 1  # they alternated
    held = sim.arbiter.scheduler.device_time[0]
    assert held["t1"] == pytest.approx(held["t2"], rel=0.25)


# --- inputs ------------------------------------------------------------------------


def test_server_and_scenario_validation(tmp_path):
    with pytest.raises(ValueError, match="listed twice|out of range"):
        ServerSpec(H100, gpus=4, nvlink_islands=((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="unknown keys"):
        server_from_dict({"gpus": 8, "nvlinks": 1})
    with pytest.raises(ValueError, match="unknown gpu"):
        server_from_dict({"gpu": "v100"})
    path = tmp_path / "s.toml"
    path.write_text('gpu = "a100-sxm"\ngpus = 4\nnvlink_islands = [[0, 1], [2, 3]]\n'
                    'pcie_efficiency = 0.8\nhost_pool_gib = 64\n')
    s = load_server(str(path))
    assert s.gpus == 4 and s.gpu is GPUS["a100-sxm"] and s.link(0, 2).tier == Tier.PEER
    assert s.link(0, 1).tier == Tier.NVLINK and s.host_pool_bytes == 64 * 2**30
    with pytest.raises(ValueError, match="unknown model"):
        Scenario(s, (SimTenant("x", "gpt-5", 0),), ())
    with pytest.raises(ValueError, match="names tenant"):
        Scenario(s, (SimTenant("x", "llama-2-7b", 0),), (Arrival(0, 1, 1, 3),))
    with pytest.raises(ValueError, match="policy"):
        Simulation(Scenario(s, (SimTenant("x", "llama-2-7b", 0),), ()), "lifo")


def test_workload_generators_fit_requests_to_the_model():
    assert fit(10_000, 500, 4096) == (3596, 500)
    assert fit(0, 0, 4096) == (1, 1)
    rows = [(float(i), 100 + i, 10) for i in range(50)]
    arr = from_trace(rows, requests=40, tenants=3, max_context=4096, time_scale=2)
    assert [a.t for a in arr[:3]] == [0.0, 0.5, 1.0] and {a.tenant for a in arr} == {0, 1, 2}
    b = bursty(rows, requests=300, tenants=2, max_context=4096, rate=1.0, burst_size=100,
               burst_every=10.0, seed=1)
    assert len(b) == 300 and all(x.t <= y.t for x, y in zip(b, b[1:]))
    # The bursts are there: 100 requests within 0.1 s of t = 10.
    assert sum(1 for a in b if 10.0 <= a.t <= 10.1) >= 100
    with pytest.raises(ValueError, match="holds 50"):
        from_trace(rows, requests=51, tenants=1, max_context=4096)


def test_consumers_spread_over_islands_and_peers_without_nvlink_use_pcie():
    server = ServerSpec(H100, gpus=8, nvlink_islands=((0, 1, 2, 3), (4, 5, 6, 7)))
    assert server.spread()[:4] == [0, 4, 1, 5]
    sc = paper_scenario(server, [(0.0, 3000, 60)], requests=10, consumers=4, burst=(1, 5, 1))
    assert [t.gpu for t in sc.tenants] == [0, 1, 4, 5] and sorted(sc.spare) == [2, 3, 6, 7]
    topo = server.topology(sc.spare)
    assert topo.link(0, 2).tier == Tier.NVLINK and topo.link(0, 6).tier == Tier.PEER
    assert Fabric(server).tier(0, 6) == "peer"


def test_paper_sim_writes_one_object_per_policy(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "paper_sim.py"
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    proc = subprocess.run([sys.executable, str(script), "--requests", "400", "--burst-size", "150",
                           "--burst-every", "10", "--json", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    for policy in ("fcfs", "host_swap", "aqua", "recompute"):
        r = doc[policy]
        for key in ("ttft_p50_s", "ttft_p99_s", "throughput_tok_s", "jain", "completed",
                    "bytes_by_link", "tbt_p99_s"):
            assert key in r, (policy, key)
        assert r["completed"] == 400
        q = r["ttft_quantiles_s"]
        assert list(q) == ["p10", "p25", "p50", "p75", "p90", "p95", "p99", "p99.9"]
        assert list(q.values()) == sorted(q.values()) and q["p99"] == r["ttft_p99_s"]
    assert doc["long_prompt"]["aqua_over_host"] > 1
    assert png.stat().st_size > 10_000
    assert "TTFT p99" in proc.stdout and "aqua" in proc.stdout
    bad = subprocess.run([sys.executable, str(script), "--policies", "lifo"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown policies" in bad.stderr


# --- what the figures rest on: checked against outside facts, not formulas ------


# Published architectures (each model's config.json): hidden size, layers,
# attention heads, KV heads. The KV bytes per token are what transformers'
# implementation of that architecture projects into its cache per token
# (built on the meta device: no weights).
PUBLISHED = {
    "llama-2-7b": ("llama", 4096, 32, 32, 32),
    "llama-2-13b": ("llama", 5120, 40, 40, 40),
    "mistral-7b": ("mistral", 4096, 32, 32, 8),
    "opt-30b": ("opt", 7168, 48, 56, 56),
}


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_each_models_kv_bytes_per_token_is_what_its_architecture_caches(key):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kind, hidden, layers, heads, kv_heads = PUBLISHED[key]
    one_layer = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                 "opt": transformers.OPTConfig}[kind]
    if kind == "opt":
        cfg = one_layer(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                        ffn_dim=4 * hidden, word_embed_proj_dim=hidden)
    else:
        cfg = one_layer(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, intermediate_size=4 * hidden)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    # What one layer caches per token: its key and value projections' outputs.
    proj = {name.rsplit(".", 1)[-1]: mod for name, mod in model.named_modules()
            if name.endswith(("k_proj", "v_proj"))}
    per_layer = (proj["k_proj"].out_features + proj["v_proj"].out_features) * 2  # fp16
    assert MODELS[key].kv_bytes_per_token == per_layer * layers
    assert MODELS[key].layers == layers


def test_copies_run_at_the_h100_datasheets_link_speeds():
    # NVIDIA H100 SXM5 datasheet: NVLink 900 GB/s and PCIe Gen5 x16 128 GB/s,
    # both bidirectional. A 10 GB copy on an idle simulated server takes what
    # those speeds say (one direction each, at the achieved fraction the
    # server names as its assumption), whatever the spec table says.
    server = ServerSpec(H100, gpus=2)
    nvlink = Fabric(server).copy(0, 1, 10 * GB, 0.0)
    pcie = Fabric(server).copy(0, server.host_device, 10 * GB, 0.0)
    assert nvlink == pytest.approx(10e9 / (450e9 * server.nvlink_efficiency), rel=0.02)
    assert pcie == pytest.approx(10e9 / (64e9 * server.pcie_efficiency), rel=0.02)


def test_the_baseline_admits_and_preempts_as_vllm_does():
    # Short prompts, long outputs, far beyond the KV room: vLLM admits on
    # prompt blocks, runs out of blocks mid-decode and preempts by recompute;
    # only strict reservation never preempts, and it admits fewer at once.
    server = ServerSpec(H100, gpus=1)
    arrivals = tuple(Arrival(0.001 * i, 200, 1500, 0) for i in range(400))
    sc = Scenario(server, (SimTenant("chat", "llama-2-13b", 0),), arrivals)
    fcfs, reserve = Simulation(sc, "fcfs"), Simulation(sc, "reserve")
    a, b = fcfs.run(), reserve.run()
    assert fcfs.engines[0].sched.policy == "fcfs"
    assert (fcfs.engines[0].sched.max_num_seqs, fcfs.engines[0].sched.max_batched_tokens) == \
        (1024, 8192)  # `vllm serve`'s defaults on an 80 GB H100
    assert a["recomputed_tokens"] > 0 and a["preemptions"] > 0 and a["bytes_paged"] == 0
    assert b["preemptions"] == 0 and b["recomputed_tokens"] == 0
    assert a["ttft_p50_s"] < b["ttft_p50_s"]  # admitted sooner on prompt blocks


# --- a lender's load step: a producer GPU takes its spare memory back -------------


def reclaim_run(deadline_s: float = 2.0, at_s: float = 8.0) -> tuple[Simulation, dict]:
    from aqua_sim.reclaim import LoadStep

    sc = dataclasses.replace(burst_scenario(requests=200, incremental="all"),
                             reclaim=LoadStep(at_s=at_s, deadline_s=deadline_s))
    sim = Simulation(sc, "aqua")
    return sim, sim.run()


def test_a_lenders_load_step_moves_every_lease_to_the_next_best_tier():
    sim, r = reclaim_run()
    rec = r["reclaim"]
    gpu = rec["gpu"]
    assert gpu in sim.scenario.spare and rec["state"] == "done"
    # Everything the GPU lent was taken, so every lease there had to go, and
    # every one was moved (none released, none fenced) before the deadline.
    assert rec["taken_bytes"] == rec["requested_bytes"] == sim.arbiter.elastic.base[gpu]
    assert rec["leases_notified"] > 10
    assert rec["moved_count"] == rec["moves"] == rec["leases_notified"]
    assert rec["moved_bytes"] == rec["bytes_notified"]
    assert rec["fenced_count"] == rec["fenced_seen"] == rec["released_count"] == 0
    assert rec["moves_done_s"] <= rec["elapsed_s"] + 1e-6 < rec["deadline_s"]  # µs rounding
    # Another peer over NVLink while one had room, then host DRAM.
    assert set(rec["copied_by_tier"]) == {"nvlink", "host"}
    # Every byte a move copied crossed the fabric from the reclaimed GPU.
    moves = [mv for e in sim.engines for mv in e.moves]
    assert all(mv["from"] == gpu and mv["to"] != gpu for mv in moves)
    assert 0 < rec["copied_bytes"] == sum(mv["nbytes"] for mv in moves) <= rec["moved_bytes"]
    per_pair: dict = {}
    for mv in moves:
        per_pair[mv["from"], mv["to"]] = per_pair.get((mv["from"], mv["to"]), 0) + mv["nbytes"]
    assert all(n <= sim.fabric.bytes[pair] for pair, n in per_pair.items())
    assert rec["copy_s"] > 0
    # The lender keeps its memory: nothing leased there again, and the
    # borrowers still served every request with every lease back.
    assert sim.arbiter.pools[gpu].capacity == 0
    assert r["completed"] == r["requests"] == 200
    finished_cleanly(sim)


def test_borrowers_that_miss_the_deadline_are_fenced_and_recompute():
    _, moved = reclaim_run()
    sim, r = reclaim_run(deadline_s=0.001)
    rec = r["reclaim"]
    assert rec["state"] == "fenced" and rec["fenced_count"] > 0
    assert rec["fenced_count"] == rec["fenced_seen"]
    assert rec["fenced_count"] + rec["moved_count"] + rec["released_count"] \
        == rec["leases_notified"]
    # The fenced caches were lost: their requests recomputed them.
    assert r["recomputed_tokens"] > moved["recomputed_tokens"]
    assert r["completed"] == r["requests"]
    finished_cleanly(sim)


def test_reclaim_cost_compares_the_same_workload_with_and_without_the_step():
    from aqua_sim.reclaim import LoadStep, reclaim_cost, reclaim_table

    sc = burst_scenario(requests=200, incremental="all")
    out = reclaim_cost(sc, LoadStep(at_s=8.0))
    assert out["without"]["reclaim"] is None and out["with"]["reclaim"]["moved_count"] > 0
    cost = out["cost"]
    assert cost["extra_paging_stall_s"] == pytest.approx(
        out["with"]["paging_stall_s"] - out["without"]["paging_stall_s"])
    assert cost["after_without"]["requests"] == cost["after_with"]["requests"] > 0
    whole = reclaim_cost(sc, LoadStep(at_s=8.0), window_s=1e9)["cost"]
    assert whole["before"]["requests"] + whole["after_with"]["requests"] == 200
    text = reclaim_table(cost)
    assert "takes back" in text and "10 s after, with reclaim" in text
    for bad in (dict(at_s=-1.0), dict(at_s=1.0, nbytes=0), dict(at_s=1.0, deadline_s=0)):
        with pytest.raises(ValueError):
            LoadStep(**bad)


def test_paper_sim_reclaim_flags(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "paper_sim.py"
    out = tmp_path / "sim.json"
    proc = subprocess.run([sys.executable, str(script), "--requests", "400", "--burst-size",
                           "150", "--burst-every", "10", "--policies", "aqua",
                           "--reclaim-at", "15", "--reclaim-gib", "30", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    rec = doc["reclaim"]
    assert rec["requested_bytes"] == 30 << 30 and rec["taken_bytes"] == 30 << 30
    assert rec["moved_count"] > 0 and rec["fenced_count"] == 0
    assert rec["moved_count"] + rec["released_count"] <= rec["leases_notified"]
    assert 0 < rec["moves"] <= rec["leases_notified"]
    assert doc["aqua_with_reclaim"]["completed"] == doc["aqua"]["completed"] == 400
    assert "lender's load step at 15 s" in proc.stdout
    bad = subprocess.run([sys.executable, str(script), "--policies", "fcfs", "--reclaim-at", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "needs the aqua policy" in bad.stderr


def test_long_prompt_on_one_gpu_has_no_peer_row():
    """One GPU: there is no peer to hold the KV, so no "aqua" figure (it used
    to be computed against a GPU 1 that does not exist)."""
    lp = long_prompt(ServerSpec(H100, gpus=1))
    assert "host_tok_s" in lp and "gpu_only_tok_s" in lp
    assert not [key for key in lp if key.startswith("aqua")]
