"""Protocol v1: typed messages, defined once, with strict validation.

Transport: ZeroMQ over an ``ipc://`` socket; the daemon binds a ROUTER, each
tenant connects a DEALER. Every ZeroMQ message is one frame holding one
msgpack map. Three kinds of map travel:

request  (tenant -> daemon): {"v": 1, "id": <int>, "op": <str>, "args": {...}}
reply    (daemon -> tenant): {"v": 1, "id": <int>, "ok": true, "result": {...}}
                             {"v": 1, "id": <int|nil>, "ok": false,
                              "error": {"code": <str>, "message": <str>,
                                        "details": {...}}}
event    (daemon -> tenant): {"v": 1, "event": <str>, "data": {...}}

Each operation's arguments are a dataclass below; its fields carry the
checks the decoder applies, so the validator and the handlers read the same
definition, and protocol/README.md documents it (keep the two in step).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import msgpack

from .errors import ErrorCode, ProtocolError

# msgpack ships no type hints; what packb returns is bytes.
_pack: Callable[[Any], bytes] = msgpack.packb

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

# Largest request the daemon answers; bigger ones get `frame_too_large`.
MAX_FRAME_BYTES = 64 * 1024
# Beyond this libzmq drops the connection before Python sees the frame
# (ZMQ_MAXMSGSIZE): a guard for the daemon's memory, not an error path.
HARD_MAX_FRAME_BYTES = 1024 * 1024

MAX_REQUEST_ID = 2**63 - 1
MAX_DEVICE_ID = 1023
MAX_LEASE_BYTES = 2**50  # 1 PiB: far beyond any device, still a sane int
# Bounded: shares are relative, and a weight near zero would push virtual
# runtimes (and the device floors other tenants re-enter at) to infinity.
MIN_WEIGHT, MAX_WEIGHT = 0.01, 100.0

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LEASE_ID_RE = re.compile(r"L[A-Za-z0-9_-]{8,64}")
TENANT_ID_RE = re.compile(r"t[0-9]{1,19}")
CURSOR_RE = re.compile(r"[0-9]{1,19}")  # opaque to clients; the daemon's grant order
# Most leases one `status` reply lists, and how many it lists unless told:
# what keeps every reply, and the daemon's time on it, bounded.
MAX_STATUS_LEASES = 1000
CAPABILITY_RE = re.compile(r"[0-9a-f]{32}")
# How long holders of leases on a device being reclaimed get to move them
# before what is left is fenced; and the default when a request names none.
MAX_DEADLINE_MS = 10 * 60 * 1000
DEFAULT_DEADLINE_MS = 2000


# --- field checks -----------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """How one field is validated. `kind` is the accepted Python type."""

    kind: type
    min: float | None = None
    max: float | None = None
    max_len: int | None = None
    min_len: int = 0
    pattern: re.Pattern[str] | None = None
    item: Check | None = None
    exclusive_min: bool = False

    def validate(self, name: str, value: Any) -> Any:
        kind: type[Any] = self.kind
        # bool is an int subclass; a boolean where a number belongs is a bug.
        if isinstance(value, bool) and kind is not bool:
            raise _bad(f"field {name!r} must be {_TYPE_NAMES[kind]}, got a boolean")
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            raise _bad(
                f"field {name!r} must be {_TYPE_NAMES[kind]}, got {type(value).__name__}"
            )
        if kind in (int, float):
            if value != value:  # NaN
                raise _bad(f"field {name!r} must be a number, got NaN")
            if self.min is not None and (
                value < self.min or (self.exclusive_min and value == self.min)
            ):
                op = ">" if self.exclusive_min else ">="
                raise _bad(f"field {name!r} must be {op} {self.min}, got {value}")
            if self.max is not None and value > self.max:
                raise _bad(f"field {name!r} must be <= {self.max}, got {value}")
        if kind in (str, list):
            if self.max_len is not None and len(value) > self.max_len:
                raise _bad(f"field {name!r} is longer than {self.max_len}")
            if len(value) < self.min_len:
                raise _bad(f"field {name!r} needs at least {self.min_len} item(s)")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _bad(f"field {name!r} must match {self.pattern.pattern}")
        if self.item is not None:
            value = [self.item.validate(f"{name}[{i}]", v) for i, v in enumerate(value)]
        return value


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
               list: "a list", dict: "a map"}


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def arg(check: Check, *, default: Any = dataclasses.MISSING, doc: str = "") -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"check": check, "doc": doc})
    return field(default=default, metadata={"check": check, "doc": doc})


def _int(lo: int, hi: int) -> Check:
    return Check(int, min=lo, max=hi)


DEVICE = _int(0, MAX_DEVICE_ID)
LEASE_ID = Check(str, pattern=LEASE_ID_RE, max_len=65)


# --- operations -------------------------------------------------------------


class Op:
    """Base of the argument dataclasses; `op` is the wire name.

    Not frozen: a frozen dataclass sets each field through object.__setattr__,
    which doubles the cost of decoding a request. Treat them as values (they
    compare by value and are not hashable)."""

    __slots__ = ()

    op: ClassVar[str]
    needs_tenant: ClassVar[bool] = True
    # Its reply can be big (it grows with the daemon's books): the daemon
    # spends time on it within a per-uid budget (section 4, `status`).
    budgeted: ClassVar[bool] = False
    doc: ClassVar[str] = ""


OPS: dict[str, type[Op]] = {}


def operation(cls: type[Op]) -> type[Op]:
    OPS[cls.op] = cls
    return cls


@operation
@dataclass(slots=True)
class Hello(Op):
    op = "hello"
    needs_tenant = False
    doc = "Register this connection as a tenant. Must be the first tenant request."
    tenant: str = arg(Check(str, pattern=NAME_RE, max_len=64),
                      doc="tenant name shown to operators (model name, say)")
    devices: list[Any] = arg(Check(list, min_len=1, max_len=64, item=DEVICE),
                        doc="home device ids the tenant computes on")
    weight: float | None = arg(
        Check(float, min=MIN_WEIGHT, max=MAX_WEIGHT), default=None,
        doc="share of GPU time relative to other tenants; the operator's weight for this "
            "tenant caps it, and is what an absent weight gets")


@operation
@dataclass(slots=True)
class Heartbeat(Op):
    op = "heartbeat"
    doc = "Proves the tenant is alive; any request does the same."


@operation
@dataclass(slots=True)
class Bye(Op):
    op = "bye"
    doc = "Unregister; every lease of the tenant is released."


@operation
@dataclass(slots=True)
class Lease(Op):
    op = "lease"
    doc = "Lease `nbytes` of offload memory placed for a tenant computing on `near`."
    nbytes: int = arg(_int(1, MAX_LEASE_BYTES), doc="bytes wanted (rounded up to the granule)")
    near: int | None = arg(DEVICE, default=None,
                           doc="device the data moves to and from (default: first home device)")


@operation
@dataclass(slots=True)
class Release(Op):
    op = "release"
    doc = "Release a lease; its memory returns to the pool."
    lease: str = arg(LEASE_ID, doc="lease id from a `lease` reply")


@operation
@dataclass(slots=True)
class LeaseInfo(Op):
    op = "lease_info"
    doc = "Describe one of the tenant's own leases (with its handle, to map it again)."
    lease: str = arg(LEASE_ID, doc="lease id from a `lease` reply")


@operation
@dataclass(slots=True)
class Adopt(Op):
    op = "adopt"
    doc = ("Reclaim a lease granted before the daemon restarted (host backend), proving "
           "ownership with the capability from its `lease` reply. Reply as for `lease`.")
    lease: str = arg(LEASE_ID, doc="lease id from the `lease` reply of the previous daemon")
    capability: str = arg(Check(str, pattern=CAPABILITY_RE, max_len=32),
                          doc="the secret from that reply (32 hex digits)")


@operation
@dataclass(slots=True)
class Turn(Op):
    op = "turn"
    doc = ("Ask for a GPU time slice on `devices` (default: all home devices). The reply "
           "says granted (with the slice) or queued; a queued tenant gets a `grant` event.")
    devices: list[Any] | None = arg(Check(list, min_len=1, max_len=64, item=DEVICE), default=None,
                               doc="subset of the tenant's home devices for this turn")


@operation
@dataclass(slots=True)
class TurnDone(Op):
    op = "turn_done"
    doc = "Give the slice back (or stop waiting for one); the tenant wants nothing more."


@operation
@dataclass(slots=True)
class TurnYield(Op):
    op = "turn_yield"
    doc = ("Acknowledge a `preempt` (context paged out) and queue for the next slice. "
           "Reply as for `turn`.")
    slice: int = arg(_int(0, MAX_REQUEST_ID), doc="slice id from the grant being yielded")


@operation
@dataclass(slots=True)
class Status(Op):
    op = "status"
    needs_tenant = False
    budgeted = True
    doc = ("Devices, tenants, slices, quotas and a page of leases (schema in "
           "docs/status-schema.md). No HELLO needed.")
    leases: bool = arg(Check(bool), default=True,
                       doc="list leases (a page of them, with a `next` cursor); false: "
                           "the summary only, whose cost does not grow with the leases")
    tenant: str | None = arg(Check(str, pattern=TENANT_ID_RE, max_len=20), default=None,
                             doc="list only this tenant's leases")
    device: int | None = arg(DEVICE, default=None, doc="list only the leases on this device")
    after: str | None = arg(Check(str, pattern=CURSOR_RE, max_len=19), default=None,
                            doc="the `next` cursor of the previous page")
    limit: int = arg(_int(1, MAX_STATUS_LEASES), default=MAX_STATUS_LEASES,
                     doc="most leases to list")


DEADLINE = Check(int, min=1, max=MAX_DEADLINE_MS)


# --- elastic memory (added within v1) ---------------------------------------


@operation
@dataclass(slots=True)
class Reclaim(Op):
    op = "reclaim"
    needs_tenant = False
    doc = ("Take `nbytes` of device `device` back from aquad (the operator, or a tenant "
           "whose home device it is): its leasable capacity drops at once, holders of "
           "leases beyond it get a `reclaim` event and move them, and what is not moved "
           "by the deadline is fenced. The requester gets `reclaim_done`.")
    device: int = arg(DEVICE, doc="the device whose memory is taken back")
    nbytes: int = arg(_int(1, MAX_LEASE_BYTES), doc="bytes of capacity to take back")
    deadline_ms: int = arg(DEADLINE, default=DEFAULT_DEADLINE_MS,
                           doc="how long holders have to move their leases")


@operation
@dataclass(slots=True)
class Drain(Op):
    op = "drain"
    needs_tenant = False
    doc = ("Operator only: reclaim all of `device` and lease nothing more on it until "
           "`undrain`. Reply and event as for `reclaim`.")
    device: int = arg(DEVICE, doc="the device to empty")
    deadline_ms: int = arg(DEADLINE, default=DEFAULT_DEADLINE_MS,
                           doc="how long holders have to move their leases")


@operation
@dataclass(slots=True)
class Undrain(Op):
    op = "undrain"
    needs_tenant = False
    doc = ("Operator only: give a drained or reclaimed device its capacity back "
           "(what it started with plus what tenants lend on it now).")
    device: int = arg(DEVICE, doc="the device to open again")


@operation
@dataclass(slots=True)
class Lend(Op):
    op = "lend"
    doc = "Offer `nbytes` of spare memory of one of the tenant's home devices to others."
    device: int = arg(DEVICE, doc="a home device of the tenant")
    nbytes: int = arg(_int(1, MAX_LEASE_BYTES), doc="bytes offered")


@operation
@dataclass(slots=True)
class Unlend(Op):
    op = "unlend"
    doc = ("Take back up to `nbytes` of what this tenant lent on `device`: a reclaim "
           "of that much. Reply and event as for `reclaim`.")
    device: int = arg(DEVICE, doc="a home device of the tenant it lent on")
    nbytes: int = arg(_int(1, MAX_LEASE_BYTES), doc="bytes to take back")
    deadline_ms: int = arg(DEADLINE, default=DEFAULT_DEADLINE_MS,
                           doc="how long holders have to move their leases")


@operation
@dataclass(slots=True)
class Move(Op):
    op = "move"
    doc = ("For a lease under a `reclaim` notice: a replacement lease of the same size "
           "on the next-best device (reply as for `lease`, plus `replaces`). The tenant "
           "copies the bytes over and then sends `release` for the old lease.")
    lease: str = arg(LEASE_ID, doc="the lease being reclaimed")


@operation
@dataclass(slots=True)
class Subscribe(Op):
    op = "subscribe"
    needs_tenant = False
    doc = ("Receive a `feed` event for each tenant join and leave and each slice grant, "
           "preemption and revocation, on this connection, until it closes. For operators "
           "(`aquactl events`): not on a tenant's connection, and no `hello` after it.")


_SPECS: dict[type[Op], _Spec] = {}


# --- envelope ---------------------------------------------------------------


@dataclass(slots=True)
class Request:
    id: int
    args: Op

    @property
    def op(self) -> str:
        return self.args.op


_ENVELOPE_KEYS = frozenset({"v", "id", "op", "args"})


def _unpack(frame: bytes) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise _bad(f"frame is not valid msgpack ({type(exc).__name__})") from None


def decode_request(frame: bytes) -> Request:
    """Parse and validate one request frame, or raise ProtocolError."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"request is {len(frame)} bytes; the limit is {MAX_FRAME_BYTES}",
        )
    obj = _unpack(frame)
    if not isinstance(obj, dict):
        raise _bad(f"request must be a msgpack map, got {type(obj).__name__}")
    rid = obj.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= MAX_REQUEST_ID:
        raise _bad(f"field 'id' must be an integer in [0, {MAX_REQUEST_ID}]")
    try:
        version = obj.get("v")
        if not isinstance(version, int) or isinstance(version, bool):
            raise _bad("field 'v' (protocol version) must be an integer")
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {version} is not supported; this daemon speaks "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}",
                details={"supported": list(SUPPORTED_VERSIONS)},
            )
        if not _ENVELOPE_KEYS.issuperset(obj):
            unknown = set(obj) - _ENVELOPE_KEYS
            raise _bad(f"unknown envelope field(s): {', '.join(sorted(map(str, unknown)))}")
        op = obj.get("op")
        if not isinstance(op, str):
            raise _bad("field 'op' must be a string")
        cls = OPS.get(op)
        if cls is None:
            raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown operation {op[:64]!r}")
        args = obj.get("args", {})
        if not isinstance(args, dict):
            raise _bad("field 'args' must be a map")
        return Request(rid, _build(cls, args))
    except ProtocolError as exc:
        exc.request_id = rid
        raise


def _build(cls: type[Op], args: dict[str, Any]) -> Op:
    spec = _SPECS[cls]
    if not spec.names.issuperset(args):
        unknown = set(args) - spec.names
        raise _bad(f"{cls.op}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    values = {}
    for name, check, optional, nullable in spec.fields:
        if name not in args:
            if not optional:
                raise _bad(f"{cls.op}: missing field {name!r}")
            continue
        value = args[name]
        if value is None and nullable:
            continue
        values[name] = check.validate(name, value)
    return cls(**values)


@dataclass(frozen=True)
class _Spec:
    """An op's fields, read once from its dataclass: the hot path of every
    request should not walk dataclass metadata."""

    names: frozenset[str]
    # name, check, may be absent, may be nil (its default is None)
    fields: tuple[tuple[str, Check, bool, bool], ...]
    # name -> default of the optional fields: what need not be sent
    defaults: dict[str, Any]


def _spec(cls: type[Op]) -> _Spec:
    fields = dataclasses.fields(cast(Any, cls))  # every registered op is a dataclass
    return _Spec(frozenset(f.name for f in fields),
                 tuple((f.name, f.metadata["check"], f.default is not dataclasses.MISSING,
                        f.default is None) for f in fields),
                 {f.name: f.default for f in fields if f.default is not dataclasses.MISSING})


_SPECS.update({cls: _spec(cls) for cls in OPS.values()})


def encode_request(rid: int, op: Op) -> bytes:
    # Not dataclasses.asdict: its deep copy costs more than the send itself.
    # Defaults are left out: the same request then works with a daemon that
    # predates an optional field.
    spec = _SPECS[type(op)]
    args = {}
    for name, *_ in spec.fields:
        value = getattr(op, name)
        if value is not None and (name not in spec.defaults or value != spec.defaults[name]):
            args[name] = value
    return _pack({"v": PROTOCOL_VERSION, "id": rid, "op": op.op, "args": args})


def encode_result(rid: int, result: dict[str, Any]) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "id": rid, "ok": True, "result": result})


def encode_error(err: ProtocolError) -> bytes:
    body: dict[str, Any] = {"code": err.code.value, "message": err.message}
    if err.details:
        body["details"] = err.details
    return _pack(
        {"v": PROTOCOL_VERSION, "id": err.request_id, "ok": False, "error": body}
    )


def encode_event(event: str, data: dict[str, Any] | None = None) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "event": event, "data": data or {}})


# --- what the tenant side reads ---------------------------------------------

EVENTS = {
    "shutdown": "The daemon is stopping; every lease and slice is gone and the "
                "connection will not be answered again. Data: {reason}.",
    "grant": "A queued tenant now holds a slice: {slice, devices, quantum_s}.",
    "preempt": "The holder's quantum is over and others wait: page out, then send "
               "`turn_yield` within {grace_s}. Data: {slice, grace_s}.",
    "revoked": "The holder did not yield in time; the slice was given away. "
               "Data: {slice, reason}. Work already launched on the device is not stopped.",
    "reclaim": "Leases of this tenant sit on memory being taken back: move each (`move`, "
               "copy, `release`) within {deadline_s}. Data: {reclaim, device, deadline_s, "
               "leases}.",
    "fenced": "These leases were not moved in time and are gone (host: the memory is "
              "truncated, touching it faults; cuda: held until released). Data: "
              "{reclaim, device, leases}.",
    "reclaim_done": "To whoever asked: the reclaim ended. Data: the report "
                    "(protocol/README.md, section 4.3).",


    "feed": "To a `subscribe`d connection: something happened. Data: {seq, time, kind, "
            "...}, and `missed` when events were skipped because the subscriber read "
            "too slowly (protocol/README.md section 5).",
}


@dataclass(frozen=True)
class Reply:
    id: int | None
    ok: bool
    result: dict[str, Any]
    code: str = ""
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    event: str
    data: dict[str, Any]


def decode_reply(frame: bytes) -> Reply | Event:
    """Parse a daemon->tenant frame. Raises ProtocolError on anything odd."""
    obj = _unpack(frame)
    version = obj.get("v") if isinstance(obj, dict) else None
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise _bad("daemon sent a frame that is not a protocol v1 map")
    if "event" in obj:
        event, data = obj.get("event"), obj.get("data", {})
        if not isinstance(event, str) or not isinstance(data, dict):
            raise _bad("malformed event from daemon")
        return Event(event, data)
    rid, ok = obj.get("id"), obj.get("ok")
    if not (rid is None or type(rid) is int) or not isinstance(ok, bool):
        raise _bad("malformed reply from daemon")
    if ok:
        result = obj.get("result")
        if not isinstance(result, dict):
            raise _bad("malformed reply from daemon: result is not a map")
        return Reply(rid, True, result)
    err = obj.get("error")
    details = err.get("details", {}) if isinstance(err, dict) else None
    if not isinstance(err, dict) or not isinstance(details, dict):
        raise _bad("malformed error reply from daemon")
    return Reply(rid, False, {}, str(err.get("code", "internal")),
                 str(err.get("message", "")), details)
