"""Protocol v1: what the daemon sends, defined once as typed structs.

One struct per operation's result (each `Op` names its own as `result`),
per event and per handle kind. They are msgspec structs: the daemon encodes
what its handlers return straight to msgpack, and the client decodes a
frame strictly into them (a missing field, a boolean where an int belongs,
an unknown handle kind: a clear error, never a half-read reply). Keys a
struct does not define are ignored: within v1 a daemon may add result and
event fields, and old clients must read on (protocol/README.md, section 3).
Optional fields left at their default are not sent, as before.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec
from msgspec import Struct

# --- handles (section 4.1) ---------------------------------------------------


class PosixShm(Struct, tag_field="kind", tag="posix_shm", omit_defaults=True):
    """A file <dir>/<name> of exactly `nbytes` bytes (host backend); `dir`
    is sent only when it is not /dev/shm, so a default grant is what an
    older daemon sent."""

    kind: ClassVar[str] = "posix_shm"
    name: str
    nbytes: int
    dir: str = ""


class CudaIpc(Struct, tag_field="kind", tag="cuda_ipc"):
    """A legacy CUDA IPC handle of an allocation on GPU `device` (cuda backend)."""

    kind: ClassVar[str] = "cuda_ipc"
    device: int
    pci_bus_id: str
    handle: bytes
    nbytes: int


Handle = PosixShm | CudaIpc


def handle_map(handle: Handle) -> dict[str, Any]:
    """A handle as the map the wire carries (`kind` included, bytes kept)."""
    out: dict[str, Any] = msgspec.to_builtins(handle, builtin_types=(bytes,))
    return out


class Event(Struct, omit_defaults=True):
    """Base of the events: the struct is the event's data, `event` its wire name."""

    event: ClassVar[str]


# --- results -----------------------------------------------------------------


class Result(Struct, omit_defaults=True):
    """Base of every result: optional fields at their default stay off the wire."""


class Empty(Result):
    """`heartbeat`, `turn_done`: nothing to say."""


class DeviceInfo(Result):
    id: int
    name: str
    backend: str
    capacity_bytes: int
    leased_bytes: int
    free_bytes: int
    granule_bytes: int


class Welcome(Result):
    """`hello`."""

    tenant_id: str
    protocol: int
    backend: str
    weight: float
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    devices: list[DeviceInfo]


class Released(Result):
    """`release`, `bye`."""

    released_bytes: int


class Granted(Result):
    """`lease`, `lease_info`, `adopt`."""

    lease: str
    device: int
    nbytes: int
    tier: str
    handle: Handle
    capability: str = ""  # host backend only, to the owner only


class Replacement(Granted, kw_only=True):
    """`move`: a lease as `lease` grants it, for the one it `replaces`."""

    replaces: str


class TurnState(Result):
    """`turn`, `turn_yield`: `slice` and `quantum_s` only when granted."""

    state: Literal["granted", "queued"]
    devices: list[int]
    slice: int | None = None
    quantum_s: float | None = None

    @property
    def granted(self) -> bool:
        return self.state == "granted"


class Subscribed(Result):
    seq: int
    lag_bytes: int


class Lent(Result):
    device: int
    lent_bytes: int
    capacity_bytes: int
    free_bytes: int


class Undrained(Result):
    device: int
    capacity_bytes: int
    free_bytes: int


class Chosen(Result):
    """A lease a reclaim chose, or one it saw released."""

    lease: str
    tenant: str
    nbytes: int


class MovedTo(Result):
    lease: str
    device: int
    tier: str


class Moved(Chosen):
    to: MovedTo


class Fenced(Chosen):
    quarantined: bool


class ReclaimReport(Event):
    """How a reclaim ended: the `reclaim_done` event, or a reply's `report`."""

    event = "reclaim_done"

    reclaim: int
    device: int
    state: Literal["done", "fenced", "cancelled"]
    requested_bytes: int
    taken_bytes: int
    capacity_bytes: int
    over_bytes: int
    moved: list[Moved]
    released: list[Chosen]
    fenced: list[Fenced]
    moved_count: int
    released_count: int
    fenced_count: int
    moved_bytes: int
    elapsed_s: float


class ReclaimStarted(Result):
    """`reclaim`, `drain`, `unlend` (which adds `lent_bytes`)."""

    reclaim: int
    device: int
    state: Literal["done", "pending"]
    requested_bytes: int
    taken_bytes: int
    capacity_bytes: int
    over_bytes: int
    deadline_s: float
    leases: list[Chosen]
    report: ReclaimReport | None = None  # when `done`
    lent_bytes: int | None = None


# `status` replies the status object of docs/status-schema.md: a map that
# grows within v1 (and that aquactl prints as it came), read as a map.
StatusReport = dict[str, Any]


# --- events (section 5) --------------------------------------------------------


class Shutdown(Event):
    event = "shutdown"
    reason: str = ""


class Grant(Event):
    event = "grant"
    slice: int
    devices: list[int]
    quantum_s: float


class Preempt(Event):
    event = "preempt"
    slice: int
    grace_s: float


class Revoked(Event):
    event = "revoked"
    slice: int
    reason: str = ""


class ReclaimNotice(Event):
    event = "reclaim"
    reclaim: int
    device: int
    deadline_s: float
    leases: list[str]


class FencedNotice(Event):
    event = "fenced"
    reclaim: int
    device: int
    leases: list[str]
    held: list[str] = []


class Feed(Event):
    """To a subscribed connection: one entry of the feed. Which fields an
    entry has depends on its `kind` (section 5); a client must ignore kinds
    and fields it does not know."""

    event = "feed"
    seq: int
    time: float
    kind: str
    tenant: str | None = None
    name: str | None = None
    pid: int | None = None
    uid: int | None = None
    slice: int | None = None
    devices: list[int] | None = None
    weight: float | None = None
    waited_s: float | None = None
    reason: str | None = None
    why: str | None = None
    missed: int = 0  # events skipped before this one (a slow reader)


class UnknownEvent(Event):
    """An event this client does not know (a newer daemon's): ignored."""

    event = "?"
    wire_name: str
