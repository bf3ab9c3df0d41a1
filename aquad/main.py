"""`aquad`: the command line of the daemon."""

from __future__ import annotations

import faulthandler
import logging
import os
import resource
import signal
import sys
import time

import trio

from . import __version__, logs, shmdir
from .backends import BackendError, GpuPolicy, make_backend
from .config import (
    Config,
    ConfigError,
    load_config,
    parse_amount,
    parse_gpu_reserve,
    parse_host_devices,
    parse_quotas,
    parse_weights,
)
from .core.arbiter import Arbiter, Limits
from .journal import Journal
from .notify import Notifier
from .recovery import recover
from .server import Server, StartupError
from .transport import descriptor_budget

log = logging.getLogger("aquad")


def gpu_policy(config: Config, shm_dir: str = shmdir.DEFAULT) -> GpuPolicy:
    reserve, per_gpu = parse_gpu_reserve(config.gpu_reserve)
    return GpuPolicy(reserve, per_gpu, headroom=parse_amount(config.gpu_headroom, "gpu_headroom"),
                     host_pinned=parse_amount(config.host_pinned, "host_pinned"),
                     shm_dir=shm_dir)


def segment_dir(config: Config) -> shmdir.SegmentDir:
    """The directory host segments go to (aquad/shmdir.py), sized for the
    most either backend may put there."""
    count, capacity = parse_host_devices(config.host_devices)
    most = max(count * capacity, parse_amount(config.host_pinned, "host_pinned"))
    return shmdir.choose(config.shm_dir, mount=config.shm_mount, size=most)


def raise_nofile() -> int:
    """Raise the soft limit on open files to the hard one (systemd's soft
    default is 1024) and return it: every connection and tenant pidfd is a
    descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logs.event(log, logging.WARNING, "nofile_not_raised", soft=soft, hard=target,
                       error=exc)
    return soft


def tenants_that_fit(config: Config) -> int:
    """max_tenants, lowered if the open-files limit cannot hold that many
    tenants' descriptors (so the daemon turns tenants away with an error
    instead of running out of descriptors)."""
    nofile = raise_nofile()
    fit = descriptor_budget(nofile, config.max_tenants)
    if fit < 1:
        raise StartupError(f"the open-files limit ({nofile}) leaves no room for tenants; "
                           f"raise it (LimitNOFILE= under systemd, ulimit -n)")
    if fit < config.max_tenants:
        logs.event(log, logging.WARNING, "max_tenants_lowered", nofile=nofile,
                   max_tenants=config.max_tenants, serving=fit,
                   why=f"the open-files limit holds descriptors for {fit} tenants; raise "
                       f"LimitNOFILE= or ulimit -n")
    return fit


def build(config: Config) -> Server:
    shm = segment_dir(config)
    backend = make_backend(config.backend, socket_path=config.socket,
                           host_devices=parse_host_devices(config.host_devices),
                           gpu=gpu_policy(config, shm.path), shm_dir=shm.path)
    segments = shmdir.report(shm)  # once a backend could start: a refusal stays one line
    problem = backend.check_capacity()
    if problem:
        raise StartupError(problem)
    limits = Limits(
        max_tenants=tenants_that_fit(config),
        max_leases_per_tenant=config.max_leases_per_tenant,
        heartbeat_interval_s=config.heartbeat_timeout_s / 5,
        heartbeat_timeout_s=config.heartbeat_timeout_s,
        quantum_s=config.quantum_ms / 1000,
        grace_s=config.grace_ms / 1000,
        quotas=parse_quotas(config.quota),
        weights=parse_weights(config.weights),
    )
    # Only host segments outlive the daemon: GPU memory dies with its context.
    journal = Journal(config.socket) if backend.name == "host" else None
    arbiter = Arbiter(backend, clock=time.monotonic, limits=limits, journal=journal)
    exporter = None
    if config.metrics:  # prometheus_client is loaded only then
        from .metrics import Exporter, parse_target

        exporter = Exporter(parse_target(config.metrics))
    server = Server(arbiter, config.socket, socket_group=config.socket_group,
                    heartbeat_check_s=min(0.5, config.heartbeat_timeout_s / 4),
                    notifier=Notifier(), exporter=exporter,
                    tenant_labels=config.metrics_tenant_labels)
    server.startup.update(segments)
    server.open()
    if server.exporter is not None:
        try:
            server.exporter.start()
        except OSError as exc:
            server.close_socket()
            raise StartupError(f"cannot serve metrics at {config.metrics}: "
                               f"{exc.strerror or exc}") from None
    got = recover(arbiter, journal, config.adopt_grace_s)  # only after the lock: ours
    if got.kept or got.freed:
        logs.event(log, logging.WARNING, "recovered", kept=got.kept, freed=got.freed,
                   adopt_grace_s=config.adopt_grace_s,
                   why=f"a previous aquad left {got.kept + got.freed} live lease(s): "
                       f"{got.kept} kept for their owners to adopt, {got.freed} freed")
    if got.stale:
        logs.event(log, logging.WARNING, "stale_segments_removed", segments=got.stale)
    return server


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


async def run(server: Server) -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        # Held back since main() began: a stop that came during startup is
        # answered now, with the full cleanup, instead of killing a daemon
        # that already answers connects but has not yet cleaned up after
        # its predecessor (recover()).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                devices = server.arbiter.topology.devices
                metrics = server.exporter.target.describe() if server.exporter else None
                logs.event(log, logging.INFO, "started", version=__version__,
                           socket=server.socket_path, backend=server.arbiter.backend.name,
                           devices=len(devices),
                           capacity_bytes=[d.capacity for d in devices], metrics=metrics,
                           watchdog_s=server.notifier.watchdog_s, **server.startup)
                async for signum in signals:
                    logs.event(log, logging.INFO, "stopping",
                               signal=signal.Signals(signum).name)
                    server.notifier.send("STOPPING=1")
                    nursery.cancel_scope.cancel()
                    break
        finally:
            if server.exporter is not None:
                server.exporter.close()
            server.notifier.close()


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"aquad: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)
    # A wedged loop that the watchdog aborts (SIGABRT) leaves its tracebacks.
    faulthandler.enable()
    # Everything aquad creates is private unless it says otherwise (the socket).
    os.umask(0o077)
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # until run() can answer
    try:
        server = build(config)
    except (StartupError, BackendError, ConfigError, ValueError) as exc:
        print(f"aquad: {exc}", file=sys.stderr)
        return 1
    trio.run(run, server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
