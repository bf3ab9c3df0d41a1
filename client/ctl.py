"""`aquactl`: what aquad holds, for operators (think nvidia-smi)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from . import protocol as p
from .client import Connection
from .errors import AquaError, DaemonUnavailable

EXIT_UNAVAILABLE = 2


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


def devices_table(status: dict) -> str:
    slices = {s["device"]: s for s in status.get("slices", [])}
    rows = []
    for d in status["devices"]:
        used = d["leased_bytes"] / d["capacity_bytes"] if d["capacity_bytes"] else 0.0
        sl = slices.get(d["id"], {})
        rows.append([d["id"], d["name"], d["backend"], human_bytes(d["capacity_bytes"]),
                     human_bytes(d["leased_bytes"]), human_bytes(d["free_bytes"]),
                     f"{used:.0%}", d["leases"], sl.get("holder") or "-",
                     len(sl.get("queue", []))])
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


def leases_table(status: dict) -> str:
    if not status["leases"]:
        return "no leases"
    names = {t["id"]: t["name"] for t in status["tenants"]}
    rows = [[l["id"], f"{l['tenant']} ({names.get(l['tenant'], '?')})", l["device"],
             l["tier"], human_bytes(l["nbytes"]), f"{l['age_s']:.1f}s"]
            for l in status["leases"]]
    return table(["LEASE", "TENANT", "DEV", "TIER", "SIZE", "AGE"], rows)


def slices_table(status: dict) -> str:
    names = {t["id"]: t["name"] for t in status["tenants"]}

    def who(tid: str | None) -> str:
        return "-" if tid is None else f"{tid} ({names.get(tid, '?')})"

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
            f"{len(status['leases'])} lease(s)")
    parts = [head, devices_table(status), topology_table(status), tenants_table(status),
             quotas_table(status), leases_table(status)]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aquactl", description="Inspect a running aquad.")
    parser.add_argument("--socket", metavar="PATH",
                        help="aquad socket (default: $AQUA_SOCKET, then the system default)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long to wait for aquad (default 5)")
    parser.add_argument("command", nargs="?", default="status", choices=sorted(VIEWS),
                        help="what to show (default: status)")
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output (schema: docs/status-schema.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        conn = Connection(args.socket, timeout=args.timeout)
    except AquaError as exc:  # not running, stale socket, no permission
        print(f"aquactl: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        status = conn.request(p.Status())
    except DaemonUnavailable as exc:
        print(f"aquactl: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except AquaError as exc:
        print(f"aquactl: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    render, key = VIEWS[args.command]
    if args.json:
        json.dump(status if key is None else status[key], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
