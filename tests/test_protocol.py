"""Unit tests for the wire protocol: protocol/messages.py and protocol/errors.py.

Pure functions only: no sockets, no processes.
"""

from __future__ import annotations

import math
import re

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqua_protocol import (
    EVENTS,
    MAX_FRAME_BYTES,
    OPS,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Bye,
    ErrorCode,
    Heartbeat,
    Hello,
    Lease,
    LeaseInfo,
    ProtocolError,
    Release,
    Reply,
    Request,
    Status,
    decode_reply,
    decode_request,
    encode_error,
    encode_event,
    encode_request,
    encode_result,
)
from aqua_protocol import messages as m
from aqua_protocol import replies as r

LEASE_ID = "L" + "a" * 22


def frame(obj) -> bytes:
    return msgpack.packb(obj)


def req(op: str, args=None, *, rid: int = 7, v=PROTOCOL_VERSION, **extra) -> bytes:
    obj = {"v": v, "id": rid, "op": op}
    if args is not None:
        obj["args"] = args
    obj.update(extra)
    return frame(obj)


def refused(data: bytes, code: ErrorCode = ErrorCode.BAD_REQUEST) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_request(data)
    assert info.value.code is code, (info.value.code, info.value.message)
    assert isinstance(info.value.message, str) and info.value.message
    return info.value


# Hand-written valid instances; ops added later are covered by `_minimal`.
SAMPLES = {
    "hello": Hello(tenant="llama-7b", devices=[0, 3], weight=2.5),
    "heartbeat": Heartbeat(),
    "bye": Bye(),
    "lease": Lease(nbytes=3 * 2**20, near=1),
    "release": Release(lease=LEASE_ID),
    "lease_info": LeaseInfo(lease=LEASE_ID),
    "status": Status(),
    "adopt": m.Adopt(lease=LEASE_ID, capability="0123456789abcdef" * 2),
}


def _minimal_value(t: msgspec.inspect.Type):
    """Smallest value a field's type accepts (for ops without a hand sample)."""
    if isinstance(t, msgspec.inspect.StrType):
        for candidate in ("a", "a1", "L" + "a" * 8):
            if re.search(t.pattern, candidate):
                return candidate
        raise AssertionError(f"no sample for pattern {t.pattern}")
    if isinstance(t, msgspec.inspect.ListType):
        return [_minimal_value(t.item_type)] * max(t.min_length or 0, 1)
    if isinstance(t, msgspec.inspect.IntType):
        return t.ge or 0
    if isinstance(t, msgspec.inspect.FloatType):
        return t.ge or 0.0
    if isinstance(t, msgspec.inspect.BoolType):
        return True
    raise AssertionError(f"no sample for {t}")


def _fields(cls) -> tuple[msgspec.inspect.Field, ...]:
    return msgspec.inspect.type_info(cls).fields


def _minimal(cls):
    return cls(**{f.name: _minimal_value(f.type) for f in _fields(cls) if f.required})


def sample(name: str):
    return SAMPLES[name] if name in SAMPLES else _minimal(OPS[name])


def test_ops_registry_is_consistent():
    assert set(SAMPLES) <= set(OPS)
    for name, cls in OPS.items():
        assert cls.op == name
        assert issubclass(cls, m.Op) and cls.__struct_config__.forbid_unknown_fields
        assert isinstance(sample(name), cls)


@pytest.mark.parametrize("name", sorted(OPS))
def test_round_trip_every_op(name):
    op = sample(name)
    decoded = decode_request(encode_request(12345, op))
    assert isinstance(decoded, Request)
    assert decoded.id == 12345
    assert decoded.op == name
    assert type(decoded.args) is type(op)
    assert decoded.args == op


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_refuses_an_unknown_field(name):
    args = {k: v for k, v in msgspec.structs.asdict(sample(name)).items() if v is not None}
    args["no_such_field"] = 1
    err = refused(req(name, args, rid=3))
    assert err.request_id == 3 and "no_such_field" in err.message


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_refuses_a_missing_required_field(name):
    required = [f.name for f in _fields(OPS[name]) if f.required]
    full = msgspec.structs.asdict(sample(name))
    for field_name in required:
        args = {k: v for k, v in full.items() if k != field_name and v is not None}
        err = refused(req(name, args))
        assert field_name in err.message


def test_round_trip_defaults():
    # Optional fields left at their default are omitted on the wire and come back.
    assert decode_request(encode_request(1, Lease(nbytes=1))).args == Lease(nbytes=1, near=None)
    # No weight: the daemon gives the operator's (aquad/core/weights.py).
    hello = decode_request(encode_request(1, Hello(tenant="a", devices=[0]))).args
    assert hello.weight is None


def test_encoded_request_shape():
    obj = msgpack.unpackb(encode_request(3, Lease(nbytes=10)))
    assert obj == {"v": 1, "id": 3, "op": "lease", "args": {"nbytes": 10}}


def test_args_may_be_omitted_for_ops_without_fields():
    assert decode_request(req("status")).args == Status()
    assert decode_request(req("heartbeat", {})).args == Heartbeat()


def test_explicit_nil_for_optional_field_means_default():
    assert decode_request(req("lease", {"nbytes": 5, "near": None})).args == Lease(nbytes=5)
    assert decode_request(req("hello", {"tenant": "a", "devices": [0], "weight": None})).args \
        == Hello(tenant="a", devices=[0])


def test_integer_weight_is_accepted_as_float():
    args = decode_request(req("hello", {"tenant": "a", "devices": [0], "weight": 3})).args
    assert args.weight == 3.0 and isinstance(args.weight, float)


def test_bounds_are_inclusive_where_documented():
    assert decode_request(req("lease", {"nbytes": m.MAX_LEASE_BYTES, "near": m.MAX_DEVICE_ID}))
    assert decode_request(req("lease", {"nbytes": 1, "near": 0}))
    assert decode_request(req("status", rid=0)).id == 0
    assert decode_request(req("status", rid=m.MAX_REQUEST_ID)).id == m.MAX_REQUEST_ID
    assert decode_request(req("hello", {"tenant": "a" * 64, "devices": list(range(64))}))
    assert decode_request(req("hello", {"tenant": "x", "devices": [0], "weight": 100}))
    assert decode_request(req("hello", {"tenant": "x", "devices": [0], "weight": 0.01}))
    assert decode_request(req("release", {"lease": "L" + "z" * 8}))
    assert decode_request(req("release", {"lease": "L" + "z" * 64}))


# --- strict validation --------------------------------------------------------

BAD_ARGS = [
    # wrong types, bool-for-int
    ("lease", {"nbytes": True}),
    ("lease", {"nbytes": False}),
    ("lease", {"nbytes": "10"}),
    ("lease", {"nbytes": 10.0}),
    ("lease", {"nbytes": 10, "near": True}),
    ("lease", {"nbytes": 10, "near": 1.0}),
    ("lease", {"nbytes": [10]}),
    ("hello", {"tenant": "a", "devices": [0], "weight": True}),
    ("hello", {"tenant": "a", "devices": [True]}),
    ("hello", {"tenant": "a", "devices": [0.0]}),
    ("hello", {"tenant": "a", "devices": 0}),
    ("hello", {"tenant": "a", "devices": {"0": 0}}),
    ("hello", {"tenant": 5, "devices": [0]}),
    ("hello", {"tenant": b"abc", "devices": [0]}),
    ("hello", {"tenant": "a", "devices": [0], "weight": "1"}),
    ("release", {"lease": 12345678901}),
    ("release", {"lease": None}),
    # NaN / infinities
    ("hello", {"tenant": "a", "devices": [0], "weight": math.nan}),
    ("hello", {"tenant": "a", "devices": [0], "weight": math.inf}),
    ("hello", {"tenant": "a", "devices": [0], "weight": -math.inf}),
    ("hello", {"tenant": "a", "devices": [0], "weight": 1e-300}),  # would wreck vruntimes
    ("hello", {"tenant": "a", "devices": [0], "weight": 100.5}),
    # out of range
    ("lease", {"nbytes": 0}),
    ("lease", {"nbytes": -1}),
    ("lease", {"nbytes": m.MAX_LEASE_BYTES + 1}),
    ("lease", {"nbytes": 2**64 - 1}),
    ("lease", {"nbytes": 1, "near": -1}),
    ("lease", {"nbytes": 1, "near": m.MAX_DEVICE_ID + 1}),
    ("hello", {"tenant": "a", "devices": [0], "weight": 0.0}),
    ("hello", {"tenant": "a", "devices": [0], "weight": -1.0}),
    ("hello", {"tenant": "a", "devices": [0], "weight": 1e6 + 1}),
    ("hello", {"tenant": "a", "devices": [-1]}),
    ("hello", {"tenant": "a", "devices": [m.MAX_DEVICE_ID + 1]}),
    # lists: too short, too long
    ("hello", {"tenant": "a", "devices": []}),
    ("hello", {"tenant": "a", "devices": list(range(65))}),
    # tenant name
    ("hello", {"tenant": "", "devices": [0]}),
    ("hello", {"tenant": "-lead", "devices": [0]}),
    ("hello", {"tenant": ".hidden", "devices": [0]}),
    ("hello", {"tenant": "a" * 65, "devices": [0]}),
    ("hello", {"tenant": "has space", "devices": [0]}),
    ("hello", {"tenant": "sl/ash", "devices": [0]}),
    ("hello", {"tenant": "nl\n", "devices": [0]}),
    ("hello", {"tenant": "ünï", "devices": [0]}),
    # lease id pattern
    ("release", {"lease": ""}),
    ("release", {"lease": "L1234567"}),  # 7 chars after L
    ("release", {"lease": "X12345678"}),
    ("release", {"lease": "l12345678"}),
    ("release", {"lease": "L" + "a" * 65}),
    ("release", {"lease": "L1234/5678"}),
    ("release", {"lease": "L12345678\n"}),
    ("lease_info", {"lease": "../etc/passwd"}),
    ("lease_info", {"lease": "L12345678 "}),
    # missing fields
    ("lease", {}),
    ("lease", {"near": 0}),
    ("hello", {"devices": [0]}),
    ("hello", {"tenant": "a"}),
    ("release", {}),
    ("lease_info", {}),
    # unknown fields
    ("lease", {"nbytes": 1, "nbytez": 2}),
    ("status", {"verbose": True}),
    ("heartbeat", {"x": 1}),
    ("bye", {"tenant": "a"}),
    ("release", {"lease": LEASE_ID, "force": True}),
    ("lease", {"nbytes": 1, b"near": 0}),
]


@pytest.mark.parametrize(("op", "args"), BAD_ARGS)
def test_bad_args_are_refused_with_request_id(op, args):
    err = refused(req(op, args, rid=99))
    assert err.request_id == 99


def test_unknown_arg_field_is_named():
    err = refused(req("lease", {"nbytes": 1, "colour": "blue"}))
    assert "colour" in err.message


def test_missing_field_is_named():
    err = refused(req("lease", {}))
    assert "nbytes" in err.message


@pytest.mark.parametrize("args", [[], "x", 1, None, True, [["nbytes", 1]]])
def test_args_must_be_a_map(args):
    err = refused(frame({"v": 1, "id": 4, "op": "lease", "args": args}))
    assert err.request_id == 4


@pytest.mark.parametrize("extra", [{"x": 1}, {"ID": 1}, {"args2": {}}, {b"id": 1}])
def test_unknown_envelope_keys(extra):
    err = refused(frame({"v": 1, "id": 5, "op": "status", "args": {}, **extra}))
    assert err.request_id == 5


@pytest.mark.parametrize(
    "rid", [None, -1, m.MAX_REQUEST_ID + 1, 2**64 - 1, 1.0, "1", True, False, [1], b"\x01"]
)
def test_bad_request_id_is_refused_without_an_id(rid):
    obj = {"v": 1, "op": "status", "args": {}}
    if rid is not None:
        obj["id"] = rid
    err = refused(frame(obj))
    assert err.request_id is None


@pytest.mark.parametrize("v", [None, "1", 1.0, True, [1]])
def test_bad_version_type(v):
    obj = {"id": 8, "op": "status"}
    if v is not None:
        obj["v"] = v
    err = refused(frame(obj))
    assert err.request_id == 8


@pytest.mark.parametrize("v", [0, 2, 99, -1, 2**40])
def test_unsupported_version(v):
    err = refused(req("status", rid=11, v=v), ErrorCode.UNSUPPORTED_VERSION)
    assert err.request_id == 11
    assert err.details == {"supported": list(SUPPORTED_VERSIONS)}
    assert PROTOCOL_VERSION in err.details["supported"]


def test_unsupported_version_is_reported_before_other_problems():
    # A future client's request may have fields v1 does not know.
    data = frame({"v": 2, "id": 1, "op": "new_op", "args": {"x": 1}, "trace": "t"})
    refused(data, ErrorCode.UNSUPPORTED_VERSION)


@pytest.mark.parametrize("op", ["", "Lease", "lease ", "alloc", "__init__", "x" * 1000])
def test_unknown_op(op):
    err = refused(req(op, {}, rid=21), ErrorCode.UNKNOWN_OP)
    assert err.request_id == 21
    assert len(err.message) < 200  # the op name is truncated in the message


@pytest.mark.parametrize("op", [None, 1, b"lease", ["lease"], True])
def test_op_must_be_a_string(op):
    obj = {"v": 1, "id": 2, "args": {}}
    if op is not None:
        obj["op"] = op
    err = refused(frame(obj))
    assert err.request_id == 2


@pytest.mark.parametrize("obj", [[1, 2], "hello", 1, None, True, 1.5, b"bytes", []])
def test_non_map_frames(obj):
    err = refused(frame(obj))
    assert err.request_id is None


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x81", b"\x92\x01", b"\xdd\xff\xff\xff\xff", b"\x80\x80",
     b"not msgpack at all", frame({"v": 1}) + b"\x00", b"\xd9\x05ab",
     b"\x91" * 60000 + b"\x00",  # nesting deeper than msgpack's stack
     b"\xc7\x01\x05a",  # ext type
     b"\xd6\xff\x00\x00\x00\x01"],  # timestamp
)
def test_garbage_bytes(data):
    refused(data)


@pytest.mark.parametrize("key", [b"\xa4args", b"\xa1x", b"\xa4args\x81\xa6nbytes"])
def test_nesting_too_deep_anywhere_is_refused(key):
    # Deeper than msgspec's recursion limit, inside the envelope, not at its top.
    head = msgpack.packb({"v": 1, "id": 3, "op": "lease"})
    data = bytes([head[0] + 1]) + head[1:] + key + b"\x91" * 60000 + b"\x00"
    assert len(data) <= MAX_FRAME_BYTES
    refused(data)


def test_a_refused_argument_is_named_by_its_path_in_args():
    assert "`args.nbytes`" in refused(req("lease", {"nbytes": True})).message
    assert "`args.devices[1]`" in refused(
        req("hello", {"tenant": "a", "devices": [0, 1024]})).message
    assert refused(req("lease", {"nbytes": 1, "near": 0.5})).message.startswith("lease: ")


def test_every_float_argument_is_bounded():
    # msgspec lets NaN and the infinities into an unbounded float field.
    def floats(t):
        if isinstance(t, msgspec.inspect.UnionType):
            return [f for member in t.types for f in floats(member)]
        return [t] if isinstance(t, msgspec.inspect.FloatType) else []
    for cls in OPS.values():
        for f in _fields(cls):
            assert all(t.ge is not None and t.le is not None for t in floats(f.type)), f


def test_non_string_map_keys_are_refused():
    # Keys are strings in this protocol; the rest of the envelope is readable,
    # so the refusal names the request.
    assert refused(msgpack.packb({1: 2, "v": 1, "id": 1, "op": "status"})).request_id == 1
    assert refused(req("status", {1: True}, rid=4)).request_id == 4


def test_oversize_frame():
    big = req("hello", {"tenant": "a" * (MAX_FRAME_BYTES + 10), "devices": [0]})
    assert len(big) > MAX_FRAME_BYTES
    err = refused(big, ErrorCode.FRAME_TOO_LARGE)
    assert str(MAX_FRAME_BYTES) in err.message
    # Size is checked before parsing: garbage of that size gets the same code.
    refused(b"\xc1" * (MAX_FRAME_BYTES + 1), ErrorCode.FRAME_TOO_LARGE)


def test_frame_at_the_limit_is_not_refused_for_its_size():
    s = "x" * (MAX_FRAME_BYTES - 40)
    probe = req("status", {"pad": s})
    exact = req("status", {"pad": s + "x" * (MAX_FRAME_BYTES - len(probe))})
    assert len(exact) == MAX_FRAME_BYTES
    err = refused(exact, ErrorCode.BAD_REQUEST)  # unknown field, not frame_too_large
    assert "pad" in err.message


# --- errors -------------------------------------------------------------------


def test_error_codes_are_stable_strings():
    assert ErrorCode.BAD_REQUEST == "bad_request"
    assert ErrorCode.FRAME_TOO_LARGE.value == "frame_too_large"
    assert {c.value for c in ErrorCode} >= {
        "bad_request", "frame_too_large", "unsupported_version", "unknown_op",
        "not_registered", "already_registered", "permission_denied", "no_such_device",
        "no_such_lease", "out_of_memory", "limit_exceeded", "shutting_down", "internal"}
    assert len({c.value for c in ErrorCode}) == len(ErrorCode)


def test_protocol_error_fields():
    err = ProtocolError(ErrorCode.NO_SUCH_LEASE, "gone", request_id=3, details={"a": 1})
    assert (err.code, err.message, err.request_id, err.details) == (
        ErrorCode.NO_SUCH_LEASE, "gone", 3, {"a": 1})
    assert str(err) == "gone"
    assert "no_such_lease" in repr(err)
    plain = ProtocolError(ErrorCode.INTERNAL, "x")
    assert plain.request_id is None and plain.details == {}


# --- replies and events -------------------------------------------------------

HANDLE = {"kind": "posix_shm", "name": "aqua-0123456789-" + "a" * 24, "nbytes": 10}
GRANTED = {"lease": LEASE_ID, "device": 1, "nbytes": 10, "tier": "host", "handle": HANDLE}


def test_a_result_decodes_strictly_into_its_ops_struct():
    rep = decode_reply(encode_result(5, GRANTED))
    assert isinstance(rep, Reply) and (rep.id, rep.ok) == (5, True)
    granted = rep.result_of(Lease)
    assert granted == r.Granted(LEASE_ID, 1, 10, "host", r.PosixShm(HANDLE["name"], 10))
    assert granted.capability == "" and r.handle_map(granted.handle) == HANDLE
    # What the client does not know is ignored (fields added within v1) ...
    assert decode_reply(encode_result(5, {**GRANTED, "later": [1]})).result_of(Lease) == granted
    # ... what it needs must be there, of its type.
    for bad in ({**GRANTED, "device": True}, {k: v for k, v in GRANTED.items() if k != "tier"},
                {**GRANTED, "handle": {**HANDLE, "kind": "carrier_pigeon"}}, {}):
        with pytest.raises(ProtocolError, match="malformed 'lease' result"):
            decode_reply(encode_result(5, bad)).result_of(Lease)


def test_a_struct_result_and_its_map_are_the_same_bytes_on_the_wire():
    granted = decode_reply(encode_result(5, GRANTED)).result_of(Lease)
    assert encode_result(5, granted) == encode_result(5, GRANTED)
    # Optional fields at their default stay off the wire, as in the maps.
    assert msgpack.unpackb(encode_result(1, r.TurnState("queued", [0])))["result"] == {
        "state": "queued", "devices": [0]}


def test_every_op_names_a_result_struct():
    for cls in OPS.values():
        assert cls.result is r.StatusReport or issubclass(cls.result, r.Result), cls
    assert decode_reply(encode_result(1, {})).result_of(Heartbeat) == r.Empty()
    status = {"schema": 1, "devices": [], "anything": {"nested": [1]}}
    assert decode_reply(encode_result(1, status)).result_of(Status) == status


def test_decode_error_reply_round_trip():
    err = ProtocolError(ErrorCode.OUT_OF_MEMORY, "full", request_id=9,
                        details={"total_free_bytes": 0})
    rep = decode_reply(encode_error(err))
    assert isinstance(rep, Reply) and (rep.id, rep.ok) == (9, False)
    assert rep.error == m.ErrorBody("out_of_memory", "full", {"total_free_bytes": 0})


def test_decode_error_reply_without_id_or_details():
    rep = decode_reply(encode_error(ProtocolError(ErrorCode.BAD_REQUEST, "junk")))
    assert (rep.id, rep.ok, rep.error.code, rep.error.details) == (None, False, "bad_request", {})
    raw = msgpack.unpackb(encode_error(ProtocolError(ErrorCode.BAD_REQUEST, "junk")))
    assert "details" not in raw["error"]


def test_decoded_error_from_decode_request_survives_the_wire():
    with pytest.raises(ProtocolError) as info:
        decode_request(req("status", rid=77, v=9))
    rep = decode_reply(encode_error(info.value))
    assert (rep.id, rep.error.code) == (77, "unsupported_version")
    assert rep.error.details == {"supported": list(SUPPORTED_VERSIONS)}


def test_decode_events():
    assert decode_reply(encode_event("shutdown")) == r.Shutdown()
    assert decode_reply(encode_event("shutdown", {"reason": "x"})) == r.Shutdown("x")
    assert decode_reply(encode_event("grant", r.Grant(3, [0, 1], 0.5))) == r.Grant(3, [0, 1], 0.5)
    feed = decode_reply(encode_event("feed", {"seq": 2, "time": 1.5, "kind": "slice_revoked",
                                              "tenant": "t1", "slice": 4, "new": 1}))
    assert feed == r.Feed(2, 1.5, "slice_revoked", tenant="t1", slice=4)
    # A newer daemon's event is for the client to ignore, not to fail on.
    assert decode_reply(encode_event("weather", {"rain": True})) == r.UnknownEvent("weather")
    assert set(EVENTS) == {"shutdown", "grant", "preempt", "revoked", "reclaim", "fenced",
                           "reclaim_done", "feed"}


@pytest.mark.parametrize(
    "obj",
    [
        [1], "x", None,
        {"id": 1, "ok": True, "result": {}},  # no version
        {"v": 2, "id": 1, "ok": True, "result": {}},
        {"v": True, "id": 1, "ok": True, "result": {}},
        {"v": 1, "id": "1", "ok": True, "result": {}},
        {"v": 1, "id": 1, "ok": 1, "result": {}},
        {"v": 1, "id": 1, "result": {}},
        {"v": 1, "id": 1, "ok": True, "result": [1]},
        {"v": 1, "id": 1, "ok": True},
        {"v": 1, "id": 1, "ok": False},
        {"v": 1, "id": 1, "ok": False, "error": "boom"},
        {"v": 1, "id": 1, "ok": False, "error": {"code": 5}},
        {"v": 1, "event": 5, "data": {}},
        {"v": 1, "event": "shutdown", "data": [1]},
        {"v": 1, "event": "grant", "data": {"slice": 1}},
        {"v": 1, "event": "preempt", "data": {"slice": "1", "grace_s": 1.0}},
        {"v": 1, "event": "reclaim", "data": {"reclaim": 1, "device": 0, "deadline_s": 1.0,
                                              "leases": [5]}},
        {"v": 1, "event": "feed", "data": {"seq": 1, "time": 1.0}},
    ],
)
def test_malformed_replies(obj):
    with pytest.raises(ProtocolError) as info:
        decode_reply(frame(obj))
    assert info.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01"])
def test_garbage_replies(data):
    with pytest.raises(ProtocolError):
        decode_reply(data)


@pytest.mark.parametrize(("head", "key"), [({"v": 1, "id": 3, "ok": True}, b"\xa6result"),
                                         ({"v": 1, "event": "grant"}, b"\xa4data")])
def test_replies_nested_too_deep_give_protocol_error(head, key):
    # Regression: RecursionError escaped decode_reply (and the client's reader).
    packed = msgpack.packb(head)
    with pytest.raises(ProtocolError):
        decode_reply(bytes([packed[0] + 1]) + packed[1:] + key + b"\x91" * 60000 + b"\x00")


# Regression: decode_reply used to call dict() on error.details and leak
# TypeError/ValueError for a non-map.
@pytest.mark.parametrize("details", [[1, 2], "ab", 5, [[1, 2]]])
def test_malformed_error_details_raise_protocol_error(details):
    data = frame({"v": 1, "id": 1, "ok": False,
                  "error": {"code": "internal", "message": "m", "details": details}})
    with pytest.raises(ProtocolError):
        decode_reply(data)


# --- property tests -----------------------------------------------------------

msgpack_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20)
)
msgpack_objects = st.recursive(
    msgpack_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)

# Every op's argument names (and one no op has), so the generator reaches each field's checks.
FIELD_NAMES = sorted({f.name for cls in OPS.values() for f in msgspec.structs.fields(cls)}) + ["x"]

# Maps that look like requests, so the generator reaches the deep checks.
near_requests = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, True, None]),
     "id": st.one_of(st.integers(min_value=-2, max_value=2**63 + 2), msgpack_scalars),
     "op": st.one_of(st.sampled_from(sorted(OPS)), msgpack_scalars)},
    optional={
        "args": st.one_of(
            st.dictionaries(st.sampled_from(FIELD_NAMES), msgpack_objects, max_size=4),
            msgpack_objects),
        "extra": msgpack_objects,
    },
)


def _decode_or_protocol_error(data: bytes) -> None:
    try:
        result = decode_request(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert isinstance(exc.message, str)
        assert exc.request_id is None or isinstance(exc.request_id, int)
        # Every refusal must also be encodable as an error reply.
        decode_reply(encode_error(exc))
    else:
        assert isinstance(result, Request)
        assert type(result.args) in OPS.values()
        # Anything accepted re-encodes to something accepted and equal.
        assert decode_request(encode_request(result.id, result.args)) == result


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(msgpack_objects, near_requests))
def test_any_msgpack_object_gives_a_request_or_protocol_error(obj):
    _decode_or_protocol_error(msgpack.packb(obj))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_a_request_or_protocol_error(data):
    _decode_or_protocol_error(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=1, max_value=30))
def test_truncated_valid_frames_give_protocol_error(tail, cut):
    data = encode_request(1, sample("hello"))
    _decode_or_protocol_error(data[:-cut] + tail)


names = st.from_regex(m.NAME_RE, fullmatch=True)
lease_ids = st.from_regex(m.LEASE_ID_RE, fullmatch=True)
devices = st.integers(min_value=0, max_value=m.MAX_DEVICE_ID)
rids = st.integers(min_value=0, max_value=m.MAX_REQUEST_ID)

valid_ops = st.one_of(
    st.builds(Lease, nbytes=st.integers(min_value=1, max_value=m.MAX_LEASE_BYTES),
              near=st.none() | devices),
    st.builds(Release, lease=lease_ids),
    st.builds(LeaseInfo, lease=lease_ids),
    st.builds(Hello, tenant=names,
              devices=st.lists(devices, min_size=1, max_size=64),
              weight=st.none() | st.floats(min_value=0.01, max_value=100.0)),
)


@settings(max_examples=200, deadline=None)
@given(rids, valid_ops)
def test_valid_requests_round_trip(rid, op):
    decoded = decode_request(encode_request(rid, op))
    assert decoded == Request(rid, op)


def _strategy(t: msgspec.inspect.Type):
    """Values a field's type accepts, derived from its constraints."""
    if isinstance(t, msgspec.inspect.UnionType):
        return st.one_of([_strategy(member) for member in t.types])
    if isinstance(t, msgspec.inspect.NoneType):
        return st.none()
    if isinstance(t, msgspec.inspect.StrType):
        return st.from_regex(t.pattern, fullmatch=True).filter(
            lambda s: t.max_length is None or len(s) <= t.max_length)
    if isinstance(t, msgspec.inspect.ListType):
        return st.lists(_strategy(t.item_type), min_size=t.min_length or 0,
                        max_size=t.max_length if t.max_length is not None else 8)
    if isinstance(t, msgspec.inspect.IntType):
        return st.integers(min_value=t.ge, max_value=t.le)
    if isinstance(t, msgspec.inspect.FloatType):
        return st.floats(min_value=t.ge, max_value=t.le, allow_nan=False)
    if isinstance(t, msgspec.inspect.BoolType):
        return st.booleans()
    raise AssertionError(f"no strategy for {t}")


def _op_strategy(cls):
    return st.builds(cls, **{f.name: _strategy(f.type) for f in _fields(cls)})


@settings(max_examples=200, deadline=None)
@given(rids, st.sampled_from(sorted(OPS)).flatmap(lambda name: _op_strategy(OPS[name])))
def test_every_op_round_trips_generated_args(rid, op):
    assert decode_request(encode_request(rid, op)) == Request(rid, op)


# --- property tests of what the daemon sends ----------------------------------

REPLY_FIELDS = ["lease", "device", "nbytes", "tier", "handle", "state", "devices", "slice",
                "reclaim", "leases", "report", "seq", "time", "kind", "name"]
near_results = st.dictionaries(st.sampled_from(REPLY_FIELDS), msgpack_objects, max_size=6)
near_frames = st.one_of(
    st.fixed_dictionaries({"v": st.sampled_from([1, 1, 2, True]),
                           "id": st.none() | st.integers(-1, 2**63) | msgpack_scalars,
                           "ok": st.sampled_from([True, False, None, 1])},
                          optional={"result": near_results | msgpack_objects,
                                    "error": st.fixed_dictionaries(
                                        {}, optional={"code": msgpack_scalars,
                                                      "message": msgpack_scalars,
                                                      "details": msgpack_objects})}),
    st.fixed_dictionaries({"v": st.just(1),
                           "event": st.sampled_from(sorted(EVENTS)) | msgpack_scalars},
                          optional={"data": near_results | msgpack_objects}),
)


def _reply_or_protocol_error(data: bytes) -> None:
    """Whatever a daemon sends, the client gets a typed message or a
    ProtocolError, and every result a typed struct or a ProtocolError."""
    try:
        msg = decode_reply(data)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST and exc.message
        return
    if isinstance(msg, r.Event):
        assert type(msg) in (*EVENTS.values(), r.UnknownEvent)
        return
    assert isinstance(msg, Reply) and isinstance(msg.ok, bool)
    for cls in OPS.values():
        try:
            msg.result_of(cls)
        except ProtocolError as exc:
            assert exc.code is ErrorCode.BAD_REQUEST and repr(cls.op) in exc.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(msgpack_objects, near_frames))
def test_any_frame_from_a_daemon_gives_a_typed_message_or_protocol_error(obj):
    _reply_or_protocol_error(msgpack.packb(obj))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_from_a_daemon_give_a_typed_message_or_protocol_error(data):
    _reply_or_protocol_error(data)
