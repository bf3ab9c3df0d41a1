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
definition. Its result, and every event, is a struct in replies.py, which
the client decodes strictly. protocol/README.md documents both
(tests/test_protocol_doc.py holds the two in step).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import msgpack
import msgspec

from . import replies as r
from .errors import ErrorCode, ProtocolError

# Replies and events are msgspec structs; requests are built as maps.
_pack: Callable[[Any], bytes] = msgspec.msgpack.Encoder().encode

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


def arg(check: Check, *, default: Any = dataclasses.MISSING) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"check": check})
    return field(default=default, metadata={"check": check})


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
    # Answered by the daemon's shell itself, not its arbiter (the feed).
    shell: ClassVar[bool] = False
    # The struct its result is decoded into (protocol/replies.py).
    result: ClassVar[type[Any]] = r.Empty


OPS: dict[str, type[Op]] = {}


def operation(cls: type[Op]) -> type[Op]:
    OPS[cls.op] = cls
    return cls


@operation
@dataclass(slots=True)
class Hello(Op):
    op = "hello"
    result = r.Welcome
    needs_tenant = False
    tenant: str = arg(Check(str, pattern=NAME_RE, max_len=64))
    devices: list[Any] = arg(Check(list, min_len=1, max_len=64, item=DEVICE))
    weight: float | None = arg(
        Check(float, min=MIN_WEIGHT, max=MAX_WEIGHT), default=None)


@operation
@dataclass(slots=True)
class Heartbeat(Op):
    op = "heartbeat"


@operation
@dataclass(slots=True)
class Bye(Op):
    op = "bye"
    result = r.Released


@operation
@dataclass(slots=True)
class Lease(Op):
    op = "lease"
    result = r.Granted
    nbytes: int = arg(_int(1, MAX_LEASE_BYTES))
    near: int | None = arg(DEVICE, default=None)


@operation
@dataclass(slots=True)
class Release(Op):
    op = "release"
    result = r.Released
    lease: str = arg(LEASE_ID)


@operation
@dataclass(slots=True)
class LeaseInfo(Op):
    op = "lease_info"
    result = r.Granted
    lease: str = arg(LEASE_ID)


@operation
@dataclass(slots=True)
class Adopt(Op):
    op = "adopt"
    result = r.Granted
    lease: str = arg(LEASE_ID)
    capability: str = arg(Check(str, pattern=CAPABILITY_RE, max_len=32))


@operation
@dataclass(slots=True)
class Turn(Op):
    op = "turn"
    result = r.TurnState
    devices: list[Any] | None = arg(Check(list, min_len=1, max_len=64, item=DEVICE), default=None)


@operation
@dataclass(slots=True)
class TurnDone(Op):
    op = "turn_done"


@operation
@dataclass(slots=True)
class TurnYield(Op):
    op = "turn_yield"
    result = r.TurnState
    slice: int = arg(_int(0, MAX_REQUEST_ID))


@operation
@dataclass(slots=True)
class Status(Op):
    op = "status"
    result = r.StatusReport
    needs_tenant = False
    budgeted = True
    leases: bool = arg(Check(bool), default=True)
    tenant: str | None = arg(Check(str, pattern=TENANT_ID_RE, max_len=20), default=None)
    device: int | None = arg(DEVICE, default=None)
    after: str | None = arg(Check(str, pattern=CURSOR_RE, max_len=19), default=None)
    limit: int = arg(_int(1, MAX_STATUS_LEASES), default=MAX_STATUS_LEASES)


DEADLINE = Check(int, min=1, max=MAX_DEADLINE_MS)


# --- elastic memory (added within v1) ---------------------------------------


@operation
@dataclass(slots=True)
class Reclaim(Op):
    op = "reclaim"
    result = r.ReclaimStarted
    needs_tenant = False
    device: int = arg(DEVICE)
    nbytes: int = arg(_int(1, MAX_LEASE_BYTES))
    deadline_ms: int = arg(DEADLINE, default=DEFAULT_DEADLINE_MS)


@operation
@dataclass(slots=True)
class Drain(Op):
    op = "drain"
    result = r.ReclaimStarted
    needs_tenant = False
    device: int = arg(DEVICE)
    deadline_ms: int = arg(DEADLINE, default=DEFAULT_DEADLINE_MS)


@operation
@dataclass(slots=True)
class Undrain(Op):
    op = "undrain"
    result = r.Undrained
    needs_tenant = False
    device: int = arg(DEVICE)


@operation
@dataclass(slots=True)
class Lend(Op):
    op = "lend"
    result = r.Lent
    device: int = arg(DEVICE)
    nbytes: int = arg(_int(1, MAX_LEASE_BYTES))


@operation
@dataclass(slots=True)
class Unlend(Op):
    op = "unlend"
    result = r.ReclaimStarted
    device: int = arg(DEVICE)
    nbytes: int = arg(_int(1, MAX_LEASE_BYTES))
    deadline_ms: int = arg(DEADLINE, default=DEFAULT_DEADLINE_MS)


@operation
@dataclass(slots=True)
class Move(Op):
    op = "move"
    result = r.Replacement
    lease: str = arg(LEASE_ID)


@operation
@dataclass(slots=True)
class Subscribe(Op):
    op = "subscribe"
    shell = True
    result = r.Subscribed
    needs_tenant = False


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


def encode_result(rid: int, result: Any) -> bytes:
    """A reply; `result` is the op's result (protocol/replies.py), as its
    struct or, where the daemon's core builds it, as the same map."""
    return _pack({"v": PROTOCOL_VERSION, "id": rid, "ok": True, "result": result})


def encode_error(err: ProtocolError) -> bytes:
    body: dict[str, Any] = {"code": err.code.value, "message": err.message}
    if err.details:
        body["details"] = err.details
    return _pack(
        {"v": PROTOCOL_VERSION, "id": err.request_id, "ok": False, "error": body}
    )


def encode_event(event: str, data: Any = None) -> bytes:
    """An event; `data` is its struct in EVENTS (or the same map), or None."""
    return _pack({"v": PROTOCOL_VERSION, "event": event, "data": {} if data is None else data})


# --- what the tenant side reads ---------------------------------------------

# Every event, by wire name: the struct its data decodes into.
EVENTS: dict[str, type[r.Event]] = {cls.event: cls for cls in (
    r.Shutdown, r.Grant, r.Preempt, r.Revoked, r.ReclaimNotice, r.FencedNotice,
    r.ReclaimReport, r.Feed)}


class ErrorBody(msgspec.Struct):
    code: str = ErrorCode.INTERNAL.value  # an error reply without a code
    message: str = ""
    details: dict[str, Any] = {}


class Reply(msgspec.Struct):
    """A daemon->tenant frame that is not an event. Its `result` stays
    encoded until the caller, who knows what it asked, decodes it
    (`result_of`): one strict pass into the op's own struct."""

    v: int
    id: int | None = None
    ok: bool | None = None
    result: msgspec.Raw = msgspec.Raw()
    error: ErrorBody | None = None
    event: str | None = None
    data: msgspec.Raw = msgspec.Raw()

    def result_of(self, op: type[Op]) -> Any:
        """The result decoded into `op.result`; ProtocolError if it is not one."""
        try:
            return _result_decoder(op).decode(self.result)
        except msgspec.MsgspecError as exc:
            raise _bad(f"malformed {op.op!r} result from daemon: {exc}") from None


def as_result(op: type[Op], result: Any) -> Any:
    """A result as the arbiter returns it (a map), as its struct: for what
    drives the arbiter without the wire (the simulator)."""
    return msgspec.convert(result, op.result)


def as_event(name: str, data: Any) -> r.Event:
    """An event the arbiter emitted (name, map), as its struct; as as_result."""
    event: r.Event = msgspec.convert(data, EVENTS[name])
    return event


_frames = msgspec.msgpack.Decoder(Reply)
_events = {name: msgspec.msgpack.Decoder(cls) for name, cls in EVENTS.items()}
_results: dict[type[Op], msgspec.msgpack.Decoder[Any]] = {}
_EMPTY_MAP = b"\x80"


def _result_decoder(op: type[Op]) -> msgspec.msgpack.Decoder[Any]:
    decoder = _results.get(op)
    if decoder is None:
        decoder = _results[op] = msgspec.msgpack.Decoder(op.result)
    return decoder


_MAP_LEADS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # fixmap, map 16, map 32


def _is_map(raw: msgspec.Raw) -> bool:
    return len(raw) > 0 and memoryview(raw)[0] in _MAP_LEADS


def decode_reply(frame: bytes) -> Reply | r.Event:
    """Parse a daemon->tenant frame: a Reply, or the event's struct
    (UnknownEvent for a name this side does not know). Raises ProtocolError
    on anything malformed."""
    try:
        msg = _frames.decode(frame)
    except msgspec.MsgspecError as exc:
        raise _bad(f"malformed frame from daemon: {exc}") from None
    if msg.v != PROTOCOL_VERSION:
        raise _bad("daemon sent a frame that is not a protocol v1 map")
    if msg.event is not None:
        decoder = _events.get(msg.event)
        if decoder is None:
            return r.UnknownEvent(wire_name=msg.event[:64])
        data = msg.data if len(msg.data) else _EMPTY_MAP
        try:
            return decoder.decode(data)
        except msgspec.MsgspecError as exc:
            raise _bad(f"malformed {msg.event[:64]!r} event from daemon: {exc}") from None
    if msg.ok is None:
        raise _bad("malformed reply from daemon: no `ok`")
    if msg.ok and not _is_map(msg.result):
        raise _bad("malformed reply from daemon: result is not a map")
    if not msg.ok and msg.error is None:
        raise _bad("malformed error reply from daemon")
    return msg
