"""aqua leases as vLLM's KV offload tier, with real vLLM engines.

A tiny random fp32 Llama (built locally), greedy decoding, token-id prompts.
Engines run in driver processes (tests/vllm_offload_driver.py) against a
real aquad on the host backend; each comparison is token for token against
a run without preemption, and recompute is counted from the scheduler's
own per-step token counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import Daemon
from tests.vllm_support import end_process

if os.environ.get("CI") != "true":  # in CI these run, never skip
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs the "
                                       "CPU build where there is no GPU)")

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_offload_driver.py")
OFF_LINE = "aqua KV offload tier is off"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Driver:
    """One driver process; `result(phase)` waits for its RESULT line."""

    def __init__(self, scenario: str, model: str, socket: str) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, DRIVER, scenario, model, socket], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: list[str] = []

    def result(self, phase: str, timeout: float = 240) -> dict:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("RESULT "):
                doc = json.loads(line[len("RESULT "):])
                assert doc["phase"] == phase, doc["phase"]
                return doc
        self.proc.wait(timeout=timeout)
        raise AssertionError(f"driver exited {self.proc.returncode} before {phase!r}:\n"
                             f"{self.output()[-6000:]}")

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 120) -> str:
        rest, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(rest)
        assert self.proc.returncode == 0, self.output()[-6000:]
        return self.output()

    def output(self) -> str:
        self.log.seek(0)
        return "".join(self.lines) + self.log.read()

    def kill(self) -> None:
        """End the process if it still runs; close its pipes and its log."""
        end_process(self.proc)
        self.log.close()


def _run(scenario: str, model: str, socket: str, *phases: str) -> list[dict]:
    driver = Driver(scenario, model, socket)
    try:
        docs = [driver.result(phase) for phase in phases]
        driver.finish()
        return docs
    finally:
        driver.kill()


@pytest.fixture(scope="module")
def stock(model: str) -> tuple[dict, dict]:
    """(the reference without preemption, stock vLLM under preemption)."""
    ref, run = _run("stock", model, "/nonexistent/aquad.sock", "reference", "stock")
    assert ref["preemptions"] == 0
    return ref, run


@pytest.fixture(scope="module")
def aqua_run(model: str, module_daemon: Daemon) -> dict:
    (run,) = _run("aqua", model, module_daemon.socket, "aqua")
    return run


def test_stock_vllm_recomputes_after_preemption(stock: tuple[dict, dict]) -> None:
    """The baseline the tier is measured against really preempts."""
    ref, run = stock
    assert run["first"]["preemptions"] > 0
    assert run["first"]["tokens"] == ref["tokens"]
    assert run["first"]["loaded"] == 0


def test_preempted_requests_reload_from_leases(stock: tuple[dict, dict], aqua_run: dict) -> None:
    ref, base = stock
    first = aqua_run["first"]
    assert first["preemptions"] > 0
    assert first["tokens"] == ref["tokens"]
    assert first["stored"] > 0 and first["loaded"] > 0
    # Fewer tokens through the model than stock vLLM on the same work: the
    # reloaded blocks were not recomputed.
    assert first["computed"] < base["first"]["computed"]
    # Leases were taken as the cache filled, within the budget (8 MiB in
    # 1 MiB leases), and they are host leases (the host backend).
    assert aqua_run["leases_before"] == 0
    assert 1 < aqua_run["leases"] <= 8
    assert first["host_lease_bytes"] == aqua_run["leases"] * (1 << 20)
    assert first["up"] == 1


def test_prefix_reuse_after_reset_loads_from_leases(stock: tuple[dict, dict],
                                                    aqua_run: dict) -> None:
    """reset_prefix_cache() drops vLLM's GPU prefix cache, not the leases:
    the same prompts again load their blocks from aqua."""
    ref, base = stock
    first, again = aqua_run["first"], aqua_run["again"]
    assert again["tokens"] == ref["tokens"]
    assert again["loaded"] > first["loaded"]
    assert again["computed"] < base["again"]["computed"]


def test_worker_in_its_own_process_maps_the_leases(model: str, stock: tuple[dict, dict],
                                                   module_daemon: Daemon) -> None:
    """vLLM's default layout (`vllm serve`'s): scheduler and worker in
    processes of their own; the worker maps the leases from their handles."""
    ref, _ = stock
    (served,) = _run("multiprocess", model, module_daemon.socket, "served")
    assert served["tokens"] == ref["tokens"]
    assert served["preemptions"] > 0 and served["loaded"] > 0 and served["host_lease_bytes"] > 0


def test_the_engines_slices_show_in_vllms_metrics(model: str, stock: tuple[dict, dict],
                                                  module_daemon: Daemon) -> None:
    # With AquaWorker beside the tier, vLLM's Prometheus output counts the
    # engine's aqua turns as the worker counted them (exported when vLLM
    # collects the connector's stats, so the latest may not be in yet).
    ref, _ = stock
    (served,) = _run("slices", model, module_daemon.socket, "served")
    assert served["tokens"] == ref["tokens"]
    turns = served["turns"]
    assert turns["enabled"] and turns["turns"] >= 1, turns
    assert 1 <= served["slice_turns"] <= turns["turns"]
    assert served["slice_yields"] <= turns["yields"]
    assert 0 <= served["slice_wait_s"] <= turns["wait_s"] + 1e-9


def test_no_aquad_serves_by_recompute_and_says_so_once(model: str, stock: tuple[dict, dict],
                                                       tmp_path) -> None:
    ref, _ = stock
    driver = Driver("no_aquad", model, str(tmp_path / "aquad.sock"))
    try:
        served = driver.result("served")
        out = driver.finish()
    finally:
        driver.kill()
    assert served["tokens"] == ref["tokens"]
    assert served["preemptions"] > 0 and served["loaded"] == 0 and served["up"] == 0
    assert out.count(OFF_LINE) == 1, out[-4000:]
    assert "aquad is not running" in out


def test_aquad_killed_mid_run(model: str, stock: tuple[dict, dict], start_daemon) -> None:
    """aquad dies under a running engine: requests in flight finish with
    the right tokens, the tier turns off with one log line, and from then on
    vLLM recomputes (nothing more is loaded from or stored to leases)."""
    ref, _ = stock
    daemon = start_daemon()
    driver = Driver("killed", model, daemon.socket)
    try:
        stored = driver.result("stored")
        assert stored["tokens"] == ref["other"]
        assert stored["stored"] > 0
        # The tier's bytes are aqua leases, accounted to the engine's tenant.
        tenants = [t for t in daemon.status()["tenants"] if t["name"] == "vllm-test"]
        assert len(tenants) == 1
        assert tenants[0]["leased_bytes"] == stored["host_lease_bytes"] > 0
        daemon.kill()
        driver.send("go")
        after = driver.result("after")
        out = driver.finish()
    finally:
        driver.kill()
    daemon.restart()  # frees what the killed daemon left (its owner is gone)
    assert after["during"] == ref["tokens"]
    assert after["noticed"], "the tier did not notice that aquad died"
    assert after["after"] == ref["tokens"]
    assert after["up"] == 0
    assert after["loaded"] == after["before"]["loaded"]
    assert after["stored"] == after["before"]["stored"]
    assert out.count(OFF_LINE) == 1, out[-4000:]


# --- the tier's bookkeeping against a real aquad (no engine) ------------------

def _settings(socket: str, **extra):
    from aqua.vllm.tier import TierSettings

    return TierSettings.from_extra({"aqua_socket": socket, **extra})


@pytest.mark.parametrize("extra, message", [
    ({"aqua_lease_bytes": "2GB"}, "binary unit"),
    ({"aqua_lease_bytes": 0}, "must be positive"),
    ({"aqua_lease_bytes": "1GiB", "aqua_lease_fraction": 0.5}, "not both"),
    ({"aqua_lease_fraction": 1.5}, "(0, 1]"),
    ({"aqua_device": -1}, "device id"),
    ({"aqua_lease_chunk_bytes": "lots"}, "cannot read"),
])
def test_bad_tier_settings_fail_clearly(extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        _settings("/tmp/x.sock", **extra)


def test_tier_grows_a_lease_at_a_time_up_to_its_budget(daemon: Daemon) -> None:
    from aqua.vllm.tier import LIVE_LEASES, LeaseTier

    tier = LeaseTier(_settings(daemon.socket, aqua_lease_bytes="5MiB",
                               aqua_lease_chunk_bytes="2MiB"), chunk_bytes=1 << 20)
    try:
        assert (tier.chunks, tier.max_chunks, tier.chunks_per_lease) == (0, 5, 2)
        assert not daemon.status()["tenants"][0]["leases"]  # nothing until it fills
        grown = [tier.grow() for _ in range(4)]
        assert grown == [True, True, True, False]  # 2 + 2 + 1 chunks, then the budget
        assert [lease.nbytes for lease in tier.leases] == [2 << 20, 2 << 20, 1 << 20]
        assert tier.bytes_by_tier() == {"host": 5 << 20}
        assert daemon.status()["tenants"][0]["leased_bytes"] >= 5 << 20
        assert set(tier.handles([0, 1, 4])) == {0, 2}  # chunk c in lease c // 2
        assert all(lease.id in LIVE_LEASES for lease in tier.leases)
    finally:
        tier.close()
    assert not LIVE_LEASES
    assert not daemon.status()["tenants"]


def test_tier_stops_growing_when_aquad_is_out_of_memory(daemon: Daemon, caplog) -> None:
    from aqua.vllm.tier import LeaseTier

    # 2 x 64 MiB devices, and a uid may hold half of it: the budget is more.
    tier = LeaseTier(_settings(daemon.socket, aqua_lease_bytes="1GiB",
                               aqua_lease_chunk_bytes="16MiB"), chunk_bytes=1 << 20)
    try:
        while tier.grow():
            pass
        assert 0 < tier.chunks < 1024 and tier.max_chunks == tier.chunks
        assert tier.up
        assert not tier.grow()
        assert sum("stays at" in r.getMessage() for r in caplog.records) == 1
    finally:
        tier.close()


def test_tier_without_aquad_is_off(tmp_path) -> None:
    from aqua.vllm.tier import LeaseTier

    tier = LeaseTier(_settings(str(tmp_path / "aquad.sock")), chunk_bytes=1 << 20)
    assert not tier.up and not tier.grow() and tier.max_chunks == 0
    tier.close()
