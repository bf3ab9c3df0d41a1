"""Exceptions of the tenant library. Each carries the wire error code.

Codes from the daemon are the protocol's (aqua_protocol.ErrorCode); the
library adds its own for failures that never reach a daemon:
`daemon_not_running`, `daemon_not_responding`, `permission_denied` (on the
socket file), `untrusted_daemon` (the socket's path, the daemon or a segment
it handed out is not one this user can trust), `daemon_gone` (it said goodbye,
or the client was closed) and `turn_timeout` (no slice granted in time).
"""

from __future__ import annotations

from aqua_protocol import ErrorCode


class AquaError(Exception):
    code: str = ErrorCode.INTERNAL.value

    def __init__(self, message: str, *, code: str | None = None,
                 details: dict | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.details = details or {}


class BadRequest(AquaError):
    code = ErrorCode.BAD_REQUEST.value


class FrameTooLarge(BadRequest):
    code = ErrorCode.FRAME_TOO_LARGE.value


class UnsupportedVersion(AquaError):
    code = ErrorCode.UNSUPPORTED_VERSION.value


class UnknownOp(BadRequest):
    code = ErrorCode.UNKNOWN_OP.value


class NotRegistered(AquaError):
    code = ErrorCode.NOT_REGISTERED.value


class AlreadyRegistered(AquaError):
    code = ErrorCode.ALREADY_REGISTERED.value


class PermissionDenied(AquaError):
    code = ErrorCode.PERMISSION_DENIED.value


class NoSuchDevice(AquaError):
    code = ErrorCode.NO_SUCH_DEVICE.value


class NoSuchLease(AquaError):
    code = ErrorCode.NO_SUCH_LEASE.value


class OutOfMemory(AquaError):
    code = ErrorCode.OUT_OF_MEMORY.value


class LimitExceeded(AquaError):
    code = ErrorCode.LIMIT_EXCEEDED.value


class Busy(AquaError):
    """Another reclaim of the device is in progress (details.reclaim)."""

    code = ErrorCode.BUSY.value


class InternalError(AquaError):
    code = ErrorCode.INTERNAL.value


class UntrustedDaemon(AquaError):
    """The client refused the daemon before trusting it with anything: its
    socket's directory, its uid or a segment it handed out is not what the
    real aquad gives (see aqua.client.check_socket and aqua.memory)."""

    code = "untrusted_daemon"


class DaemonUnavailable(AquaError):
    """The daemon cannot be reached or has gone; nothing was done."""


class DaemonNotRunning(DaemonUnavailable):
    code = "daemon_not_running"


class DaemonNotResponding(DaemonUnavailable):
    code = "daemon_not_responding"


class DaemonGone(DaemonUnavailable):
    code = "daemon_gone"


class TurnTimeout(AquaError):
    """turn() was not granted a slice within its timeout."""

    code = "turn_timeout"


class ShuttingDown(DaemonGone):
    code = ErrorCode.SHUTTING_DOWN.value


_BY_CODE: dict[str, type[AquaError]] = {
    cls.code: cls
    for cls in (BadRequest, FrameTooLarge, UnsupportedVersion, UnknownOp, NotRegistered,
                AlreadyRegistered, PermissionDenied, NoSuchDevice, NoSuchLease, OutOfMemory,
                LimitExceeded, Busy, InternalError, ShuttingDown)
}


def error_for(code: str, message: str, details: dict | None = None) -> AquaError:
    """The exception for a wire error; unknown (newer) codes stay AquaError."""
    cls = _BY_CODE.get(code, AquaError)
    return cls(message, code=code, details=details)
