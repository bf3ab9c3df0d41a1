"""aquad configuration: TOML file, then command-line flags on top."""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import dataclass, fields

from aqua.paths import resolve_socket

_UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


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


@dataclass
class Config:
    socket: str = ""
    socket_group: str = ""
    backend: str = "auto"
    host_devices: str = "4x1GiB"
    # cuda backend: what each GPU keeps for its own work, the safety margin
    # below free memory, and the pinned host-DRAM tier ("0" = none).
    gpu_reserve: str = "0"
    gpu_headroom: str = "1GiB"
    host_pinned: str = "4GiB"
    heartbeat_timeout_s: float = 5.0
    quantum_ms: float = 100.0
    grace_ms: float = 1000.0
    max_tenants: int = 1024
    max_leases_per_tenant: int = 4096
    log_level: str = "info"

    def validate(self) -> Config:
        self.socket = resolve_socket(self.socket or None)
        if self.backend not in ("auto", "host", "cuda"):
            raise ConfigError(f"backend must be auto, host or cuda, got {self.backend!r}")
        parse_host_devices(self.host_devices)
        parse_gpu_reserve(self.gpu_reserve)
        parse_amount(self.gpu_headroom, "gpu_headroom")
        parse_amount(self.host_pinned, "host_pinned")
        if not 0.1 <= self.heartbeat_timeout_s <= 3600:
            raise ConfigError("heartbeat_timeout_s must be within 0.1..3600 seconds")
        if not 1 <= self.quantum_ms <= 60_000:
            raise ConfigError(f"quantum_ms must be within 1..60000, got {self.quantum_ms:g}")
        if not 0 <= self.grace_ms <= 600_000:
            raise ConfigError(f"grace_ms must be within 0..600000, got {self.grace_ms:g}")
        if self.max_tenants < 1 or self.max_leases_per_tenant < 1:
            raise ConfigError("max_tenants and max_leases_per_tenant must be >= 1")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level must be debug, info, warning or error")
        return self


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    section = data.get("aquad", data)
    known = {f.name: f.type for f in fields(Config)}
    unknown = set(section) - set(known)
    if unknown:
        raise ConfigError(f"config {path}: unknown key(s) {', '.join(sorted(unknown))}")
    return section


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aquad", description="aqua daemon: leases spare GPU/host memory to tenants.")
    p.add_argument("--config", metavar="FILE", help="TOML file (keys as the long flags, "
                   "with underscores, optionally under an [aquad] table)")
    p.add_argument("--socket", metavar="PATH",
                   help="socket path (default: $AQUA_SOCKET, else /run/aqua/aquad.sock as "
                        "root or $XDG_RUNTIME_DIR/aqua/aquad.sock)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group owning the socket (members may connect; mode is 0660)")
    p.add_argument("--backend", choices=("auto", "host", "cuda"))
    p.add_argument("--host-devices", metavar="COUNTxSIZE",
                   help="virtual devices of the host backend, e.g. 4x2GiB (default 4x1GiB)")
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
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
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
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ConfigError(f"{key} must be {expected.__name__}, got {value!r}")
        setattr(config, key, value)
    return config.validate()
