"""`aqua-demo`: aquad on the embedded host backend with real tenant processes.

Part 1, leases: a private aquad and two tenant processes that each build a
KV-cache sized tensor, offload it into leases (one per layer), drop their own
copy and wait. While they hold leases the demo prints `aquactl status`; then
the tenants restore their tensors, check them bit for bit, and leave, and the
demo checks the daemon left no shared memory behind.

Part 2, a burst: three tenant processes serving small Llama models replay
the same bursty arrivals twice, as a vLLM-style engine (fcfs, admission
control) and with aqua (prompt-level time sharing, KV caches paged into
leases); one table compares them and a PNG shows the TTFT distributions.

Part 3, elastic memory (demo/elastic.py): a lender tenant lends spare memory
of its device, two borrowers offload into it and keep serving, then the
lender's own burst takes the memory back; the borrowers' leases move and
their bytes stay bit-exact. A table says what moved where; a second PNG
shows the moves over time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib

from aqua.ctl import human_bytes
from aqua.errors import DaemonNotRunning

from . import elastic, replay
from .elastic import aquad_for_tenants, expect, run_elastic, say, spawn, tell
from .report import plot_ttft_cdf, table
from .scrape import figures, free_port, scrape

TENANTS = (("llama-2-7b", 0), ("mistral-7b", 1))


def tenant_main(job: dict) -> int:
    """One tenant: offload a fake KV cache, wait for 'go', restore, verify."""
    import torch  # noqa: PLC0415

    import aqua  # noqa: PLC0415

    name = job["name"]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    per_layer = job["layer_mib"] * 2**20 // 2  # fp16 elements
    kv = [torch.randn(per_layer, generator=gen).to(torch.float16) for _ in range(job["layers"])]
    reference = [t.clone() for t in kv]
    with aqua.connect(tenant=name, device=job["device"]) as client:
        t0 = time.perf_counter()
        saved = [client.offload(t) for t in kv]
        t_off = time.perf_counter() - t0
        total = sum(s.nbytes for s in saved)
        del kv  # the tenant's own copy is gone; only the leases hold the data
        devices = sorted({s.lease.device for s in saved})
        print(f"[{name}] offloaded {human_bytes(total)} into {len(saved)} leases on "
              f"device(s) {devices} in {t_off * 1e3:.0f} ms "
              f"({total / t_off / 1e9:.1f} GB/s)", flush=True)
        say("HOLDING", {})
        sys.stdin.readline()
        t0 = time.perf_counter()
        restored = [s.restore() for s in saved]
        t_res = time.perf_counter() - t0
        same = all(torch.equal(a, b) for a, b in zip(restored, reference))
        print(f"[{name}] restored {human_bytes(total)} in {t_res * 1e3:.0f} ms "
              f"({total / t_res / 1e9:.1f} GB/s): "
              f"{'bit-exact' if same else 'MISMATCH'}", flush=True)
    return 0 if same else 1


def _aquactl(socket: str) -> str:
    out = subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", socket, "status"],
                         capture_output=True, text=True, timeout=30)
    return out.stdout if out.returncode == 0 else out.stderr


def run_demo(layers: int, layer_mib: int, devices: str) -> int:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    with aquad_for_tenants("aqua-demo-", "--host-devices", devices, "--log-level", "warning",
                           "--metrics", url.split("/")[2]) as (daemon, env, tenants):
        print(f"== aquad (host backend, {devices}) on {daemon.socket}", flush=True)
        print(f"   its Prometheus metrics: {url}", flush=True)
        print(f"== starting {len(TENANTS)} tenant processes", flush=True)
        for name, device in TENANTS:
            tenants.append(spawn("tenant", {
                "name": name, "device": device, "layers": layers, "layer_mib": layer_mib}, env))
        for proc in tenants:
            expect(proc, "HOLDING")
        print("\n== aquactl status, while the tenants hold their leases\n", flush=True)
        print(_aquactl(daemon.socket), flush=True)
        print(f"== the same, from aquad's metrics ({url})\n", flush=True)
        print(figures(scrape(url, since=time.time())) + "\n", flush=True)
        print("== tenants restore and verify", flush=True)
        for proc in tenants:
            tell(proc, "go")
        failures = 0
        for proc in tenants:
            out, _ = proc.communicate(timeout=120)
            for line in out.splitlines():
                print("   " + line, flush=True)
            failures += proc.returncode != 0
        print("\n== aquactl status, after the tenants left\n", flush=True)
        print(_aquactl(daemon.socket), flush=True)
    code = daemon.stop()  # stopped already: its exit code
    left = daemon.files()
    print(f"== aquad stopped (exit {code}); shared-memory segments left "
          f"behind: {len(left)}", flush=True)
    ok = failures == 0 and code == 0 and not left
    print("== demo " + ("passed" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


def run_burst(requests: int, burst: int, seed: int, plot: str) -> int:
    tenants = replay.default_tenants(requests, burst, seed)
    print(f"\n== a burst: {len(tenants)} tenant processes "
          f"({', '.join(t.name for t in tenants)}), {requests} requests each, {burst} of "
          f"them at once; baseline first, then aqua", flush=True)
    result = replay.compare(tenants, seed=seed, progress=True, metrics=True)
    print("\n" + table(result), flush=True)
    daemon = result["aqua"].get("daemon")
    if daemon:
        print(f"\n== aqua: aquad's figures, from its metrics ({daemon['url']})", flush=True)
        print(figures(daemon["figures"]), flush=True)
    path = os.path.abspath(plot_ttft_cdf(result, plot))
    print(f"\n== TTFT distributions of both modes: {path}", flush=True)
    ok = all(result[m]["completed"] == result[m]["requests"] for m in ("baseline", "aqua"))
    print("== burst " + ("done" if ok else "FAILED: requests left unanswered"), flush=True)
    return 0 if ok else 1


ROLES = {"tenant": tenant_main, "lender": elastic.lender_main,
         "borrower": elastic.borrower_main, "replay": replay.tenant_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in ROLES:  # a tenant process the demo itself started (spawn)
        return ROLES[argv[0]](json.loads(argv[1]))
    parser = argparse.ArgumentParser(prog="aqua-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "leases", "burst", "elastic"), default="all")
    for flag, default, what in (("--layers", 8, "leases per tenant"),
                                ("--layer-mib", 32, "MiB per layer of fake KV cache"),
                                ("--host-devices", "4x512MiB", "aquad's virtual devices"),
                                ("--requests", 26, "burst part: requests per tenant"),
                                ("--burst", 18, "burst part: of those, arriving together"),
                                ("--seed", 0, "burst part: the arrivals' seed"),
                                ("--plot", "aqua-demo-ttft.png", "where the TTFT plot goes"),
                                ("--elastic-leases", 4, "elastic part: leases per borrower"),
                                ("--elastic-lease-mib", 8, "elastic part: MiB per lease"),
                                ("--elastic-plot", "aqua-demo-reclaim.png",
                                 "where the move timeline goes")):
        parser.add_argument(flag, type=type(default), default=default,
                            help=f"{what} (default {default})")
    # Flips a byte of a moved lease: shows that the demo catches it.
    parser.add_argument("--elastic-corrupt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    code = 0
    try:
        if args.part in ("all", "leases"):
            code = run_demo(args.layers, args.layer_mib, args.host_devices)
        if code == 0 and args.part in ("all", "elastic"):
            code = run_elastic(args.elastic_leases, args.elastic_lease_mib, args.elastic_plot,
                               corrupt=args.elastic_corrupt)
        if code == 0 and args.part in ("all", "burst"):
            code = run_burst(args.requests, args.burst, args.seed, args.plot)
    except DaemonNotRunning as exc:
        raise SystemExit(f"aqua-demo: {exc}") from None
    return code


if __name__ == "__main__":
    sys.exit(main())
