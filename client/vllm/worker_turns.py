"""GPU time slices for an engine that steps: the part of AquaWorker that
knows nothing of vLLM.

A `TurnKeeper` holds an aqua turn while its engine has work. `before_step()`
takes the turn if it is not held (blocking until aquad grants it) and calls
`respond()`, which at a preemption pages the registered tensors out to leases
*in place* (same storage, same address: the engine's views and kernels keep
pointing at it), yields, waits for the next grant and pages them back.
`after_step()` marks the step done; when no step starts for `idle_s`, a
watchdog thread gives the turn back, so an idle engine holds no slice and is
never revoked.

Without an aquad, or once it is gone, the keeper logs one line and the engine
runs on without turns: turns are a service to the host, never a reason to
stop serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

import aqua
from aqua.errors import AquaError, DaemonUnavailable, LimitExceeded, OutOfMemory

log = logging.getLogger("aqua.vllm")

DEFAULT_IDLE_S = 0.05

_current: TurnKeeper | None = None  # this process's keeper (one vLLM worker per process)


def current_stats() -> SliceStats | None:
    """The counters of this process's keeper, for a metrics path (the KV
    connector's worker-side stats run in the same process), or None."""
    return None if _current is None else _current.stats


@dataclass
class SliceStats:
    """What the keeper did, for logs, tests and metrics."""

    enabled: bool = False  # connected to aquad and taking turns
    steps: int = 0  # engine steps started under a turn
    turns: int = 0  # turns taken (from idle)
    waits: int = 0  # turns and yields that queued behind another tenant
    wait_s: float = 0.0  # seconds steps spent waiting for a slice, paging included
    yields: int = 0  # preemptions answered (page-out, yield, page-in)
    revocations: int = 0  # slices aquad took back because we yielded late
    idle_returns: int = 0  # turns given back because the engine went idle
    bytes_out: int = 0  # KV bytes paged out to leases
    bytes_in: int = 0  # ... and back in
    bytes_discarded: int = 0  # host memory given back while paged out


class TurnKeeper:
    """Turns for one engine on `device`; `tensors()` lists what to page
    (called when a turn starts, so a cache allocated later is found)."""

    def __init__(self, tensors: Callable[[], list[torch.Tensor]], *, tenant: str,
                 device: int = 0, socket: str | None = None, weight: float | None = None,
                 idle_s: float = DEFAULT_IDLE_S) -> None:
        self._tensors = tensors
        self.idle_s = idle_s
        self.stats = SliceStats()
        global _current
        _current = self
        self._cond = threading.Condition()
        self._turn: AbstractContextManager | None = None
        self._busy = False
        self._step_ends = 0  # steps finished; the watchdog's "nothing happened" test
        self._paged: list[torch.Tensor] = []  # what the pager holds now
        self.client: aqua.Client | None = None
        self.pager: aqua.TensorPager | None = None
        try:
            # No reconnect: a lost aquad switches turns off (see _lost) rather
            # than leaving a step blocked on a daemon that may not come back.
            self.client = aqua.connect(tenant, device, socket=socket, weight=weight,
                                       reconnect=False)
        except AquaError as exc:
            log.warning("aqua: no aquad (%s); vLLM serves without GPU time slices", exc)
            return
        self.pager = aqua.TensorPager(self.client, near=device, in_place=True)
        self.client.on_preempt(self._page_out, self.pager.page_in)
        self._refused = False  # a page-out was refused room: said once
        self.stats.enabled = True
        threading.Thread(target=self._watch, name="aqua-turns", daemon=True).start()

    @property
    def enabled(self) -> bool:
        return self.client is not None

    # --- the engine's side ----------------------------------------------------

    def before_step(self) -> None:
        """At the top of every step that computes: hold a turn, respond()."""
        with self._cond:
            if self.client is None:
                return
            self._busy = True
            try:
                started = time.monotonic()
                if self._turn is None:
                    self._take_turn()
                # Paging writes the engine's tensors, which vLLM made under
                # inference mode; outside it torch refuses in-place updates.
                with torch.inference_mode():
                    yielded = self.client.respond()
                if yielded:
                    self.stats.yields += 1
                self.stats.wait_s += time.monotonic() - started
                self.stats.steps += 1
                self._sync_stats()
            except AquaError as exc:
                self._lost(exc)

    def after_step(self) -> None:
        with self._cond:
            self._busy = False
            self._step_ends += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Give the turn back, page in, release the leases, unregister."""
        with self._cond:
            self._cond.notify_all()
            client, self.client = self.client, None
            if client is None:
                return
            try:
                self._give_back()
                with torch.inference_mode():
                    self.pager.close()
            except AquaError as exc:
                log.debug("aqua: closing turns: %s", exc)
            client.close()

    # --- inside, with the lock held -------------------------------------------

    def _page_out(self) -> None:
        """respond()'s page-out: when aquad has no room for the cache, yield
        with the cache resident rather than hold the slice until revoked (the
        pager takes every lease before it touches a byte, so nothing is lost)."""
        try:
            self.pager.page_out()
        except (OutOfMemory, LimitExceeded) as exc:
            if not self._refused:
                log.warning("aqua: no room to page the KV cache out (%s); yielding with it "
                            "resident", exc)
                self._refused = True

    def _take_turn(self) -> None:
        self._register_tensors()
        turn = self.client.turn()
        turn.__enter__()  # blocks until granted; the watchdog __exit__s it
        self._turn = turn
        self.stats.turns += 1

    def _register_tensors(self) -> None:
        # Between turns the cache is paged in, so a changed set (a cache
        # allocated again) can be registered afresh.
        current = self._tensors()
        if len(current) == len(self._paged) and all(a is b for a, b in zip(current, self._paged)):
            return
        for t in self._paged:
            self.pager.unregister(t)
        for t in current:
            self.pager.register(t)
        self._paged = current

    def _give_back(self) -> None:
        turn, self._turn = self._turn, None
        if turn is not None:
            turn.__exit__(None, None, None)  # turn_done

    def _sync_stats(self) -> None:
        st, pager = self.client._turn, self.pager
        self.stats.waits = st.waits
        self.stats.revocations = st.revocations
        self.stats.bytes_out = pager.bytes_out
        self.stats.bytes_in = pager.bytes_in
        self.stats.bytes_discarded = pager.bytes_discarded

    def _lost(self, exc: AquaError) -> None:
        """aquad went away (or refused us): serve on without turns."""
        what = "lost aquad" if isinstance(exc, DaemonUnavailable) else "turns failed"
        log.warning("aqua: %s (%s); vLLM keeps serving without GPU time slices", what, exc)
        client, self.client = self.client, None
        self._turn = None  # its slice went with the daemon
        self.stats.enabled = False
        try:
            with torch.inference_mode():
                self.pager.page_in()  # respond() did already; a no-op then
        finally:
            client.close()
        self._cond.notify_all()

    def _watch(self) -> None:
        """Give the turn back once the engine has not stepped for idle_s."""
        with self._cond:
            while self.client is not None:
                if self._turn is None or self._busy:
                    self._cond.wait()
                    continue
                seen = self._step_ends
                self._cond.wait(self.idle_s)
                if (self._turn is not None and not self._busy and self._step_ends == seen
                        and self.client is not None):
                    try:
                        self._give_back()
                        self.stats.idle_returns += 1
                    except AquaError as exc:
                        self._lost(exc)
