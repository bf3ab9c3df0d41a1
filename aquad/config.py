"""aquad configuration: TOML file, then command-line flags on top."""

from __future__ import annotations

import argparse
import dataclasses
import grp
import math
import pwd
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from aqua_protocol.messages import MAX_WEIGHT, MIN_WEIGHT, NAME_RE
from aqua_protocol.paths import resolve_socket

from .core.limits import Limits
from .core.quotas import DEFAULT_QUOTA, Quota, QuotaPolicy, Share
from .core.weights import WeightPolicy

_UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_PERCENT_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")


class ConfigError(ValueError):
    """A configuration value aquad refuses; the message says which and why."""


def parse_size(text: str | int) -> int:
    """'2GiB' -> 2147483648. Binary units only: a GB/GiB mix-up is 7%."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"size must be positive, got {text}")
        return text
    match = _SIZE_RE.fullmatch(str(text))
    if not match or match.group(2) not in _UNITS:
        raise ConfigError(
            f"cannot read size {text!r}: write a number with a binary unit "
            f"(B, KiB, MiB, GiB, TiB), e.g. 512MiB or 2GiB")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 1 or value != int(value):
        raise ConfigError(f"size {text!r} is not a positive whole number of bytes")
    return int(value)


def parse_amount(text: str | int, what: str) -> int:
    """A size that may be zero ('0' turns a budget off): '0' -> 0, '8GiB' -> 8 GiB."""
    if (isinstance(text, int) and not isinstance(text, bool) and text == 0) \
            or str(text).strip() in ("0", "0B"):
        return 0
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def parse_gpu_reserve(text: str) -> tuple[int, dict[int, int]]:
    """'8GiB,0=40GiB' -> (8 GiB for every GPU, {0: 40 GiB}).

    Items are comma-separated: one bare SIZE (the default for every GPU) and
    any number of INDEX=SIZE for single GPUs, by their nvidia-smi index."""
    default: int | None = None
    per_gpu: dict[int, int] = {}
    for item in str(text).split(","):
        index, sep, size = item.partition("=")
        if not sep:
            if default is not None:
                raise ConfigError(f"gpu_reserve {text!r} has two defaults; write one SIZE "
                                  f"and INDEX=SIZE for single GPUs, e.g. 8GiB,0=40GiB")
            default = parse_amount(item, "gpu_reserve")
            continue
        if not index.strip().isdigit() or int(index) > 1023:
            raise ConfigError(f"gpu_reserve: {index.strip()!r} is not a GPU index (0..1023); "
                              f"write INDEX=SIZE, e.g. 0=40GiB")
        if int(index) in per_gpu:
            raise ConfigError(f"gpu_reserve names GPU {int(index)} twice")
        per_gpu[int(index)] = parse_amount(size, f"gpu_reserve for GPU {int(index)}")
    return default or 0, per_gpu


def parse_host_devices(text: str) -> tuple[int, int]:
    """'4x2GiB' -> (4, 2 GiB)."""
    count, sep, size = str(text).partition("x")
    if not sep or not count.strip().isdigit():
        raise ConfigError(
            f"cannot read host devices {text!r}: write COUNTxSIZE, e.g. 4x2GiB")
    n = int(count)
    if not 1 <= n <= 64:
        raise ConfigError(f"host device count must be 1..64, got {n}")
    return n, parse_size(size)


def _table(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, got {value!r}")
    return value


def _only(table: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = set(table) - set(allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(allowed)}")


def _count(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} must be a whole number >= 1, got {value!r}")
    return value


def _share(value: object, where: str) -> Share | None:
    """'50%' -> Share(50); None if `value` is not a percentage."""
    match = _PERCENT_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    percent = float(match.group(1))
    if not 0 < percent <= 100:
        raise ConfigError(f"{where} must be a percentage in (0, 100], got {value!r}")
    return Share(percent)


def _quota_bytes(value: object, where: str) -> int | Share:
    share = _share(value, where)
    if share is not None:
        return share
    try:
        return parse_size(value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}, or a percentage of the capacity, "
                          f"e.g. 50%") from None


def _quota_tenants(value: object, where: str) -> int | Share:
    share = _share(value, where)
    return share if share is not None else _count(value, where)


_QUOTA_KEYS: dict[str, Callable[[object, str], int | Share]] = {
    "bytes": _quota_bytes, "leases": _count, "tenants": _quota_tenants}


def _quota(table: object, name: str, base: Quota) -> Quota:
    """One [quota.*] table; what it leaves out comes from `base`."""
    table = _table(table, f"[{name}]")
    _only(table, tuple(_QUOTA_KEYS), f"[{name}]")
    given = {key: parse(table[key], f"{name}.{key}")
             for key, parse in _QUOTA_KEYS.items() if key in table}
    return dataclasses.replace(base, name=name, **given)


def _named_id(key: str, where: str, kind: str, lookup: Callable[[str], int]) -> int:
    """A numeric id, or the id of a user or group name."""
    if key.isascii() and key.isdigit():
        return int(key)
    try:
        return lookup(key)
    except KeyError:
        raise ConfigError(f"{where}.{key}: no {kind} named {key!r} (write a "
                          f"{kind[0]}id or a {kind} name)") from None


def _user_id(key: str, where: str) -> int:
    return _named_id(key, where, "user", lambda name: pwd.getpwnam(name).pw_uid)


def _group_id(key: str, where: str) -> int:
    return _named_id(key, where, "group", lambda name: grp.getgrnam(name).gr_gid)


def _by_id(table: object, where: str, to_id: Callable[[str, str], int],
           value: Callable[[object, str], object]) -> dict:
    """{uid or gid: value} from a table keyed by ids or names."""
    out: dict = {}
    for key, entry in _table(table, where).items():
        ident = to_id(key, where)
        if ident in out:
            raise ConfigError(f"{where} names {ident} twice ({key!r} is one of them)")
        out[ident] = value(entry, f"{where}.{key}")
    return out


def parse_quotas(table: dict) -> QuotaPolicy:
    """The [quota] tables: default, uid.<uid or user>, group.<gid or group>.

    A uid's table overrides what it names of [quota.default]. A group's limits
    what its members hold together (by their primary gid); what it leaves out
    is not limited for the group, each member keeping its uid's quota."""
    _only(table, ("default", "uid", "group"), "[quota]")
    default = _quota(table.get("default", {}), "quota.default", DEFAULT_QUOTA)
    uids = _by_id(table.get("uid", {}), "quota.uid", _user_id,
                  lambda entry, name: _quota(entry, name, default))
    groups = _by_id(table.get("group", {}), "quota.group", _group_id,
                    lambda entry, name: _quota(entry, name, Quota()))
    return QuotaPolicy(default, uids, groups)


def _weight(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise ConfigError(f"{where} must be a number in {MIN_WEIGHT:g}..{MAX_WEIGHT:g}, "
                          f"got {value!r}")
    return float(value)


def _tenant_name(key: str, where: str) -> str:
    if not NAME_RE.fullmatch(key):
        raise ConfigError(f"{where}.{key}: not a tenant name ({NAME_RE.pattern})")
    return key


def parse_weights(table: dict) -> WeightPolicy:
    """The [weights] table: default, uid.<uid or user>, tenant.<name>."""
    _only(table, ("default", "uid", "tenant"), "[weights]")
    default = _weight(table.get("default", WeightPolicy.default), "weights.default")
    uids = _by_id(table.get("uid", {}), "weights.uid", _user_id, _weight)
    tenants = _by_id(table.get("tenant", {}), "weights.tenant", _tenant_name, _weight)
    highest = max([default, *uids.values()])
    for name, weight in tenants.items():
        # A name only lowers its uid's weight (tenants choose their names), so
        # an entry at or above every uid's weight would silently do nothing.
        if weight >= highest:
            raise ConfigError(
                f"weights.tenant.{name} = {weight:g} would never apply: a tenant name "
                f"only lowers the weight of the uid that runs it, and no uid has a weight "
                f"above {highest:g}; give that uid the weight (weights.uid.<uid>)")
    return WeightPolicy(default, uids, tenants)


# Numeric settings and the bounds validate() holds them to.
_RANGES = {"heartbeat_timeout_s": (0.1, 3600), "quantum_ms": (1, 60_000),
           "grace_ms": (0, 600_000), "adopt_grace_s": (0, 3600),
           "max_tenants": (1, math.inf), "max_leases_per_tenant": (1, math.inf)}


@dataclass
class Config:
    socket: str = ""
    socket_group: str = ""
    backend: str = "auto"
    host_devices: str = "4x1GiB"
    # Where host segments live (aquad/shmdir.py): a tmpfs mounted
    # huge=within_size gives leases 2 MiB pages; shm_mount lets aquad mount it.
    shm_dir: str = "/dev/shm"
    shm_mount: bool = False
    # cuda backend: what each GPU keeps for its own work, the safety margin
    # below free memory, and the pinned host-DRAM tier ("0" = none).
    gpu_reserve: str = "0"
    gpu_headroom: str = "1GiB"
    host_pinned: str = "4GiB"
    # Defaults are the core's (Limits), in the units operators write.
    heartbeat_timeout_s: float = Limits.heartbeat_timeout_s
    quantum_ms: float = Limits.quantum_s * 1000
    grace_ms: float = Limits.grace_s * 1000
    # How long leases of a crashed predecessor wait for their owners to
    # reclaim them (host backend) before they are freed.
    adopt_grace_s: float = 30.0
    max_tenants: int = Limits.max_tenants
    max_leases_per_tenant: int = Limits.max_leases_per_tenant
    log_level: str = "info"
    # Prometheus metrics: "" (off), HOST:PORT, unix:PATH or file:PATH.prom
    # (aquad/metrics.py); tenant names as a label only when asked.
    metrics: str = ""
    metrics_tenant_labels: bool = False
    # The [quota] and [weights] tables as read (parse_quotas, parse_weights).
    quota: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)

    def validate(self) -> Config:
        self.socket = resolve_socket(self.socket or None)
        if self.backend not in ("auto", "host", "cuda"):
            raise ConfigError(f"backend must be auto, host or cuda, got {self.backend!r}")
        parse_host_devices(self.host_devices)
        parse_gpu_reserve(self.gpu_reserve)
        parse_amount(self.gpu_headroom, "gpu_headroom")
        parse_amount(self.host_pinned, "host_pinned")
        for key, (low, high) in _RANGES.items():
            value = getattr(self, key)
            if not low <= value <= high:
                raise ConfigError(f"{key} must be within {low:g}..{high:g}, got {value:g}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")
        if self.metrics:
            from .metrics import MetricsError, parse_target

            try:
                parse_target(self.metrics)
            except MetricsError as exc:
                raise ConfigError(str(exc)) from None
        parse_quotas(self.quota)
        parse_weights(self.weights)
        return self


_TABLES = ("quota", "weights")  # top-level tables of the config beside [aquad]


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    if "aquad" in data:
        # Beside [aquad], only the policy tables, which live at the top level.
        section, outside = data["aquad"], {k: v for k, v in data.items() if k != "aquad"}
        misplaced = sorted(set(section) & set(_TABLES))
        if misplaced:
            raise ConfigError(f"config {path}: [aquad.{misplaced[0]}] belongs at the top "
                              f"level, as [{misplaced[0]}...]")
        strays = sorted(set(outside) - set(_TABLES))
        if strays:
            raise ConfigError(f"config {path}: {', '.join(strays)} outside [aquad]; only the "
                              f"{' and '.join(f'[{t}]' for t in _TABLES)} tables go there")
        section = {**section, **outside}
    else:
        section = data
    unknown = set(section) - {f.name for f in fields(Config)}
    if unknown:
        raise ConfigError(f"config {path}: unknown key(s) {', '.join(sorted(unknown))}")
    return section


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aquad", description="aqua daemon: leases spare GPU/host memory to tenants.")
    p.add_argument("--config", metavar="FILE", help="TOML file (keys as the long flags, "
                   "with underscores, optionally under an [aquad] table; quotas and GPU-time "
                   "weights in [quota.*] and [weights] tables: see systemd/aquad.toml)")
    p.add_argument("--socket", metavar="PATH",
                   help="socket path (default: $AQUA_SOCKET, else /run/aqua/aquad.sock as "
                        "root or $XDG_RUNTIME_DIR/aqua/aquad.sock)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group owning the socket (members may connect; mode is 0660)")
    p.add_argument("--backend", choices=("auto", "host", "cuda"))
    p.add_argument("--host-devices", metavar="COUNTxSIZE",
                   help="virtual devices of the host backend, e.g. 4x2GiB (default 4x1GiB)")
    p.add_argument("--shm-dir", metavar="DIR",
                   help="directory for host lease segments, ideally a tmpfs mounted "
                        "huge=within_size (2 MiB pages); /dev/shm where it cannot be used "
                        "(default /dev/shm)")
    p.add_argument("--shm-mount", action="store_true", default=None,
                   help="mount that tmpfs at --shm-dir if it is not one yet (needs root in "
                        "the host's mount namespace; falls back to /dev/shm otherwise)")
    p.add_argument("--gpu-reserve", metavar="SIZE[,INDEX=SIZE...]",
                   help="cuda backend: memory each GPU keeps for its own work, never leased; "
                        "per GPU with INDEX=SIZE, e.g. 8GiB,0=40GiB (default 0)")
    p.add_argument("--gpu-headroom", metavar="SIZE",
                   help="cuda backend: margin left below each GPU's free memory (default 1GiB)")
    p.add_argument("--host-pinned", metavar="SIZE",
                   help="cuda backend: host-DRAM tier in shared memory, pinned by tenants; "
                        "0 for none (default 4GiB)")
    p.add_argument("--heartbeat-timeout", dest="heartbeat_timeout_s", type=float,
                   metavar="SECONDS", help="drop a silent tenant after this long (default 5)")
    p.add_argument("--quantum-ms", dest="quantum_ms", type=float, metavar="MS",
                   help="GPU time slice before a holder may be preempted (default 100)")
    p.add_argument("--grace-ms", dest="grace_ms", type=float, metavar="MS",
                   help="time a preempted holder has to yield before revocation (default 1000)")
    p.add_argument("--adopt-grace", dest="adopt_grace_s", type=float, metavar="SECONDS",
                   help="after a crash, how long a predecessor's host leases wait for their "
                        "owners to reclaim them (default 30)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--metrics", metavar="WHERE",
                   help="serve Prometheus metrics: HOST:PORT (an IP address, e.g. "
                        "127.0.0.1:9400), unix:PATH (HTTP on a Unix socket) or "
                        "file:PATH.prom (node_exporter's textfile collector); default off")
    p.add_argument("--metrics-tenant-labels", action="store_true", default=None,
                   help="also export per-tenant-name gauges (tenants choose their names: "
                        "up to max_tenants series)")
    return p


def load_config(argv: list[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    values: dict = {}
    if args.config:
        values.update(load_toml(args.config))
    for key, value in vars(args).items():
        if key != "config" and value is not None:
            values[key] = value
    config = Config()
    for key, value in values.items():
        expected = type(getattr(config, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ConfigError(f"{key} must be {expected.__name__}, got {value!r}")
        setattr(config, key, value)
    return config.validate()
