"""aqua: the tenant library of the aqua GPU memory and time-slice arbiter.

    import aqua
    with aqua.connect(tenant="llama-7b", device=0) as client:
        with client.lease(64 << 20) as lease:
            kv = lease.tensor(torch.float16, (1024, 32768))   # aliases leased memory
        saved = client.offload(tensor)        # into a lease; free your copy
        tensor = saved.restore()              # bit-exact, lease released

Importing aqua does not import torch; tensors are touched only on demand.
"""

from aqua_protocol.paths import resolve_socket
from aqua_protocol.turns import TurnMachine

from .client import Client, Connection, Lease, connect
from .errors import (
    AlreadyRegistered,
    AquaError,
    BadRequest,
    DaemonGone,
    DaemonNotResponding,
    DaemonNotRunning,
    DaemonUnavailable,
    FrameTooLarge,
    InternalError,
    LimitExceeded,
    NoSuchDevice,
    NoSuchLease,
    NotRegistered,
    OutOfMemory,
    PermissionDenied,
    ShuttingDown,
    TurnTimeout,
    UnknownOp,
    UnsupportedVersion,
    UntrustedDaemon,
)


def __getattr__(name: str):
    # TensorPager needs torch; load it only when asked for.
    if name == "TensorPager":
        from .tensors import TensorPager

        return TensorPager
    raise AttributeError(name)

__version__ = "0.1.0"

__all__ = [
    "AlreadyRegistered", "AquaError", "BadRequest", "Client", "Connection", "DaemonGone",
    "DaemonNotResponding", "DaemonNotRunning", "DaemonUnavailable", "FrameTooLarge",
    "InternalError", "Lease", "LimitExceeded", "NoSuchDevice", "NoSuchLease", "NotRegistered",
    "OutOfMemory", "PermissionDenied", "ShuttingDown", "TensorPager", "TurnMachine", "TurnTimeout",
    "UnknownOp", "UnsupportedVersion", "UntrustedDaemon", "connect", "resolve_socket",
]
