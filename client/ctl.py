"""`aquactl`: what aquad holds, for operators (think nvidia-smi)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

import aqua_protocol as p
from aqua_protocol import replies as r

from .client import Connection, iter_leases, status_page
from .errors import AquaError, DaemonUnavailable

EXIT_UNAVAILABLE = 2
# Lease rows a human table shows; the rest are counted. A screen cannot use
# 100k rows, and formatting them took seconds.
SHOWN_LEASES = 50


def human_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def namer(status: dict) -> Callable[[str | None], str]:
    """`t3 (llama)` for a tenant id, `-` for none."""
    names = {t["id"]: t["name"] for t in status["tenants"]}
    return lambda tid: "-" if tid is None else f"{tid} ({names.get(tid, '?')})"


def device_rows(status: dict, holder: Callable[[str | None], str]) -> list[list[object]]:
    """Per device: id, backend, capacity, leased, free, use, leases, the slice's
    holder (as `holder` writes it) and how many wait for the slice."""
    slices = {s["device"]: s for s in status.get("slices", [])}
    rows: list[list[object]] = []
    for d in status["devices"]:
        used = d["leased_bytes"] / d["capacity_bytes"] if d["capacity_bytes"] else 0.0
        sl = slices.get(d["id"], {})
        rows.append([d["id"], d["backend"], human_bytes(d["capacity_bytes"]),
                     human_bytes(d["leased_bytes"]), human_bytes(d["free_bytes"]),
                     f"{used:.0%}", d["leases"], holder(sl.get("holder")),
                     len(sl.get("queue", []))])
    return rows


def devices_table(status: dict) -> str:
    rows = device_rows(status, lambda tid: tid or "-")
    for row, d in zip(rows, status["devices"]):
        row.insert(1, d["name"])
    return table(["DEV", "NAME", "BACKEND", "CAPACITY", "LEASED", "FREE", "USE", "LEASES",
                  "SLICE", "WAITING"], rows)


def tenants_table(status: dict) -> str:
    if not status["tenants"]:
        return "no tenants"
    rows = [[t["id"], t["name"], t["pid"], t["uid"], ",".join(map(str, t["devices"])),
             f"{t['weight']:g}", t["leases"], human_bytes(t["leased_bytes"]),
             f"{t['idle_s']:.1f}s"] for t in status["tenants"]]
    return table(["TENANT", "NAME", "PID", "UID", "DEVICES", "WEIGHT", "LEASES", "LEASED",
                  "IDLE"], rows)


def lease_count(status: dict) -> int:
    return sum(d["leases"] for d in status["devices"])


def leases_table(status: dict, total: int | None = None) -> str:
    """The status's leases, and how many of `total` are not shown (None: not
    known, then only whether the page was full)."""
    leases = status["leases"]
    if not leases:
        return "no leases"
    who = namer(status)
    rows = [[l["id"], who(l["tenant"]), l["device"], l["tier"], human_bytes(l["nbytes"]),
             f"{l['age_s']:.1f}s"] for l in leases]
    out = table(["LEASE", "TENANT", "DEV", "TIER", "SIZE", "AGE"], rows)
    if total is None:
        if status.get("next") is not None:
            out += "\n... and maybe more (aquactl leases --all)"
    elif total > len(leases):
        out += f"\n... and {total - len(leases)} more (aquactl leases --all)"
    return out


def slices_table(status: dict) -> str:
    who = namer(status)
    parts = []
    for dev in status["slices"]:
        head = (f"device {dev['device']}: holder {who(dev['holder'])}, "
                f"queue [{', '.join(dev['queue'])}], quantum {dev['quantum_ms']:g} ms, "
                f"grace {dev['grace_ms']:g} ms")
        rows = [[who(t["tenant"]), t["state"], f"{t['weight']:g}", f"{t['share']:.1%}",
                 t["grants"], f"{t['wait_p50_ms']:.1f}", f"{t['wait_p99_ms']:.1f}",
                 t["revocations"], f"{t['quantum_ms']:g}"] for t in dev["tenants"]]
        body = table(["TENANT", "STATE", "WEIGHT", "SHARE", "GRANTS", "WAIT p50 ms",
                      "WAIT p99 ms", "REVOKED", "QUANTUM ms"], rows) if rows else "no tenants"
        parts.append(head + "\n" + body)
    return "\n\n".join(parts)


def _use(used: int | None, limit: int | None, show: Callable[[int], str] = str) -> str:
    return f"{'-' if used is None else show(used)} / {'none' if limit is None else show(limit)}"


def quotas_table(status: dict) -> str:
    """Use / limit per uid and per group, and the limits of every other uid."""
    quotas = status.get("quotas")  # absent from a daemon without quotas
    if quotas is None:
        return ""
    rows = [(f"uid {q['uid']}", q) for q in quotas["uids"]] + \
        [(f"group {q['gid']}", q) for q in quotas["groups"]] + \
        [("other uids", {"quota": "quota.default", "limit": quotas["default"], "used": {}})]
    return table(["QUOTA FOR", "FROM", "TENANTS", "LEASES", "BYTES"], [
        [who, q["quota"], _use(q["used"].get("tenants"), q["limit"]["tenants"]),
         _use(q["used"].get("leases"), q["limit"]["leases"]),
         _use(q["used"].get("bytes"), q["limit"]["bytes"], human_bytes)] for who, q in rows])


def link_label(link: dict | None) -> str:
    """nvidia-smi topo -m style: NV<n> NVLink, PEER PCIe peer-to-peer, HOST."""
    if link is None or link["tier"] == "host":
        return "HOST"
    if link["tier"] == "nvlink":
        return f"NV{link['nvlinks']}" if link.get("nvlinks") else "NV"
    return "PEER"


def topology_table(status: dict) -> str:
    """GPU-to-GPU links and what each GPU has spare; '' without GPUs."""
    gpus = [d for d in status["devices"] if d["backend"] == "cuda"]
    if not gpus:
        return ""
    links = {(l["consumer"], l["producer"]): l for l in status.get("links", [])}
    rows = [[f"GPU{a['id']}", *("X" if a["id"] == b["id"] else
                                 link_label(links.get((a["id"], b["id"]))) for b in gpus),
             human_bytes(a["free_bytes"]), human_bytes(a["leased_bytes"])]
            for a in gpus]
    legend = ("NV<n> = NVLink with n links, PEER = PCIe peer-to-peer, "
              "HOST = copies go through host memory")
    return table(["", *(f"GPU{g['id']}" for g in gpus), "SPARE", "LEASED"], rows) \
        + "\n" + legend


def render_status(status: dict) -> str:
    d = status["daemon"]
    head = (f"aquad: protocol {d['protocol']}, backend {d['backend']}, "
            f"up {d['uptime_s']:.0f}s, {len(status['tenants'])} tenant(s), "
            f"{lease_count(status)} lease(s)")
    parts = [head, devices_table(status), topology_table(status), tenants_table(status),
             quotas_table(status), leases_table(status, lease_count(status))]
    return "\n\n".join(p for p in parts if p)


VIEWS = {
    "status": (render_status, None),
    "tenants": (tenants_table, "tenants"),
    "leases": (leases_table, "leases"),
    "devices": (devices_table, "devices"),
    "slices": (slices_table, "slices"),
    "topology": (lambda s: topology_table(s) or "no GPUs, so no links", "links"),
    "quotas": (lambda s: quotas_table(s) or "aquad has no quotas", "quotas"),
}


# --- elastic memory: drain, undrain, reclaim ---------------------------------

ELASTIC_COMMANDS = ("drain", "undrain", "reclaim")


def parse_size(text: str) -> int:
    """`1GiB`, `512MiB`, `64KiB`, `4096` (bytes)."""
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "B": 1,
             "T": 2**40, "G": 2**30, "M": 2**20, "K": 2**10}
    t = text.strip().upper()
    for unit, size in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip():
            return int(float(t[:-len(unit)]) * size)
    return int(t)


def render_reclaim(report: r.ReclaimReport) -> str:
    """What moved where, what was fenced, and how long it took."""
    head = (f"reclaim {report.reclaim} of device {report.device}: {report.state} "
            f"in {report.elapsed_s * 1000:.1f} ms; took back "
            f"{human_bytes(report.taken_bytes)}, capacity now "
            f"{human_bytes(report.capacity_bytes)}")
    if report.over_bytes:
        head += f", {human_bytes(report.over_bytes)} still held (quarantined)"
    rows = [[m.lease, m.tenant, human_bytes(m.nbytes), "moved",
             f"device {m.to.device} ({m.to.tier})"] for m in report.moved]
    rows += [[x.lease, x.tenant, human_bytes(x.nbytes), "released", "-"]
             for x in report.released]
    rows += [[f.lease, f.tenant, human_bytes(f.nbytes),
              "fenced (held)" if f.quarantined else "fenced", "-"] for f in report.fenced]
    counts = (f"{report.moved_count} moved ({human_bytes(report.moved_bytes)}), "
              f"{report.released_count} released, {report.fenced_count} fenced")
    if not rows:
        return head + "\nno lease had to move"
    return "\n".join([head, table(["LEASE", "TENANT", "SIZE", "WHAT", "TO"], rows), counts])


def run_elastic(conn: Connection, args: argparse.Namespace
                ) -> r.ReclaimReport | r.Undrained:
    """Send drain / undrain / reclaim and wait for the report (the daemon
    ends every reclaim by its deadline, moving or fencing)."""
    operands = args.operands
    want = 2 if args.command == "reclaim" else 1
    if len(operands) != want:
        raise AquaError("usage: aquactl reclaim DEV SIZE [--deadline-ms N], "
                        "aquactl drain DEV, aquactl undrain DEV")
    device = int(operands[0])
    if args.command == "undrain":
        return conn.request(p.Undrain(device=device))
    if args.command == "drain":
        return conn.reclaim(p.Drain(device=device, deadline_ms=args.deadline_ms))
    return conn.reclaim(p.Reclaim(device=device, nbytes=parse_size(operands[1]),
                                  deadline_ms=args.deadline_ms))


# --- live views: `aquactl top` and `aquactl events` ---------------------------

# status `counters` shown as rates by `top`: (key, column)
RATES = (("lease_grants", "lease/s"), ("lease_frees", "free/s"), ("slice_grants", "slice/s"),
         ("preemptions", "preempt/s"), ("revocations", "revoke/s"),
         ("tenant_joins", "join/s"), ("tenant_drops", "drop/s"))


def rates(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Per-second rates of the status counters between two samples; {}
    from a daemon without counters."""
    a, b = before.get("counters"), after.get("counters")
    if not a or not b or seconds <= 0:
        return {}
    return {key: max(0.0, (b.get(key, 0) - a.get(key, 0)) / seconds) for key, _ in RATES}


def _tenant_slices(status: dict) -> dict[str, dict]:
    """Each tenant's slice row on its first home device."""
    rows: dict[str, dict] = {}
    for dev in status.get("slices", []):
        for row in dev["tenants"]:
            rows.setdefault(row["tenant"], row)
    return rows


def render_top(status: dict, per_s: dict[str, float], when: float) -> str:
    """One refresh of `aquactl top`: a summary line, devices, tenants."""
    head = [time.strftime("%H:%M:%S", time.localtime(when)),
            f"tenants {len(status['tenants'])}", f"leases {lease_count(status)}"]
    head += [f"{column} {per_s[key]:.1f}" for key, column in RATES if key in per_s]
    parts = ["# " + "  ".join(head),
             table(["DEV", "BACKEND", "CAPACITY", "LEASED", "FREE", "USE", "LEASES",
                    "SLICE", "WAITING"], device_rows(status, namer(status)))]
    if status["tenants"]:
        sl = _tenant_slices(status)
        rows = [[t["id"], t["name"], t["pid"], ",".join(map(str, t["devices"])), t["leases"],
                 human_bytes(t["leased_bytes"]), s.get("state", "-"), f"{s.get('share', 0.0):.0%}",
                 s.get("grants", 0), f"{s.get('wait_p99_ms', 0.0):.1f}", s.get("revocations", 0)]
                for t in status["tenants"] for s in [sl.get(t["id"], {})]]
        parts.append(table(["TENANT", "NAME", "PID", "DEVICES", "LEASES", "LEASED", "STATE",
                            "SHARE", "GRANTS", "WAIT p99 ms", "REVOKED"], rows))
    return "\n".join(parts)


def top(conn: Connection, args: argparse.Namespace) -> int:
    """Like `nvidia-smi dmon`: a block per interval, appended, no curses;
    --json: one status object per line, with `time` and `rates` added."""
    before: tuple[float, dict] | None = None
    shown = 0
    while True:
        # The summary without leases, waiting out the daemon's rate limit.
        status = status_page(conn, p.Status(leases=False), tries=math.inf)
        now, wall = time.monotonic(), time.time()
        per_s = rates(before[1], status, now - before[0]) if before else {}
        if args.json:
            print(json_text({"time": round(wall, 3), "rates": per_s, **status}, False))
        else:  # blocks apart by a blank line
            print(("\n" if shown else "") + render_top(status, per_s, wall))
        sys.stdout.flush()
        shown += 1
        if args.count is not None and shown >= args.count:
            return 0
        before = (now, status)
        time.sleep(args.interval)


def render_event(event: dict) -> str:
    """`HH:MM:SS.mmm kind key=value ...`, logfmt like aquad's own log."""
    when = event.get("time", 0.0)
    stamp = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
    fields = []
    for key, value in event.items():
        if key in ("time", "kind", "seq"):
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value))
        text = str(value)
        fields.append(f"{key}={json.dumps(text) if (' ' in text or not text) else text}")
    line = f"{stamp} {event.get('kind', '?')} {' '.join(fields)}".rstrip()
    missed = event.get("missed")
    if missed:
        line = f"... {missed} event(s) missed: this reader was too slow\n" + line
    return line


def events(conn: Connection, args: argparse.Namespace) -> int:
    """Subscribe and print the daemon's events as they come, until --count
    or the connection ends."""
    got: list[dict] = []

    def keep(event: r.Event) -> None:
        if isinstance(event, r.Feed):
            got.append(msgspec.to_builtins(event))

    conn.on_event = keep
    conn.keepalive_s = float("inf")  # not a tenant: nothing to keep alive
    conn.request(p.Subscribe())
    print("# subscribed to aquad's events", file=sys.stderr, flush=True)
    shown = 0
    while True:
        conn.wait_for(lambda: bool(got), None)
        batch, got[:] = list(got), []
        for event in batch:
            print(json_text(event, False) if args.json else render_event(event))
            shown += 1
            if args.count is not None and shown >= args.count:
                sys.stdout.flush()
                return 0
        sys.stdout.flush()


LIVE = {"top": top, "events": events}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aquactl", description="Inspect a running aquad.")
    parser.add_argument("--socket", metavar="PATH",
                        help="aquad socket (default: $AQUA_SOCKET, then the system default)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long to wait for aquad (default 5)")
    parser.add_argument("command", nargs="?", default="status",
                        choices=sorted([*VIEWS, *ELASTIC_COMMANDS, *LIVE]),
                        help="what to show (default: status); `top` refreshes every "
                             "--interval, `events` streams what happens; drain DEV, "
                             "undrain DEV, reclaim DEV SIZE take memory back")
    parser.add_argument("operands", nargs="*", metavar="ARG",
                        help="for drain / undrain: DEV; for reclaim: DEV SIZE (e.g. 1GiB)")
    parser.add_argument("--deadline-ms", type=int, default=p.messages.DEFAULT_DEADLINE_MS,
                        metavar="N", help="drain / reclaim: how long holders have to move "
                                          "their leases before the rest is fenced")
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output (schema: docs/status-schema.md)")
    parser.add_argument("--pretty", action="store_true",
                        help="indent JSON (the default only when stdout is a terminal)")
    live = parser.add_argument_group("live views", "for `aquactl top` and `aquactl events`")
    live.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                      help="top: seconds between refreshes (default 2)")
    live.add_argument("--count", type=int, metavar="N",
                      help="stop after N refreshes (top) or N events (events)")
    leases = parser.add_argument_group("leases", "for `aquactl leases`")
    leases.add_argument("--tenant", metavar="ID", help="only this tenant's leases (t<n>)")
    leases.add_argument("--device", type=int, metavar="ID", help="only leases on this device")
    leases.add_argument("--all", action="store_true",
                        help=f"every lease, paged from aquad (default: the first "
                             f"{SHOWN_LEASES}, or {p.MAX_STATUS_LEASES} with --json)")
    return parser


def fetch(conn: Connection, args: argparse.Namespace) -> dict:
    """What the command shows, in as few and as small replies as it needs."""
    limit = p.MAX_STATUS_LEASES if args.json else SHOWN_LEASES
    if args.command != "leases":
        # The lease table of `status` shows a screenful; the JSON is the
        # daemon's status object, first page of leases included.
        return conn.request(p.Status(leases=args.command == "status", limit=limit))
    status = conn.request(p.Status(leases=False))
    if args.all:
        status["leases"] = list(iter_leases(conn, tenant=args.tenant, device=args.device))
    else:
        page = conn.request(p.Status(tenant=args.tenant, device=args.device, limit=limit))
        status["leases"], status["next"] = page["leases"], page.get("next")
    return status


def filtered_total(status: dict, args: argparse.Namespace) -> int | None:
    """Leases matching `aquactl leases`'s filters, from the summary; None
    when the summary cannot tell (both filters: a tenant's per-device split
    is not kept)."""
    if args.tenant is not None and args.device is not None:
        return None
    if args.tenant is not None:
        return next((t["leases"] for t in status["tenants"] if t["id"] == args.tenant), 0)
    if args.device is not None:
        return next((d["leases"] for d in status["devices"] if d["id"] == args.device), 0)
    return lease_count(status)


def json_text(doc: object, pretty: bool) -> str:
    # Compact unless a person reads it (indenting 100k leases took 0.4 s),
    # and one string to print: json.dump encodes in Python and writes every
    # token, 3 million writes and 16 s for 100k leases; json.dumps takes the
    # C encoder.
    return json.dumps(doc, indent=2) if pretty else json.dumps(doc, separators=(",", ":"))


def show_view(conn: Connection, args: argparse.Namespace) -> str:
    status = fetch(conn, args)
    render, key = VIEWS[args.command]
    if args.json:
        return json_text(status if key is None else status[key], args.pretty or sys.stdout.isatty())
    if args.command == "leases":
        return leases_table(status, filtered_total(status, args))
    return render(status)


def show_elastic(conn: Connection, args: argparse.Namespace) -> str:
    result = run_elastic(conn, args)
    if args.json:
        return json_text(msgspec.to_builtins(result), args.pretty or sys.stdout.isatty())
    if isinstance(result, r.Undrained):
        return (f"device {result.device} open again: capacity "
                f"{human_bytes(result.capacity_bytes)}, free {human_bytes(result.free_bytes)}")
    return render_reclaim(result)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "leases" and (args.tenant or args.device is not None or args.all):
        print("aquactl: --tenant, --device and --all go with `aquactl leases`",
              file=sys.stderr)
        return 1
    if args.command not in LIVE and (args.count is not None):
        print("aquactl: --count goes with `aquactl top` and `aquactl events`", file=sys.stderr)
        return 1
    if args.interval <= 0 or (args.count is not None and args.count < 1):
        print("aquactl: --interval and --count must be positive", file=sys.stderr)
        return 1
    try:
        conn = Connection(args.socket, timeout=args.timeout)
    except AquaError as exc:  # not running, stale socket, no permission
        print(f"aquactl: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.command in LIVE:
        # Ctrl-C, or `aquactl events | head` closing the pipe, ends it quietly.
        code, result = _ask(conn, lambda: LIVE[args.command](conn, args),
                            quiet=(KeyboardInterrupt, BrokenPipeError))
        return code if result is None else result
    if args.operands and args.command not in ELASTIC_COMMANDS:
        print(f"aquactl: {args.command} takes no operands", file=sys.stderr)
        conn.close()
        return 1
    show = show_elastic if args.command in ELASTIC_COMMANDS else show_view
    code, text = _ask(conn, lambda: show(conn, args))
    if text is not None:
        print(text)
    return code


def _ask(conn: Connection, call: Callable[[], Any],
         quiet: tuple[type[BaseException], ...] = ()) -> tuple[int, Any]:
    """Run `call` against the daemon, then close the connection: (0, its
    result), or (exit code, None) with the error said on stderr; the
    `quiet` exceptions end it without a word (exit 0)."""
    try:
        return 0, call()
    except quiet:
        return 0, None
    except DaemonUnavailable as exc:
        print(f"aquactl: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE, None
    except (AquaError, ValueError) as exc:
        print(f"aquactl: {exc}", file=sys.stderr)
        return 1, None
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
