"""systemd/aquad.service: what aquad needs is in it, systemd accepts every
line of it, and its sandbox stays as tight as measured.

systemd-analyze works offline (no systemd running). `make setup` installs
Debian's systemd package where it is missing and we are root; elsewhere the
tests that need it skip, except in CI, where a missing tool is a failure.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from aquad.config import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "aquad.service"
CONFIG = ROOT / "systemd" / "aquad.toml"
# A name no installed drop-in (systemctl edit aquad) applies to.
NAME = "aquad-under-test.service"
# `systemd-analyze security --offline=true` on systemd 252 (Debian 12). A
# higher figure means a protection went missing: see the rows it prints.
EXPOSURE_MAX = 2.4

ANALYZE = shutil.which("systemd-analyze")
HOW = ("systemd-analyze not found: install the systemd package (apt-get install "
       "systemd; `make setup` does it as root); it runs offline, no systemd needed")


def need_analyze() -> str:
    if ANALYZE is None:
        if os.environ.get("CI"):
            pytest.fail(HOW)
        pytest.skip(HOW)
    return ANALYZE


def directives(text: str) -> dict[str, list[str]]:
    """Key -> every value, in order (systemd keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def aquad_command() -> str:
    """The real aquad of this environment, for systemd's executable check."""
    script = pathlib.Path(sys.executable).with_name("aquad")
    if script.exists():
        return str(script)
    found = shutil.which("aquad")
    return found if found else f"{sys.executable} -m aquad"


def unit_copy(tmp_path: pathlib.Path, text: str | None = None) -> pathlib.Path:
    text = UNIT.read_text() if text is None else text
    text, n = re.subn(r"^ExecStart=/usr/local/bin/aquad(?= |$)",
                      f"ExecStart={aquad_command()}", text, flags=re.M)
    assert n == 1, "ExecStart= is not /usr/local/bin/aquad any more: update this test"
    path = tmp_path / NAME
    path.write_text(text)
    return path


def verify(path: pathlib.Path) -> tuple[int, list[str]]:
    """Exit status, and the lines about our unit (systemd may also report on
    unrelated units installed on this machine)."""
    out = subprocess.run([need_analyze(), "verify", str(path)], capture_output=True,
                         text=True, timeout=120, cwd=path.parent,
                         env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER=""))
    lines = (out.stdout + out.stderr).splitlines()
    return out.returncode, [line for line in lines if "aquad" in line]


def analyze_version() -> int:
    out = subprocess.run([need_analyze(), "--version"], capture_output=True, text=True,
                         timeout=60)
    match = re.match(r"systemd (\d+)", out.stdout)
    return int(match.group(1)) if match else 0


# --- what aquad needs, no systemd required ---------------------------------

def test_the_unit_keeps_what_aquad_needs():
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]  # aquad sends READY=1 once the socket is bound
    # aquad pings from its loop at least every WatchdogSec/3 (tests/test_watchdog.py)
    (watchdog,) = d["WatchdogSec"]
    assert watchdog.endswith("s") and 10 <= int(watchdog[:-1]) <= 120
    assert d.get("NotifyAccess", ["main"]) == ["main"]  # the pings come from aquad itself
    assert d["Restart"] == ["on-failure"]
    caps = set(" ".join(d["CapabilityBoundingSet"]).split())
    assert {"CAP_CHOWN", "CAP_FOWNER"} <= caps  # lease files to tenants' uids
    # aquad refuses a socket directory that group or others can write.
    assert int(d["RuntimeDirectoryMode"][0], 8) & 0o022 == 0
    soft, _, hard = d["LimitNOFILE"][0].partition(":")
    assert int(soft) >= 16384 and (not hard or hard == soft)
    assert d["UMask"] == ["0077"]
    # Tenants outside the sandbox map what aquad creates in /dev/shm, and
    # aquad opens the GPUs: none of these may appear.
    for hiding in ("PrivateDevices", "PrivateIPC", "PrivateUsers", "PrivateNetwork",
                   "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute"):
        assert d.get(hiding, ["no"])[-1] in ("no", "false", ""), hiding
    assert "/dev/shm" in " ".join(d.get("ReadWritePaths", []))


def test_the_example_config_parses_and_matches_the_unit():
    config = load_config(["--config", str(CONFIG)])
    d = directives(UNIT.read_text())
    # The socket lives in the directory systemd makes for it.
    assert os.path.dirname(config.socket) == "/run/" + d["RuntimeDirectory"][0]
    # The unit reads the file where systemd/README.md installs this example.
    assert "--config /etc/aqua/aquad.toml" in d["ExecStart"][0]


# --- systemd's own checks -----------------------------------------------------

def test_systemd_accepts_every_line(tmp_path):
    code, ours = verify(unit_copy(tmp_path))
    assert code == 0 and ours == [], "\n".join(ours)


def test_verify_would_see_a_bad_line(tmp_path):
    """The check above is not vacuous: a typo and a bad value are reported."""
    text = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=perhaps\nProtectHomme=yes")
    _, ours = verify(unit_copy(tmp_path, text))
    assert any("ProtectHomme" in line for line in ours), ours
    assert any("perhaps" in line for line in ours), ours


def test_the_syscall_filter_allows_what_aquad_calls():
    """pidfd_open (tenant liveness), memfd_create, mmap, ftruncate and fchown
    (lease files), flock (the socket lock) pass the unit's filter."""
    analyze = need_analyze()
    listing = subprocess.run([analyze, "syscall-filter"], capture_output=True, text=True,
                             timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.split()[0])

    def expand(names: list[str], seen: set[str]) -> set[str]:
        calls = set()
        for name in names:
            if not name.startswith("@"):
                calls.add(name)
            elif name not in seen:
                seen.add(name)
                calls |= expand(groups.get(name, []), seen)
        return calls

    d = directives(UNIT.read_text())
    allowed = set()
    for value in d["SystemCallFilter"]:
        assert not value.startswith("~"), "a deny list here would drop what aquad needs"
        allowed |= expand(value.split(), set())
    needed = {"pidfd_open", "memfd_create", "mmap", "munmap", "ftruncate", "fchown",
              "fchmod", "flock", "openat", "unlinkat", "getdents64", "fstatfs", "ioctl",
              "socket", "bind", "listen", "accept4", "getsockopt", "sendto", "epoll_wait",
              "eventfd2", "poll", "sched_yield", "prlimit64", "mbind"}
    assert needed - allowed == set()


def test_exposure_is_at_most_what_was_measured(tmp_path):
    if analyze_version() < 250:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
    out = subprocess.run([need_analyze(), "security", "--offline=true", "--no-pager",
                          str(unit_copy(tmp_path))], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path,
                         env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER=""))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    score = float(match.group(1))
    print(f"exposure of aquad.service: {score} (at most {EXPOSURE_MAX})")
    missing = [line for line in out.stdout.splitlines() if line.startswith("✗")]
    assert score <= EXPOSURE_MAX, "\n".join(missing)


# --- the metrics drop-in ------------------------------------------------------

DROP_IN = ROOT / "systemd" / "aquad-metrics.conf"


def test_the_metrics_drop_in_opens_loopback_only():
    d = directives(DROP_IN.read_text())
    assert "AF_INET" in " ".join(d["RestrictAddressFamilies"])
    assert d["IPAddressAllow"] == ["localhost"]  # IPAddressDeny=any stays for the rest
    assert "--metrics 127.0.0.1:9400" in d["ExecStart"][-1]


def test_systemd_accepts_the_unit_with_the_metrics_drop_in(tmp_path):
    unit = unit_copy(tmp_path)
    drop = tmp_path / f"{NAME}.d"
    drop.mkdir()
    text = re.sub(r"/usr/local/bin/aquad(?= |$)", aquad_command(), DROP_IN.read_text(),
                  flags=re.M)
    (drop / "metrics.conf").write_text(text)
    code, ours = verify(unit)
    assert code == 0 and ours == [], "\n".join(ours)
