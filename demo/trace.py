"""Reading the Azure LLM inference traces (bench/traces/, CC BY 4.0)."""

from __future__ import annotations

import csv
import itertools
from datetime import datetime


def read_trace(path: str, limit: int | None = None) -> list[tuple[float, int, int]]:
    """(seconds from the first request, context tokens, generated tokens) of
    the first `limit` requests (all by default)."""
    with open(path, newline="") as f:
        rows = list(itertools.islice(csv.DictReader(f), limit))
    if not rows:
        raise ValueError(f"{path}: no requests")
    t0 = datetime.fromisoformat(rows[0]["TIMESTAMP"][:26])
    return [((datetime.fromisoformat(r["TIMESTAMP"][:26]) - t0).total_seconds(),
             int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in rows]
