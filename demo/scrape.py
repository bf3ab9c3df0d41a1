"""The demo reads aquad's own figures from its Prometheus endpoint."""

from __future__ import annotations

import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    """A loopback port nobody listens on now (the demo's aquad takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str, *, since: float = 0.0, timeout: float = 10.0) -> dict[str, float]:
    """Each metric summed over its labels, from a snapshot aquad's loop took
    after `since` (Unix time; it publishes one a second)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            text = reply.read().decode()
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
        if sums.get("aquad_snapshot_timestamp_seconds", 0.0) > since \
                or time.monotonic() > deadline:
            return sums
        time.sleep(0.2)


FIGURES = (
    ("aquad_tenant_joins_total", "tenants registered", 1),
    ("aquad_leases", "leases held now", 1),
    ("aquad_lease_grants_total", "leases granted", 1),
    ("aquad_lease_granted_bytes_total", "MiB granted", 2**20),
    ("aquad_slice_grants_total", "GPU-time slices granted", 1),
    ("aquad_slice_handovers_total", "  of them handed over to a waiter", 1),
    ("aquad_slice_preemptions_total", "holders asked to yield", 1),
    ("aquad_slice_revocations_total", "slices revoked", 1),
)


def figures(sums: dict[str, float]) -> str:
    return "\n".join(f"   {label:34} {sums.get(name, 0.0) / scale:10.0f}   ({name})"
                     for name, label, scale in FIGURES)
