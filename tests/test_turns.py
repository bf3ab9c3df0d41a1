"""GPU time slices end to end: real daemon, real tenant processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import torch

import aqua

from .conftest import start_holder, wait_until

# A cooperative engine loop: respond() at the top of every iteration, its
# tensors registered with the default pager; logs each iteration's span.
ENGINE = """
    import json, sys, time, torch, aqua
    name, iters, step = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    client = aqua.connect(tenant=name, device=0)
    gen = torch.Generator().manual_seed(len(name))
    state = [torch.randn(4096, generator=gen), torch.randint(0, 9, (333,), generator=gen)]
    reference = [t.clone() for t in state]
    pager = aqua.TensorPager(client, state).install()
    print("ready", flush=True)
    sys.stdin.readline()
    spans, mismatches, paged = [], 0, 0
    with client.turn():
        for i in range(iters):
            if client.respond():
                paged += 1
                mismatches += sum(not torch.equal(a, b) for a, b in zip(state, reference))
            t0 = time.monotonic()
            time.sleep(step)
            spans.append((t0, time.monotonic()))
    print(json.dumps({"name": name, "spans": spans, "paged": paged,
                      "mismatches": mismatches, "bytes_out": pager.bytes_out}), flush=True)
    pager.close()
    client.close()
"""


def start_engine(tenants, daemon, name: str, iters: int, step: float):
    return tenants(daemon, ENGINE.replace("sys.argv[1], int(sys.argv[2]), float(sys.argv[3])",
                                          f"{name!r}, {iters}, {step}"))


def run_engines(tenants, daemon, names, iters=40, step=0.005):
    procs = [start_engine(tenants, daemon, n, iters, step) for n in names]
    for proc in procs:
        assert proc.readline() == "ready"
    for proc in procs:
        proc.send("go")
    results = {}
    for proc in procs:
        code, out, err = proc.finish(timeout=60)
        assert code == 0, err
        doc = json.loads(out.strip().splitlines()[-1])
        results[doc["name"]] = doc
    return results


def test_three_tenants_take_turns_and_keep_their_tensors(start_daemon, tenants):
    daemon = start_daemon("--quantum-ms", "40", "--grace-ms", "2000")
    results = run_engines(tenants, daemon, ["alpha", "beta", "gamma"])
    spans = sorted((s[0], s[1], name) for name, r in results.items() for s in r["spans"])
    # Mutual exclusion: no two tenants' iterations overlap in time.
    for (_a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
        assert an == bn or a1 <= b0 + 1e-4, f"{an} and {bn} overlap"
    # Turns: consecutive runs of iterations by the same tenant, in rotation.
    runs = [spans[0][2]]
    for _, _, name in spans[1:]:
        if name != runs[-1]:
            runs.append(name)
    assert len(runs) >= 6, runs
    # While all three compete (before anyone finishes), every window of three
    # consecutive turns holds all three tenants: round-robin, nobody skipped.
    first_done = min(max(s[1] for s in r["spans"]) for r in results.values())
    competing = [n for n, start in zip(runs, _run_starts(spans)) if start < first_done]
    for i in range(len(competing) - 3):
        assert set(competing[i:i + 3]) == {"alpha", "beta", "gamma"}, competing
    for r in results.values():
        assert r["paged"] >= 1 and r["mismatches"] == 0 and r["bytes_out"] > 0
    view = daemon.status()["slices"][0]
    assert view["holder"] is None and view["queue"] == []


def _run_starts(spans):
    starts, last = [], None
    for t0, _, name in spans:
        if name != last:
            starts.append(t0)
            last = name
    return starts


def test_a_lone_tenant_is_never_preempted(start_inprocess):
    daemon = start_inprocess(quantum_ms=20)
    with daemon.connect("solo", 0) as client:
        state = [torch.randn(4096)]
        pager = aqua.TensorPager(client, state).install()
        with client.turn():
            # Over seven quanta: nobody waits, so nobody asks for the slice.
            deadline = time.monotonic() + 0.15
            while time.monotonic() < deadline:
                assert not client.respond()
                time.sleep(0.005)
        assert pager.bytes_out == 0
        pager.close()
    assert daemon.status()["slices"][0]["tenants"] == []  # it left


def test_a_tenant_that_ignores_preemption_is_revoked(start_daemon, tenants):
    daemon = start_daemon("--quantum-ms", "30", "--grace-ms", "150")
    rogue = tenants(daemon, """
        import sys, aqua
        client = aqua.connect(tenant="rogue", device=0)
        with client.turn():
            print("holding", flush=True)
            sys.stdin.readline()  # holds until the test is done; never calls respond()
        client.close()
    """)
    assert rogue.readline() == "holding"
    # The others can only run to completion if the rogue's slice was taken
    # from it: it never yields and still "holds" it when they are done.
    results = run_engines(tenants, daemon, ["fair1", "fair2"], iters=20, step=0.005)
    assert rogue.proc.poll() is None
    assert all(r["mismatches"] == 0 for r in results.values())
    view = daemon.status()["slices"][0]
    by_name = {t["tenant"]: t for t in view["tenants"]}
    rogue_id = next(t["id"] for t in daemon.status()["tenants"] if t["name"] == "rogue")
    assert by_name[rogue_id]["revocations"] == 1
    assert by_name[rogue_id]["strikes"] == 1
    assert by_name[rogue_id]["quantum_ms"] == 15  # halved for the offender
    assert "revoked" in daemon.log() and "did not yield" in daemon.log()
    rogue.kill()


def test_a_holder_that_dies_frees_its_slice_at_once(start_daemon, tenants):
    daemon = start_daemon("--quantum-ms", "20", "--grace-ms", "30000")
    holder = start_holder(tenants, daemon)
    with aqua.connect("waiter", 0, socket=daemon.socket) as client:
        killed = {}

        def kill_holder():
            """Once the waiter is queued behind the holder."""
            wait_until(lambda: daemon.status()["slices"][0]["queue"], 10)
            killed["at"] = time.monotonic()
            holder.proc.send_signal(signal.SIGKILL)

        threading.Thread(target=kill_holder, daemon=True).start()
        with client.turn(timeout=10):
            waited = time.monotonic() - killed["at"]
    # Granted right after the death, not after the 30 s grace.
    assert waited < 2, waited


def test_turn_times_out_cleanly(start_inprocess):
    daemon = start_inprocess(quantum_ms=20, grace_ms=30000)
    holder = daemon.connect("holder", 0)
    holding = holder.turn()
    holding.__enter__()  # and never respond(): it keeps the slice for the 30 s grace
    with daemon.connect("impatient", 0) as client:
        t0 = time.monotonic()
        try:
            with client.turn(timeout=0.3):
                raise AssertionError("should not be granted")
        except aqua.TurnTimeout:
            pass
        assert time.monotonic() - t0 < 2
        assert client.id not in daemon.status()["slices"][0]["queue"]
    holding.__exit__(None, None, None)
    holder.close()


def test_aquactl_slices(start_daemon, tenants):
    daemon = start_daemon("--quantum-ms", "25")
    run_engines(tenants, daemon, ["one", "two"], iters=15, step=0.004)
    with aqua.connect("viewer", 0, socket=daemon.socket) as client, client.turn():
        out = subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket,
                              "slices"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert f"holder {client.id} (viewer)" in out.stdout
        assert "WAIT p99 ms" in out.stdout and "quantum 25 ms" in out.stdout
        doc = json.loads(subprocess.run(
            [sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket, "slices", "--json"],
            capture_output=True, text=True, timeout=30).stdout)
        assert doc[0]["holder"] == client.id
        assert {"tenant", "share", "wait_p50_ms", "wait_p99_ms", "revocations"} <= \
            set(doc[0]["tenants"][0])
