"""Stable error codes of the wire protocol.

The string values are part of the protocol: clients match on them, so a code
is never renamed or reused. Every code is documented in protocol/README.md.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    FRAME_TOO_LARGE = "frame_too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    NOT_REGISTERED = "not_registered"
    ALREADY_REGISTERED = "already_registered"
    PERMISSION_DENIED = "permission_denied"
    NO_SUCH_DEVICE = "no_such_device"
    NO_SUCH_LEASE = "no_such_lease"
    OUT_OF_MEMORY = "out_of_memory"
    LIMIT_EXCEEDED = "limit_exceeded"
    SHUTTING_DOWN = "shutting_down"
    BUSY = "busy"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A request the daemon refuses; becomes an error reply on the wire.

    `request_id` is the id of the offending request when it could be read, so
    the client can match the error to its call.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details = details or {}

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r})"
