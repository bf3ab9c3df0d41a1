"""aqua wire protocol: msgpack maps over ZeroMQ, versioned and validated.

Shared by the daemon (aquad) and the tenant library (aqua). See README.md in
this package for every message, field and error code.
"""

from . import replies
from .errors import ErrorCode, ProtocolError
from .messages import (
    EVENTS,
    HARD_MAX_FRAME_BYTES,
    MAX_FRAME_BYTES,
    MAX_STATUS_LEASES,
    OPS,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Adopt,
    Bye,
    Drain,
    Heartbeat,
    Hello,
    Lease,
    LeaseInfo,
    Lend,
    Move,
    Op,
    Reclaim,
    Release,
    Reply,
    Request,
    Status,
    Subscribe,
    Turn,
    TurnDone,
    TurnYield,
    Undrain,
    Unlend,
    decode_reply,
    decode_request,
    encode_error,
    encode_event,
    encode_request,
    encode_result,
)

__all__ = [
    "EVENTS", "HARD_MAX_FRAME_BYTES", "MAX_FRAME_BYTES", "MAX_STATUS_LEASES", "OPS",
    "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "Adopt", "Bye", "ErrorCode", "Heartbeat",
    "Hello", "Lease",
    "LeaseInfo", "Op", "ProtocolError", "Release", "Reply", "Request", "Status", "Subscribe",
    "Turn", "TurnDone", "TurnYield", "Drain", "Lend", "Move", "Reclaim", "Undrain", "Unlend",
    "decode_reply", "decode_request", "encode_error", "encode_event", "encode_request",
    "encode_result", "replies",
]
