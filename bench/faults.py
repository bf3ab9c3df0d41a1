"""The hostile suite in one table: each attack of tests/test_hostile.py,
test_hog.py, test_trust.py and test_quotas.py, run against a private aquad
with real processes and sockets, while an honest tenant keeps measuring its
heartbeat round trip.

Every row gets its own daemon, so its RSS figures are its own (VmHWM is a
high-water mark over the process's life). A row passes when the daemon did not
crash, its peak RSS grew by no more than the row's bound, the honest tenant's
heartbeat p99 during the attack stayed under the row's bound, it saw no
error, and the row's own check held.

    python bench/faults.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq
from _common import Aquad, aquad_process, percentiles, write_json

import aqua
import aqua_protocol as p
from aqua.ctl import table

# The attacks are the hostile tests' own (same snippets, same helpers), so the
# table measures exactly what the suite guards against.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import Tenant, wait_until  # noqa: E402
from tests.test_hog import ENGINE, HOG, _held  # noqa: E402
from tests.test_hostile import FIRST_GENERATED_ID, FLOODER, _ask, _dealer, _lease_many, _rss_kib  # noqa: E402
from tests.test_quotas import OTHER_TENANT  # noqa: E402
from tests.test_trust import NBYTES, VICTIM, VICTIM_CODE, Impostor, attacker_dir  # noqa: E402

MiB = 2**20
BASELINE_S = 1.0  # honest heartbeats sampled before each attack (half in --quick)
WARMUP_S = 0.3  # a new daemon makes its spare files first; a new probe warms up
# Peak RSS over RSS before the attack: the regressions these attacks found
# took aquad to hundreds of MiB; VmHWM also counts the start-up peak, a few MiB.
RSS_GROWTH_MIB = 32
HONEST_P99_MS = 20.0  # the hostile tests' bound on the honest heartbeat under flood
NOBODY = pwd.getpwnam("nobody")

# The honest tenant: its own process (so the attack's Python does not share
# its interpreter lock), a heartbeat every 2 ms until told to stop on stdin,
# each sample stamped with CLOCK_MONOTONIC, which every process on the host
# shares, so the samples can be cut by the attack's windows afterwards.
PROBE = """
import json, select, sys, time, aqua
import aqua_protocol as p
client = aqua.connect(tenant="honest", device=0, socket=sys.argv[1])
print("ready", flush=True)
samples, errors = [], []
while not select.select([sys.stdin], [], [], 0.002)[0]:
    t0 = time.monotonic()
    try:
        client._conn.request(p.Heartbeat())
    except aqua.AquaError as exc:
        errors.append(repr(exc))
        continue
    samples.append((t0, time.monotonic() - t0))
print(json.dumps({"samples": samples, "errors": errors}), flush=True)
client.close()
"""


class Probe:
    def __init__(self, socket_path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, socket_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready", "the honest tenant did not start"

    def stop(self) -> dict:
        out, _ = self.proc.communicate("stop\n", timeout=30)
        return json.loads(out)


@dataclass
class Meter:
    """What one row measures around its attack."""
    daemon: Aquad
    quick: bool
    baseline: tuple[float, float] = (0.0, 0.0)
    windows: list[tuple[float, float]] = field(default_factory=list)
    rss_before_kib: int = 0

    def ready(self) -> None:
        """Setup is done (leases held, tenants in): what follows is the attack."""
        t0 = time.monotonic()
        time.sleep(BASELINE_S * (0.5 if self.quick else 1))
        self.baseline = (t0, time.monotonic())
        self.rss_before_kib = _rss_kib(self.daemon.proc.pid)

    @contextlib.contextmanager
    def attack(self) -> Iterator[None]:
        if not self.rss_before_kib:
            self.ready()
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.windows.append((t0, time.monotonic()))


@dataclass
class Outcome:
    trials: int
    ok: bool
    check: str  # what the row's own check saw, in words


@dataclass
class Attack:
    name: str
    run: Callable[[Aquad, Meter, str], Outcome]
    args: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()
    rss_growth_mib: float = RSS_GROWTH_MIB
    p99_ms: float = HONEST_P99_MS


def _inside(samples: list[list[float]], windows: list[tuple[float, float]]) -> list[float]:
    return [rtt for t, rtt in samples if any(a <= t <= b for a, b in windows)]


def _p99_ms(rtts: list[float]) -> float | None:
    return percentiles(rtts)["p99_us"] / 1e3 if rtts else None


# --- the attacks -------------------------------------------------------------


def squat(d: Aquad, meter: Meter, tmp: str) -> Outcome:
    """Peers taking the routing ids libzmq would generate, then ordinary
    clients; under a libzmq ROUTER the first ordinary client aborted aquad."""
    trials, peers, answered, leased = (2, 16, 0, 0) if meter.quick else (5, 32, 0, 0)
    ctx = zmq.Context()
    for _ in range(trials):
        with meter.attack():
            ids = [b"\x00" + (FIRST_GENERATED_ID + i).to_bytes(4, "big") for i in range(peers)]
            squatters = [_dealer(ctx, d.socket, rid) for rid in ids]
            try:
                answered += sum(_ask(s, p.Heartbeat())["error"]["code"] == "not_registered"
                                for s in squatters)
                for i in range(8):
                    with aqua.connect(f"ordinary{i}", 0, socket=d.socket) as client:
                        client.lease(MiB).release()
                        leased += 1
            finally:
                for s in squatters:
                    s.close()
    ctx.term()
    ok = answered == trials * peers and leased == trials * 8
    return Outcome(trials, ok, f"{answered}/{trials * peers} squatters answered as unregistered, "
                               f"{leased}/{trials * 8} ordinary clients leased")


@contextlib.contextmanager
def _registered_until_refused(path: str, device: int, cap: int) -> Iterator[list[str]]:
    """Registers tenants of this uid until one is refused (or `cap` are in);
    yields each hello's outcome, holding the connections for the block."""
    ctx = zmq.Context()
    dealers, codes = [], []
    try:
        while len(dealers) < cap and (not codes or codes[-1] == "ok"):
            dealers.append(_dealer(ctx, path))
            reply = _ask(dealers[-1], p.Hello(tenant=f"t{len(dealers)}", devices=[device]))
            codes.append("ok" if reply["ok"] else reply["error"]["code"])
        yield codes
    finally:
        for s in dealers:
            s.close()
        ctx.term()


def _connect_plain(path: str, n: int) -> list[socket.socket]:
    """`n` AF_UNIX connects that never speak: each holds a descriptor in aquad."""
    plain = []
    try:
        for _ in range(n):
            plain.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            plain[-1].connect(path)
    except BaseException:
        for s in plain:
            s.close()
        raise
    return plain


def _closed_by_peer(sockets: list[socket.socket], timeout: float = 10.0) -> int:
    """How many of `sockets` the daemon closed (they read EOF within `timeout`)."""
    closed = 0
    for s in sockets:
        s.settimeout(timeout)
        with contextlib.suppress(OSError):
            while s.recv(65536):
                pass
            closed += 1
    return closed


def fd_exhaustion(d: Aquad, meter: Meter, tmp: str) -> Outcome:
    """1,100 plain connects into a daemon with 1,024 descriptors, then
    registrations from one uid until refused."""
    with meter.attack():
        plain = _connect_plain(d.socket, 1100)
        try:
            # Connections past the uid's share are closed (at once, or when
            # their handshake stalls): the newest ones read EOF.
            closed = _closed_by_peer(plain[-50:])
        finally:
            for s in plain:
                s.close()
        with _registered_until_refused(d.socket, 0, cap=600) as codes:
            pass
    with aqua.connect("after", 0, socket=d.socket) as client:
        client.lease(MiB).release()
    registered = codes.count("ok")
    ok = closed == 50 and registered > 0 and codes[-1] == "limit_exceeded"
    return Outcome(1, ok, f"{closed}/50 excess connects closed; {registered} registered, "
                          f"then {codes[-1]}; a new client leased after")


def flooders(d: Aquad, meter: Meter, tmp: str) -> Outcome:
    """Peers sending `status` (about 0.4 MB a reply here) without reading,
    while one tenant holds thousands of leases."""
    leases, rounds, seconds = (1000, [2], 1.5) if meter.quick else (4000, [2, 4], 3.0)
    script = os.path.join(tmp, "flooder.py")
    Path(script).write_text(textwrap.dedent(FLOODER))
    ctx = zmq.Context()
    holder = _dealer(ctx, d.socket)
    try:
        assert _ask(holder, p.Hello(tenant="many", devices=[0]))["ok"]
        _lease_many(holder, leases)
        meter.ready()
        for n in rounds:
            procs = [subprocess.Popen([sys.executable, script, d.socket, str(seconds)],
                                      stdout=subprocess.PIPE, text=True) for _ in range(n)]
            try:
                for f in procs:
                    assert f.stdout.readline().strip() == "flooding"
                time.sleep(0.5)  # their replies have backed up by now
                with meter.attack():
                    for f in procs:
                        f.wait(timeout=seconds + 20)
            finally:
                for f in procs:
                    f.kill()
                    f.wait()
        alive = _ask(holder, p.Heartbeat(), rid=7)["ok"]
    finally:
        holder.close()
        ctx.term()
    return Outcome(len(rounds), alive, f"{'+'.join(map(str, rounds))} flooders; the holder of "
                                       f"{leases} leases {'still' if alive else 'not'} answered")


def impostor(d: Aquad, meter: Meter, tmp: str) -> Outcome:
    """A fake daemon as uid 65534; a tenant of uid 1000 pointed at it."""
    variants = ["attacker's directory", "daemon of another user", "trusted uid, foreign segment"]
    if meter.quick:
        variants = variants[:1]
    offloaded = refused = leaked = 0
    for i, variant in enumerate(variants):
        directory = attacker_dir(tmp, f"evil{i}")
        env = {"AQUA_DAEMON_UID": str(NOBODY.pw_uid)} if variant.startswith("trusted") else {}
        with meter.attack(), _environ(env):
            imp = Impostor(os.path.join(directory, "aquad.sock"))
            if variant == "daemon of another user":
                os.chown(directory, 0, 0)  # the directory is fine now; the daemon is not
            try:
                victim = Tenant(imp, VICTIM_CODE.format(nbytes=NBYTES), user=VICTIM)
                out = victim.finish()[1]
                offloaded += out.count("offloaded")
                refused += out.startswith("refused UntrustedDaemon")
            finally:
                leaked += sum("tenant-bytes" in line for line in imp.stop())
    ok = offloaded == 0 and leaked == 0 and refused == len(variants)
    return Outcome(len(variants), ok, f"{offloaded} offloads accepted, {refused}/{len(variants)} "
                                      f"refused as untrusted, {leaked} tenant bytes read by the "
                                      f"impostor ({', '.join(variants)})")


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """Tenant copies os.environ when it starts its process."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _status_ms(sock: zmq.Socket, n: int = 20) -> float:
    """Median `status` round trip."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        assert _ask(sock, p.Status(), rid=100 + i)["ok"]
        times.append(time.perf_counter() - t0)
    return percentiles(times)["p50_us"] / 1e3


def churn(d: Aquad, meter: Meter, tmp: str) -> Outcome:
    """Tenants that come, take a turn and go, by the thousand: what they
    leave behind must not grow the daemon or slow `status`."""
    cycles = 2000 if meter.quick else 20000
    cycle = [p.encode_request(i + 1, op) for i, op in enumerate(
        (p.Hello(tenant="churn", devices=[0]), p.Turn(), p.TurnDone(), p.Bye()))]
    ctx = zmq.Context()
    sock = _dealer(ctx, d.socket)
    try:
        status_before = _status_ms(sock)
        meter.ready()
        failed = 0
        with meter.attack():
            for _ in range(cycles):
                for frame in cycle:
                    sock.send(frame)
                failed += sum(not msgpack.unpackb(sock.recv())["ok"] for _ in cycle)
        status_after = _status_ms(sock)
        left = len(_ask(sock, p.Status(), rid=99)["result"]["tenants"])
    finally:
        sock.close()
        ctx.term()
    grown = (_rss_kib(d.proc.pid) - meter.rss_before_kib) / 1024
    ok = failed == 0 and left == 1 and grown <= 16 and status_after <= 2 * status_before + 0.5
    return Outcome(cycles, ok, f"{failed} failed requests; {left} tenant left; RSS +{grown:.1f} "
                               f"MiB (limit 16); status p50 {status_before:.2f} -> "
                               f"{status_after:.2f} ms (limit 2x + 0.5)")


def _hog_shares(d: Aquad, windows: int, revocations: int) -> list[float]:
    """The hog's share of device 0's held time over each window, measured as
    test_hog does: whole cycles, from just after one of its revocations to
    just after the `revocations`-th one after it."""
    def revoked() -> int:
        return _held(d)[2]

    assert wait_until(lambda: revoked() >= 2, timeout=10)
    first = revoked()
    assert wait_until(lambda: revoked() > first, timeout=5, interval=0.005)
    shares = []
    for _ in range(windows):
        hog0, all0, seen = _held(d)
        assert wait_until(lambda: revoked() >= seen + revocations,  # noqa: B023 (called here)
                           timeout=10, interval=0.005)
        hog1, all1, _ = _held(d)
        shares.append((hog1 - hog0) / (all1 - all0))
    return shares


def hog(d: Aquad, meter: Meter, tmp: str) -> Outcome:
    """A tenant that never yields and asks again after every revocation,
    against two engines that always want the device."""
    engines, windows, revocations = 2, (1 if meter.quick else 2), (4 if meter.quick else 8)
    # docs/architecture.md (revocation): 1/(n+1) when the others never idle;
    # slack because a window ends a few ms after a revocation, not on it.
    bound = 1 / (engines + 1) + 0.05
    meter.ready()
    shares = []
    with meter.attack():  # from the hog's start: the honest tenant shares the daemon throughout
        procs = [Tenant(d, HOG)] + [Tenant(d, ENGINE) for _ in range(engines)]
        try:
            for proc in procs:
                assert proc.readline() == "ready"
            shares = _hog_shares(d, windows, revocations)
        finally:
            for proc in procs:
                proc.kill()
    ok = all(0.1 < s <= bound for s in shares)
    return Outcome(windows, ok, f"hog's share {', '.join(f'{s:.2f}' for s in shares)} over "
                                f"{revocations} revocations each (limit {bound:.2f}, and > 0.10)")


def _leased_until_refused(client: aqua.Client, nbytes: int, cap: int) -> list:
    held: list = []
    with contextlib.suppress(aqua.LimitExceeded):
        while len(held) < cap:
            held.append(client.lease(nbytes, populate=False))
    return held


def _other_uid_leases_and_registers(d: Aquad) -> str:
    """test_quotas' bystander, as uid 65534: 'ok <bytes leased> <tenants>'."""
    other = Tenant(d, OTHER_TENANT, user=(NOBODY.pw_uid, NOBODY.pw_gid))
    try:
        said = other.readline(timeout=60)
        other.send("done")
        other.finish()
        return said
    finally:
        other.kill()


def quota(d: Aquad, meter: Meter, tmp: str) -> Outcome:
    """One uid leases until refused and registers until refused; another uid
    must still lease and register."""
    meter.ready()
    with meter.attack(), aqua.connect("greedy", 0, socket=d.socket) as client:
        held = _leased_until_refused(client, 4 * MiB, cap=10000)
        try:
            with _registered_until_refused(d.socket, 1, cap=2000) as codes:
                said = _other_uid_leases_and_registers(d)
        finally:
            for lease in held:
                lease.release()
    lease_refused = len(held) < 10000
    ok = lease_refused and codes[-1] == "limit_exceeded" and said == f"ok {32 * MiB} 3"
    return Outcome(1, ok, f"root: {len(held)} leases of 4 MiB, then "
                          f"{'limit_exceeded' if lease_refused else 'no refusal'}; "
                          f"{codes.count('ok')} more tenants, then {codes[-1]}; "
                          f"uid {NOBODY.pw_uid} then said {said!r} (leased bytes, tenants)")


NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name
ATTACKS = [
    Attack("routing-id squat", squat),
    # 1,100 connects accepted and turned away in one burst: the honest
    # heartbeats queued behind it took 8.7-24 ms on 2 shared cores.
    Attack("fd exhaustion", fd_exhaustion, prefix=("prlimit", "--nofile=1024:1024"),
           p99_ms=50.0),
    Attack("status flooders", flooders, args=("--host-devices", "2x256MiB",
                                              "--heartbeat-timeout", "10")),
    Attack("impostor daemon", impostor),
    Attack("churn", churn),
    Attack("hog", hog, args=("--quantum-ms", "20", "--grace-ms", "100")),
    Attack("quota exhaustion", quota, args=("--socket-group", NOGROUP)),
]


# --- running and reporting ---------------------------------------------------


def run_row(attack: Attack, quick: bool) -> dict:
    tmp = tempfile.mkdtemp(prefix="aqua-faults-")
    os.chmod(tmp, 0o755)  # tenants of other uids must reach the sockets in it
    log = os.path.join(tmp, "aquad.log")
    row: dict = {"attack": attack.name}
    try:
        with aquad_process(tmp, "--host-devices", "2x64MiB", *attack.args,
                           prefix=attack.prefix, log=log) as d:
            time.sleep(WARMUP_S)
            probe = Probe(d.socket)
            time.sleep(WARMUP_S)
            meter = Meter(d, quick)
            try:
                outcome = attack.run(d, meter, tmp)
            except Exception as exc:  # a broken attack is a failed row, not a lost table
                outcome = Outcome(0, False, f"attack failed: {exc!r}")
            died_during = d.proc.poll() is not None
            peak = _rss_kib(d.proc.pid, "VmHWM") if not died_during else 0
            honest = probe.stop()
        crashes = int(died_during or d.proc.returncode != 0)
        log_tail = Path(log).read_text()[-2000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    before = _p99_ms(_inside(honest["samples"], [meter.baseline]))
    in_attack = _inside(honest["samples"], meter.windows)
    during = _p99_ms(in_attack)
    rss_before = meter.rss_before_kib / 1024
    growth = peak / 1024 - rss_before
    row.update(trials=outcome.trials, crashes=crashes, rss_before_mib=rss_before,
               rss_peak_mib=peak / 1024, p99_before_ms=before, p99_during_ms=during,
               honest_samples=len(honest["samples"]), samples_during=len(in_attack),
               honest_errors=honest["errors"],
               rss_growth_limit_mib=attack.rss_growth_mib, p99_limit_ms=attack.p99_ms,
               check=outcome.check, check_ok=outcome.ok)
    row["passed"] = bool(crashes == 0 and growth <= attack.rss_growth_mib
                         and during is not None and during <= attack.p99_ms
                         and not honest["errors"] and outcome.ok)
    if not row["passed"]:  # the daemon's own account of it goes with the row
        row["aquad_log_tail"] = log_tail
        print(f"{attack.name}: aquad's log ends:\n{log_tail}", file=sys.stderr)
    return row


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def render(rows: list[dict]) -> str:
    head = ["attack", "trials", "daemon crashes", "RSS before / peak MiB",
            "honest p99 before / during ms", "verdict"]
    body = [[r["attack"], r["trials"], r["crashes"],
             f"{r['rss_before_mib']:.0f} / {r['rss_peak_mib']:.0f}",
             f"{_ms(r['p99_before_ms'])} / {_ms(r['p99_during_ms'])}",
             f"{'pass' if r['passed'] else 'FAIL'} (peak +{r['rss_growth_limit_mib']:.0f} MiB, "
             f"p99 {r['p99_limit_ms']:.0f} ms)"] for r in rows]
    checks = "\n".join(f"  {r['attack']}: {'ok' if r['check_ok'] else 'FAILED'}: {r['check']}"
                       + (f"; honest errors: {r['honest_errors'][:3]}" if r["honest_errors"]
                          else "") for r in rows)
    return table(head, body) + "\n\nrow checks:\n" + checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller trials (smoke)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--only", help="comma-separated attack names (default: all)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: attackers and tenants run as other users")
    chosen = [a for a in ATTACKS if not args.only or a.name in args.only.split(",")]
    started = time.monotonic()
    rows = []
    for attack in chosen:
        rows.append(run_row(attack, args.quick))
        print(f"{attack.name}: {'pass' if rows[-1]['passed'] else 'FAIL'} "
              f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    print(render(rows))
    if args.json:
        write_json(args.json, {"quick": args.quick, "seconds": time.monotonic() - started,
                               "rows": rows})
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
