"""aquad's configuration: sizes, device specs, TOML and flags."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from aquad.config import (
    ConfigError,
    load_config,
    parse_amount,
    parse_gpu_reserve,
    parse_host_devices,
    parse_size,
)
from aquad.main import gpu_policy

from .conftest import wait_until


@pytest.mark.parametrize("text, value", [
    ("1", 1), ("4096", 4096), ("64KiB", 64 << 10), ("512MiB", 512 << 20), ("2GiB", 2 << 30),
    ("1.5GiB", 3 << 29), (" 3 TiB ", 3 << 40), ("10B", 10), (7, 7),
])
def test_sizes_in_binary_units(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1", "2GB", "2 gb", "lots", "1.3B", "GiB", "1e9",
                                  "2KiBs", True, 0, -4])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_host_devices():
    assert parse_host_devices("4x2GiB") == (4, 2 << 30)
    for bad in ("x2GiB", "0x1GiB", "65x1MiB", "4*2GiB", "four x 1GiB", "4x"):
        with pytest.raises(ConfigError):
            parse_host_devices(bad)


def test_gpu_reserve_default_and_per_gpu():
    G = 2**30
    assert parse_gpu_reserve("0") == (0, {})
    assert parse_gpu_reserve("8GiB") == (8 * G, {})
    assert parse_gpu_reserve("8GiB, 0=40GiB,3=0") == (8 * G, {0: 40 * G, 3: 0})
    assert parse_gpu_reserve("1=70GiB") == (0, {1: 70 * G})
    for bad, words in (("8GiB,4GiB", "two defaults"), ("x=1GiB", "not a GPU index"),
                       ("0=1GiB,0=2GiB", "twice"), ("0=lots", "GPU 0"),
                       ("8GB", "binary unit"), ("2000=1GiB", "0..1023"), ("", "gpu_reserve")):
        with pytest.raises(ConfigError, match=words):
            parse_gpu_reserve(bad)


def test_amounts_may_be_zero():
    assert parse_amount("0", "x") == 0 and parse_amount(0, "x") == 0
    assert parse_amount("1GiB", "x") == 2**30
    with pytest.raises(ConfigError, match="host_pinned"):
        parse_amount("-1", "host_pinned")


def test_gpu_settings_from_file_and_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("AQUA_SOCKET", raising=False)
    G = 2**30
    cfg = tmp_path / "a.toml"
    cfg.write_text('[aquad]\nbackend = "cuda"\ngpu_reserve = "8GiB,0=40GiB"\n'
                   'host_pinned = "0"\n')
    config = load_config(["--config", str(cfg), "--gpu-headroom", "512MiB"])
    policy = gpu_policy(config)
    assert (policy.reserve, dict(policy.per_gpu_reserve)) == (8 * G, {0: 40 * G})
    assert (policy.headroom, policy.host_pinned) == (512 << 20, 0)
    defaults = gpu_policy(load_config([]))
    assert (defaults.reserve, defaults.headroom, defaults.host_pinned) == (0, G, 4 * G)
    for flags, words in ((["--host-pinned", "lots"], "host_pinned"),
                         (["--gpu-headroom", "1GB"], "gpu_headroom"),
                         (["--gpu-reserve", "0=1GiB,0=1GiB"], "twice")):
        with pytest.raises(ConfigError, match=words):
            load_config(flags)
    cfg.write_text('gpu_headroom = 1\n')
    with pytest.raises(ConfigError, match="gpu_headroom must be str"):
        load_config(["--config", str(cfg)])


def test_flags_override_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("AQUA_SOCKET", raising=False)
    cfg = tmp_path / "a.toml"
    cfg.write_text('[aquad]\nhost_devices = "2x1GiB"\nquantum_ms = 20\nsocket = "/tmp/x.sock"\n')
    config = load_config(["--config", str(cfg), "--quantum-ms", "30"])
    assert (config.host_devices, config.quantum_ms, config.socket) == ("2x1GiB", 30.0,
                                                                        "/tmp/x.sock")


def test_config_file_errors_are_clear(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text('host_devices = "2x1GiB"\ncolour = "blue"\n')
    with pytest.raises(ConfigError, match="unknown key.*colour"):
        load_config(["--config", str(cfg)])
    cfg.write_text('quantum_ms = "fast"\n')
    with pytest.raises(ConfigError, match="quantum_ms"):
        load_config(["--config", str(cfg)])
    cfg.write_text('this is not toml')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", str(cfg)])
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--config", str(tmp_path / "missing.toml")])


def test_socket_from_environment(monkeypatch):
    monkeypatch.setenv("AQUA_SOCKET", "/tmp/from-env.sock")
    assert load_config([]).socket == "/tmp/from-env.sock"
    assert load_config(["--socket", "/tmp/flag.sock"]).socket == "/tmp/flag.sock"


def _next_state(listener: socket.socket) -> bytes:
    """The next notification other than STATUS= (sent whenever it changes)."""
    while (msg := listener.recv(256)).startswith(b"STATUS="):
        pass
    return msg


def test_ready_is_reported_to_systemd(sockdir):
    notify = os.path.join(sockdir, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify)
    listener.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=notify)
    proc = subprocess.Popen([sys.executable, "-m", "aquad", "--socket",
                             os.path.join(sockdir, "n.sock"), "--backend", "host",
                             "--host-devices", "1x8MiB"],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        assert _next_state(listener) == b"READY=1"
        assert os.path.exists(os.path.join(sockdir, "n.sock"))
        proc.terminate()
        assert _next_state(listener) == b"STOPPING=1"
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
    assert wait_until(lambda: not os.path.exists(os.path.join(sockdir, "n.sock")), 5)
