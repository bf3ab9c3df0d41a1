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

Each operation's arguments are a msgspec struct below, its fields' types
the checks the daemon's decoder applies, so the validator and the handlers
read the same definition. Its result, and every event, is a struct in
replies.py, which the client decodes strictly. protocol/README.md documents
both (tests/test_protocol_doc.py holds the two in step).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta, Struct

from . import replies as r
from .errors import ErrorCode, ProtocolError

# Every frame: an envelope map around the message's struct (or its map).
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


# --- argument types ---------------------------------------------------------
# What each field accepts, as msgspec constraints the decoder checks strictly:
# no boolean or float where an int belongs, no NaN or infinity past a bound.
# msgspec searches for a pattern: anchored with \Z (a `$` would let a
# trailing newline through).


def _whole(regex: re.Pattern[str]) -> str:
    return rf"^(?:{regex.pattern})\Z"


RequestId = Annotated[int, Meta(ge=0, le=MAX_REQUEST_ID)]
Device = Annotated[int, Meta(ge=0, le=MAX_DEVICE_ID)]
Devices = Annotated[list[Device], Meta(min_length=1, max_length=64)]
Nbytes = Annotated[int, Meta(ge=1, le=MAX_LEASE_BYTES)]
Deadline = Annotated[int, Meta(ge=1, le=MAX_DEADLINE_MS)]
LeaseId = Annotated[str, Meta(pattern=_whole(LEASE_ID_RE), max_length=65)]


# --- operations -------------------------------------------------------------

OPS: dict[str, type[Op]] = {}  # every operation, by wire name


class Op(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of the operations: each is the struct its request's `args`
    decode into, strictly (an unknown field is refused). Optional fields at
    their default stay off the wire, so the same request works with a daemon
    that predates an optional field. `op` is the wire name: the class name
    in snake case (LeaseInfo: lease_info); every subclass is one in OPS."""

    op: ClassVar[str]
    needs_tenant: ClassVar[bool] = True
    # Its reply can be big (it grows with the daemon's books): the daemon
    # spends time on it within a per-uid budget (section 4, `status`).
    budgeted: ClassVar[bool] = False
    # Answered by the daemon's shell itself, not its arbiter (the feed).
    shell: ClassVar[bool] = False
    # The struct its result is decoded into (protocol/replies.py).
    result: ClassVar[type[Any]] = r.Empty

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.op = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
        OPS[cls.op] = cls


class Hello(Op):
    result = r.Welcome
    needs_tenant = False
    tenant: Annotated[str, Meta(pattern=_whole(NAME_RE), max_length=64)]
    devices: Devices
    weight: Annotated[float, Meta(ge=MIN_WEIGHT, le=MAX_WEIGHT)] | None = None


class Heartbeat(Op):
    """No arguments: the tenant is alive."""


class Bye(Op):
    result = r.Released


class Lease(Op):
    result = r.Granted
    nbytes: Nbytes
    near: Device | None = None


class Release(Op):
    result = r.Released
    lease: LeaseId


class LeaseInfo(Op):
    result = r.Granted
    lease: LeaseId


class Adopt(Op):
    result = r.Granted
    lease: LeaseId
    capability: Annotated[str, Meta(pattern=_whole(CAPABILITY_RE), max_length=32)]


class Turn(Op):
    result = r.TurnState
    devices: Devices | None = None


class TurnDone(Op):
    """No arguments: the slice is given back, nothing more wanted."""


class TurnYield(Op):
    result = r.TurnState
    slice: Annotated[int, Meta(ge=0, le=MAX_REQUEST_ID)]


class Status(Op):
    result = r.StatusReport
    needs_tenant = False
    budgeted = True
    leases: bool = True
    tenant: Annotated[str, Meta(pattern=_whole(TENANT_ID_RE), max_length=20)] | None = None
    device: Device | None = None
    after: Annotated[str, Meta(pattern=_whole(CURSOR_RE), max_length=19)] | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_STATUS_LEASES)] = MAX_STATUS_LEASES


# --- elastic memory (added within v1) ---------------------------------------


class Reclaim(Op):
    result = r.ReclaimStarted
    needs_tenant = False
    device: Device
    nbytes: Nbytes
    deadline_ms: Deadline = DEFAULT_DEADLINE_MS


class Drain(Op):
    result = r.ReclaimStarted
    needs_tenant = False
    device: Device
    deadline_ms: Deadline = DEFAULT_DEADLINE_MS


class Undrain(Op):
    result = r.Undrained
    needs_tenant = False
    device: Device


class Lend(Op):
    result = r.Lent
    device: Device
    nbytes: Nbytes


class Unlend(Op):
    result = r.ReclaimStarted
    device: Device
    nbytes: Nbytes
    deadline_ms: Deadline = DEFAULT_DEADLINE_MS


class Move(Op):
    result = r.Replacement
    lease: LeaseId


class Subscribe(Op):
    shell = True
    result = r.Subscribed
    needs_tenant = False


# --- envelope ---------------------------------------------------------------


class Request(Struct):
    """A decoded request: its id and its op's arguments."""

    id: int
    args: Op

    @property
    def op(self) -> str:
        return self.args.op


class _Envelope(Struct, forbid_unknown_fields=True):
    """A request as the hot path reads it, in one strict pass; `args` stays
    encoded until its op is known."""

    v: int
    id: RequestId
    op: str
    args: msgspec.Raw = msgspec.Raw()


_envelopes = msgspec.msgpack.Decoder(_Envelope)
_anything = msgspec.msgpack.Decoder()
_args = {name: msgspec.msgpack.Decoder(cls) for name, cls in OPS.items()}
_EMPTY_MAP = b"\x80"
# What a decoder raises on a bad frame: msgspec's errors, and Python's
# recursion limit where nesting runs deeper than msgspec will follow.
_UNREADABLE = (msgspec.MsgspecError, RecursionError)


def _bad(message: str, request_id: int | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, request_id=request_id)


def decode_request(frame: bytes) -> Request:
    """Parse and validate one request frame, or raise ProtocolError."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"request is {len(frame)} bytes; the limit is {MAX_FRAME_BYTES}",
        )
    try:
        envelope = _envelopes.decode(frame)
    except _UNREADABLE as exc:
        raise _refusal(frame, exc) from None
    rid = envelope.id
    _check_version(envelope.v, rid)
    decoder = _args.get(envelope.op)
    if decoder is None:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown operation {envelope.op[:64]!r}",
                            request_id=rid)
    try:
        return Request(rid, decoder.decode(envelope.args or _EMPTY_MAP))
    except _UNREADABLE as exc:
        raise _bad(f"{envelope.op}: {str(exc).replace('`$', '`args')}", rid) from None


def _check_version(version: int, rid: int) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this daemon speaks "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}",
            request_id=rid, details={"supported": list(SUPPORTED_VERSIONS)})


def _refusal(frame: bytes, why: Exception) -> ProtocolError:
    """Why the strict pass refused an envelope, in the protocol's order of
    checks (README.md, section 2): the id first where it can be read, so that
    the error reply names it; then the version, so that a newer client's
    request is answered `unsupported_version` whatever else it holds; then
    what the pass said."""
    try:
        obj = _anything.decode(frame)
    except _UNREADABLE as exc:
        return _bad(f"frame is not valid msgpack ({exc})")
    if not isinstance(obj, dict):
        return _bad(f"request must be a msgpack map, got {type(obj).__name__}")
    try:
        rid = msgspec.convert(obj.get("id"), RequestId)
    except msgspec.ValidationError:
        return _bad(f"field 'id' must be an integer in [0, {MAX_REQUEST_ID}]")
    try:
        _check_version(msgspec.convert(obj.get("v"), int), rid)
    except msgspec.ValidationError:
        return _bad("field 'v' (protocol version) must be an integer", rid)
    except ProtocolError as exc:
        return exc
    return _bad(f"malformed request: {why}", rid)


def encode_request(rid: int, op: Op) -> bytes:
    """A request frame; `op`'s fields at their default stay off the wire (Op)."""
    return _pack({"v": PROTOCOL_VERSION, "id": rid, "op": op.op, "args": op})


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


class ErrorBody(Struct):
    code: str = ErrorCode.INTERNAL.value  # an error reply without a code
    message: str = ""
    details: dict[str, Any] = {}


class Reply(Struct):
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
            return _results[op].decode(self.result)
        except _UNREADABLE as exc:
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
_results: dict[type[Op], msgspec.msgpack.Decoder[Any]] = {
    cls: msgspec.msgpack.Decoder(cls.result) for cls in OPS.values()}


_MAP_LEADS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # fixmap, map 16, map 32


def _is_map(raw: msgspec.Raw) -> bool:
    return len(raw) > 0 and memoryview(raw)[0] in _MAP_LEADS


def decode_reply(frame: bytes) -> Reply | r.Event:
    """Parse a daemon->tenant frame: a Reply, or the event's struct
    (UnknownEvent for a name this side does not know). Raises ProtocolError
    on anything malformed."""
    try:
        msg = _frames.decode(frame)
    except _UNREADABLE as exc:
        raise _bad(f"malformed frame from daemon: {exc}") from None
    if msg.v != PROTOCOL_VERSION:
        raise _bad("daemon sent a frame that is not a protocol v1 map")
    if msg.event is not None:
        decoder = _events.get(msg.event)
        if decoder is None:
            return r.UnknownEvent(wire_name=msg.event[:64])
        try:
            return decoder.decode(msg.data or _EMPTY_MAP)
        except _UNREADABLE as exc:
            raise _bad(f"malformed {msg.event[:64]!r} event from daemon: {exc}") from None
    if msg.ok is None:
        raise _bad("malformed reply from daemon: no `ok`")
    if msg.ok and not _is_map(msg.result):
        raise _bad("malformed reply from daemon: result is not a map")
    if not msg.ok and msg.error is None:
        raise _bad("malformed error reply from daemon")
    return msg
