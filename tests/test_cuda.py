"""The cuda backend.

Without a GPU: the backend's bookkeeping against a fake CUDA runtime, driven
through the real Arbiter; handles through the protocol codec; clear errors
where there is no GPU. On a GPU machine (cupy installed and
cupy.cuda.is_available()): the real daemon with --backend cuda and real
tenant processes offloading into memory the daemon owns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import aqua
import aqua_protocol as p
from aqua.ctl import render_status, topology_table
from aqua.memory import open_handle
from aqua_protocol import ErrorCode, ProtocolError
from aqua_protocol import messages as m
from aquad.backends import BackendError, cuda_unavailable, make_backend
from aquad.backends import discovery as disc
from aquad.backends.cuda import GRANULE, CudaBackend, CudaSegment
from aquad.backends.discovery import Discovery, GpuInfo, GpuPolicy, PairInfo
from aquad.backends.host import HostBackend
from aquad.core.arbiter import Arbiter, Limits
from aquad.core.quotas import UNLIMITED
from aquad.core.tenants import Peer

from .conftest import wait_until

MiB = 2**20
GiB = 2**30


# --- a fake CUDA runtime ------------------------------------------------------------------


class FakeRuntime:
    """cupy.cuda.runtime's calls the backend makes, with a memory ledger."""

    def __init__(self, bus_ids: list[str], room: int = 8 * GiB) -> None:
        self.bus_ids = bus_ids
        self.device = 0
        self.room = room
        self.allocs: dict[int, tuple[int, int]] = {}  # ptr -> (ordinal, size)
        self.log: list[tuple] = []
        self._next = 0x7F0000000000

    def getDeviceCount(self) -> int:
        return len(self.bus_ids)

    def getDevice(self) -> int:
        return self.device

    def setDevice(self, device: int) -> None:
        self.device = device

    def deviceGetPCIBusId(self, device: int) -> str:
        return self.bus_ids[device]

    def malloc(self, size: int) -> int:
        used = sum(s for d, s in self.allocs.values() if d == self.device)
        if used + size > self.room:
            raise RuntimeError("cudaErrorMemoryAllocation: out of memory")
        ptr, self._next = self._next, self._next + size
        self.allocs[ptr] = (self.device, size)
        self.log.append(("malloc", self.device, size))
        return ptr

    def free(self, ptr: int) -> None:
        if ptr == 0:
            self.log.append(("init", self.device))
            return
        assert self.allocs.pop(ptr)[0] == self.device, "freed on the wrong device"
        self.log.append(("free", self.device, ptr))

    def memset(self, ptr: int, value: int, size: int) -> None:
        assert self.allocs[ptr] == (self.device, size)
        self.log.append(("memset", self.device, ptr, value))

    def deviceSynchronize(self) -> None:
        self.log.append(("sync", self.device))

    def ipcGetMemHandle(self, ptr: int) -> bytes:
        assert self.allocs[ptr][0] == self.device
        return ptr.to_bytes(8, "little") * 8


# NVML indices 0 and 1 (NVLinked); this process's CUDA lists them swapped.
NVML = Discovery([GpuInfo(0, "gpu-a", 16 * GiB, 15 * GiB, "0000:18:00.0"),
                  GpuInfo(1, "gpu-b", 16 * GiB, 15 * GiB, "0000:2a:00.0")],
                 [PairInfo(0, 1, nvlinks=4, nvlink_gbps=25.0)])
CUDA_BUS = ["0000:2A:00.0", "0000:18:00.0"]
POLICY = GpuPolicy(reserve=8 * GiB, headroom=GiB, host_pinned=16 * MiB)
ME = Peer(os.getpid(), os.getuid(), os.getgid())


class World:
    def __init__(self, tmp_path, policy: GpuPolicy = POLICY) -> None:
        self.rt = FakeRuntime(CUDA_BUS)
        self.now = 1000.0
        self.shm = tmp_path
        backend = CudaBackend.discover(policy, prefix="aqua-0123456789-", runtime=self.rt,
                                       found=NVML)
        if backend._host is not None:  # host-tier files go to the test's directory
            backend._host = HostBackend(1, policy.host_pinned, prefix="aqua-0123456789-",
                                        granule=GRANULE, shm_dir=str(tmp_path))
        self.backend = backend
        # One uid fills both GPUs here: placement, not quotas, is under test.
        self.arb = Arbiter(backend, clock=lambda: self.now, limits=Limits(quotas=UNLIMITED))

    def call(self, conn: bytes, op: m.Op, peer: Peer = ME) -> dict:
        return self.arb.handle(conn, peer, m.Request(1, op)).result

    def files(self) -> list[str]:
        """Host-tier segments (the spare files kept for grants aside)."""
        spares = self.backend._host.spares if self.backend._host else frozenset()
        return sorted(set(os.listdir(self.shm)) - spares)


@pytest.fixture
def w(tmp_path) -> World:
    return World(tmp_path)


def test_discovery_maps_nvml_ids_to_cuda_ordinals(w):
    topo = w.arb.topology
    assert [(d.id, d.backend, d.capacity) for d in topo.devices] == \
        [(0, "cuda", 7 * GiB), (1, "cuda", 7 * GiB), (2, "host", 16 * MiB)]
    assert w.backend._gpus == {0: (1, "0000:18:00.0"), 1: (0, "0000:2a:00.0")}
    # A context on every GPU before anything is measured or leased.
    assert w.rt.log[:2] == [("init", 0), ("init", 1)]


def test_a_lease_is_its_own_allocation_exported_as_an_ipc_handle(w):
    w.call(b"A", m.Hello(tenant="llama", devices=[0]))
    reply = w.call(b"A", m.Lease(nbytes=3 * MiB + 1))
    # NVLink peer first: device 1, which is CUDA ordinal 0 here.
    assert (reply["device"], reply["tier"]) == (1, "nvlink")
    handle = reply["handle"]
    assert handle["kind"] == "cuda_ipc" and handle["device"] == 1
    assert handle["pci_bus_id"] == "0000:2a:00.0" and handle["nbytes"] == 3 * MiB + 1
    assert isinstance(handle["handle"], bytes) and len(handle["handle"]) == 64
    assert w.rt.log[-1] == ("malloc", 0, 4 * MiB)  # whole 2 MiB granules
    second = w.call(b"A", m.Lease(nbytes=MiB))
    assert second["handle"]["handle"] != handle["handle"]  # never a shared chunk
    assert w.rt.device == 0 and len(w.rt.allocs) == 2


def test_release_frees_in_maintain_zeroed_first(w):
    w.call(b"A", m.Hello(tenant="llama", devices=[0]))
    lease = w.call(b"A", m.Lease(nbytes=MiB))
    (ptr,) = w.rt.allocs
    w.call(b"A", m.Release(lease=lease["lease"]))
    assert ptr in w.rt.allocs  # not on the request's path
    assert w.arb.status()["devices"][1]["leased_bytes"] == 0
    w.arb.maintain()
    assert w.rt.allocs == {}
    assert w.rt.log[-3:] == [("memset", 0, ptr, 0), ("sync", 0), ("free", 0, ptr)]


def test_host_tier_leases_are_shared_memory(w):
    w.call(b"A", m.Hello(tenant="llama", devices=[0]))
    w.call(b"A", m.Lease(nbytes=7 * GiB))  # fills GPU 1
    own = w.call(b"A", m.Lease(nbytes=7 * GiB))  # fills GPU 0, the home GPU, last
    assert (own["device"], own["tier"]) == (0, "local")
    reply = w.call(b"A", m.Lease(nbytes=MiB))
    assert (reply["device"], reply["tier"], reply["handle"]["kind"]) == (2, "host", "posix_shm")
    assert w.files() == [reply["handle"]["name"]]
    w.call(b"A", m.Release(lease=reply["lease"]))
    w.arb.maintain()
    assert w.files() == []


def test_gpu_out_of_memory_is_a_clean_refusal(w):
    w.rt.room = 2 * MiB  # the driver has less than NVML promised
    w.call(b"A", m.Hello(tenant="llama", devices=[0]))
    before = w.arb.status()
    with pytest.raises(ProtocolError) as exc:
        w.call(b"A", m.Lease(nbytes=4 * MiB))
    assert exc.value.code == ErrorCode.OUT_OF_MEMORY and "GPU 1" in exc.value.message
    assert w.arb.status() == before and w.rt.allocs == {}


def test_a_silent_tenant_that_lives_on_keeps_its_memory_until_it_exits(w):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        peer = Peer(sleeper.pid, os.getuid(), os.getgid())
        w.call(b"Z", m.Hello(tenant="frozen", devices=[0]), peer)
        w.call(b"Z", m.Lease(nbytes=MiB), peer)
        w.now += 60
        assert [t.name for t in w.arb.expire()] == ["frozen"]
        w.arb.maintain()
        assert len(w.rt.allocs) == 1  # it may still map the memory
        assert w.arb.status()["leases"] == []  # but it is no longer accounted
        sleeper.kill()
        sleeper.wait()
        w.arb.maintain()
        assert w.rt.allocs == {} and w.backend._watched == {}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dropped_tenant_that_comes_back_gets_its_new_leases_freed_normally(w):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        peer = Peer(sleeper.pid, os.getuid(), os.getgid())
        w.call(b"Z", m.Hello(tenant="frozen", devices=[0]), peer)
        w.call(b"Z", m.Lease(nbytes=MiB), peer)
        w.now += 60
        w.arb.expire()  # dropped for silence: its lease is held until it exits
        w.call(b"Y", m.Hello(tenant="back", devices=[0]), peer)  # same process again
        lease = w.call(b"Y", m.Lease(nbytes=MiB), peer)
        w.call(b"Y", m.Release(lease=lease["lease"]), peer)
        w.arb.maintain()
        assert len(w.rt.allocs) == 1  # only the old, quarantined one is left
        freed = [e for e in w.rt.log if e[0] in ("memset", "sync", "free")]
        assert [e[0] for e in freed] == ["memset", "sync", "free"]  # zeroed, waited, freed
    finally:
        sleeper.kill()
        sleeper.wait()
    w.arb.maintain()
    assert w.rt.allocs == {}


def test_a_released_lease_of_a_live_tenant_is_freed_at_once(w):
    w.call(b"A", m.Hello(tenant="llama", devices=[0]))
    w.call(b"A", m.Lease(nbytes=MiB))
    w.call(b"A", m.Bye())
    w.arb.maintain()
    assert w.rt.allocs == {}


def test_shutdown_frees_everything(w):
    w.call(b"A", m.Hello(tenant="llama", devices=[0]))
    released = w.call(b"A", m.Lease(nbytes=MiB))
    w.call(b"A", m.Release(lease=released["lease"]))  # destroyed, not yet freed
    for _ in range(2):
        w.call(b"A", m.Lease(nbytes=7 * GiB))
    assert w.call(b"A", m.Lease(nbytes=MiB))["handle"]["kind"] == "posix_shm"
    assert len(w.rt.allocs) == 3 and len(w.files()) == 1
    w.arb.shutdown()
    assert w.rt.allocs == {} and w.files() == []


def test_status_has_links_and_aquactl_draws_the_matrix(w):
    s = w.arb.status()
    assert {"schema", "daemon", "devices", "tenants", "leases", "slices"} <= set(s)
    assert s["daemon"]["backend"] == "cuda"
    nv = [l for l in s["links"] if l["tier"] == "nvlink"]
    assert nv == [{"consumer": 0, "producer": 1, "tier": "nvlink", "bandwidth_gbps": 100.0,
                   "nvlinks": 4},
                  {"consumer": 1, "producer": 0, "tier": "nvlink", "bandwidth_gbps": 100.0,
                   "nvlinks": 4}]
    text = render_status(s)
    assert "NV4" in text and "SPARE" in text
    lines = topology_table(s).splitlines()
    assert lines[2].split()[:3] == ["GPU0", "X", "NV4"]


def test_host_backend_status_has_no_links_and_no_matrix(tmp_path):
    backend = HostBackend(2, 4 * MiB, prefix="aqua-0123456789-", shm_dir=str(tmp_path))
    s = Arbiter(backend, clock=lambda: 0.0).status()
    assert s["links"] == [] and topology_table(s) == ""


def test_handles_round_trip_through_the_protocol():
    seg = CudaSegment(device=3, ordinal=1, bus_id="0000:3b:00.0", ptr=0x7F00, size=4 * MiB,
                      nbytes=3 * MiB, ipc=bytes(range(64)), owner_pid=1)
    frame = p.encode_result(7, {"lease": "L" + "a" * 22, "device": 3, "nbytes": 3 * MiB,
                                "tier": "nvlink", "handle": seg.handle})
    reply = p.decode_reply(frame)
    assert isinstance(reply, p.Reply) and reply.ok and reply.id == 7
    granted = reply.result_of(p.Lease)
    assert p.replies.handle_map(granted.handle) == seg.handle
    assert type(granted.handle.handle) is bytes  # msgpack bin, not str


def test_bad_settings_fail_discovery_clearly(tmp_path):
    from aquad.config import ConfigError

    with pytest.raises(ConfigError, match="host_pinned"):
        CudaBackend.discover(GpuPolicy(host_pinned=MiB), prefix="x", runtime=FakeRuntime(CUDA_BUS),
                             found=NVML)
    with pytest.raises(BackendError, match="share no GPU"):
        CudaBackend.discover(POLICY, prefix="x", runtime=FakeRuntime(["0000:99:00.0"]),
                             found=NVML)
    with pytest.raises(ConfigError, match="GPU"):
        CudaBackend.discover(GpuPolicy(per_gpu_reserve={5: GiB}), prefix="x",
                             runtime=FakeRuntime(CUDA_BUS), found=NVML)


def test_hidden_gpus_are_not_served_and_the_host_id_stays_put(tmp_path):
    backend = CudaBackend.discover(POLICY, prefix="x", runtime=FakeRuntime(["0000:2a:00.0"]),
                                   found=NVML)
    assert [d.id for d in backend.topology().devices] == [1, 2]
    assert backend._gpus == {1: (0, "0000:2a:00.0")}


# --- choosing the backend -----------------------------------------------------------------


def test_backend_cuda_without_a_gpu_is_refused_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(disc, "nvml_gpu_count", lambda: (0, "NVML cannot start: no driver"))
    import aquad.backends as backends

    monkeypatch.setattr(backends, "nvml_gpu_count", disc.nvml_gpu_count)
    sock = str(tmp_path / "a.sock")
    with pytest.raises(BackendError, match="--backend cuda cannot start: NVML cannot start"):
        make_backend("cuda", socket_path=sock, host_devices=(1, MiB))
    assert isinstance(make_backend("auto", socket_path=sock, host_devices=(1, MiB)),
                      HostBackend)


def test_aquad_backend_cuda_without_a_gpu_exits_with_one_line(sockdir):
    if _NO_GPU is None:
        pytest.skip("this machine has a GPU")
    out = subprocess.run([sys.executable, "-m", "aquad", "--socket",
                          os.path.join(sockdir, "c.sock"), "--backend", "cuda"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("aquad: --backend cuda cannot start")
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_cuda_handle_without_a_gpu_says_what_is_missing():
    handle = {"kind": "cuda_ipc", "device": 0, "pci_bus_id": "0000:18:00.0",
              "handle": bytes(64), "nbytes": MiB}
    if _NO_GPU is None:
        pytest.skip("this machine has a GPU")
    with pytest.raises(aqua.AquaError, match="GPU memory"):
        open_handle(handle, prefix="")
    with pytest.raises(aqua.AquaError, match="invalid cuda_ipc handle"):
        open_handle(dict(handle, handle=b"short"), prefix="")


# --- client side, without a GPU ---------------------------------------------------------


def test_host_lease_is_pinned_once_and_unpinned_before_unmap(monkeypatch, daemon):
    import aqua.cuda_memory as cm

    calls = []

    def register(address: int, nbytes: int):
        calls.append(("register", nbytes))
        return lambda: calls.append(("unregister", nbytes))

    monkeypatch.setattr(cm, "host_register", register)
    with aqua.connect("pinned", 0, socket=daemon.socket) as client:
        lease = client.lease(MiB + 1)
        assert lease.pin() and lease.pin()
        assert calls == [("register", MiB + os.sysconf("SC_PAGESIZE"))]
        lease.release()
        assert calls[-1][0] == "unregister"


class LingeringMapping:
    """A mapping that tensors keep alive past release(), as GPU leases do."""

    nbytes = MiB

    def __init__(self) -> None:
        self.callbacks = []
        self.mapped = True

    def close(self) -> bool:
        return False

    def on_closed(self, callback) -> None:
        self.callbacks.append(callback)

    def last_alias_dropped(self) -> None:
        self.mapped = False
        for callback in self.callbacks:
            callback()


def test_release_of_an_aliased_lease_goes_out_once_unmapped(monkeypatch, daemon):
    import aqua.client as client_module

    mapping = LingeringMapping()
    monkeypatch.setattr(client_module, "open_handle", lambda handle, **_: mapping)
    with aqua.connect("lingering", 0, socket=daemon.socket) as client:
        lease = client.lease(MiB)
        lease.release()
        assert lease.released and len(daemon.status()["leases"]) == 1  # still mapped
        mapping.last_alias_dropped()
        # The heartbeat thread sends it.
        assert wait_until(lambda: daemon.status()["leases"] == [], 5)
        assert client.leases == []


def test_closing_with_a_still_mapped_gpu_lease_says_no_bye(monkeypatch, daemon):
    # A bye would free memory this process still maps; the daemon must learn
    # of the departure from the connection's end instead, and quarantine
    # (free only once the process exits) what the tenant held.
    import aqua.client as client_module

    mapping = LingeringMapping()
    monkeypatch.setattr(client_module, "open_handle", lambda handle, **_: mapping)
    client = aqua.connect("lingering", 0, socket=daemon.socket)
    client.lease(MiB)
    sent = []
    encode = p.encode_request
    monkeypatch.setattr(p, "encode_request",
                        lambda rid, op: sent.append(op.op) or encode(rid, op))
    client.close()
    assert "bye" not in sent
    assert wait_until(lambda: daemon.status()["tenants"] == [], timeout=2)
    assert "lost its connection" in daemon.log()


class FakeCupy:
    """The slice of cupy an IpcMapping uses, with a switch to fail unmapping."""

    def __init__(self) -> None:
        fake = self
        self.closed: list[int] = []
        self.fail_close = False

        class Runtime:
            cudaIpcMemLazyEnablePeerAccess = 1

            def deviceGetByPCIBusId(self, bus):
                return 0

            def getDevice(self):
                return 0

            def ipcOpenMemHandle(self, raw, flags):
                return 0x1000

            def deviceSynchronize(self):
                pass

            def ipcCloseMemHandle(self, ptr):
                if fake.fail_close:
                    raise RuntimeError("cudaErrorIllegalAddress")
                fake.closed.append(ptr)

        class Device:
            def __init__(self, device):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class Cuda:
            runtime = Runtime()

        Cuda.Device = Device
        self.cuda = Cuda


def _fake_mapping(monkeypatch, fake):
    import aqua.cuda_memory as cm

    monkeypatch.setattr(cm, "_cupy", lambda: fake)
    monkeypatch.setattr(cm, "_unmap_failures", 0)
    return cm, cm.IpcMapping({"kind": "cuda_ipc", "device": 0, "pci_bus_id": "0000:18:00.0",
                              "handle": b"h" * 64, "nbytes": MiB})


def test_a_gpu_lease_is_released_only_after_it_is_unmapped(monkeypatch):
    fake = FakeCupy()
    cm, mapping = _fake_mapping(monkeypatch, fake)
    alias = mapping._owner  # what a live tensor would keep alive
    released = []
    assert mapping.close() is False  # still aliased
    mapping.on_closed(lambda: released.append(True))
    assert released == []
    del alias  # the last alias goes: unmapped, then released
    assert fake.closed == [0x1000] and released == [True]
    mapping.on_closed(lambda: released.append("late"))  # already unmapped: at once
    assert released == [True, "late"] and not cm.unmap_failed()


def test_a_gpu_lease_that_fails_to_unmap_is_never_released(monkeypatch):
    fake = FakeCupy()
    fake.fail_close = True
    cm, mapping = _fake_mapping(monkeypatch, fake)
    released = []
    mapping.on_closed(lambda: released.append(True))
    assert mapping.close() is False  # the finalizer ran, but the unmap failed
    mapping.on_closed(lambda: released.append("late"))
    assert released == [] and cm.unmap_failed()


# --- on a GPU -----------------------------------------------------------------------------


def _torch_cuda_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "this torch build has no CUDA"


_NO_GPU = cuda_unavailable()  # the daemon's own test: NVML, cupy, CUDA
needs_gpu = pytest.mark.skipif(_NO_GPU is not None, reason=str(_NO_GPU))
needs_torch_cuda = pytest.mark.skipif(
    _NO_GPU is not None or _torch_cuda_missing() is not None,
    reason=str(_NO_GPU or _torch_cuda_missing()))


def gpu_daemon(start_daemon, *args: str):
    """No host tier unless asked: on one GPU, leases then land on that GPU
    (placed last, being the tenant's own, but the only one)."""
    return start_daemon("--backend", "cuda", "--host-pinned", "0",
                        "--gpu-headroom", "512MiB", *args)


@needs_gpu
def test_gpu_lease_written_and_read_back_with_cupy(start_daemon, tenants):
    """No torch needed: the tenant writes the daemon's GPU memory with cupy."""
    daemon = gpu_daemon(start_daemon)
    assert daemon.status()["daemon"]["backend"] == "cuda"
    tenant = tenants(daemon, """
        import cupy, aqua
        client = aqua.connect(tenant="cupy", device=0)
        lease = client.lease(48 * 2**20)
        print(lease.kind, lease.device, lease.tier, flush=True)
        view = lease._mapping.array()
        with view.device:
            data = cupy.random.randint(0, 256, view.size).astype(cupy.uint8)
            view[:] = data
            cupy.cuda.runtime.deviceSynchronize()
            digest = int(data.astype(cupy.uint64).sum())
            del data, view          # the tenant's own copy is gone
            back = lease._mapping.array().copy()
            print(int(back.astype(cupy.uint64).sum()) == digest, flush=True)
            del back
        lease.release()
        print(len(client.status()["leases"]), flush=True)
        client.close()
    """)
    kind, device, tier = tenant.readline().split()
    assert kind == "cuda_ipc"
    assert tenant.readline() == "True"
    assert tenant.readline() == "0"
    assert tenant.finish()[0] == 0


OFFLOAD = """
    import torch, aqua
    client = aqua.connect(tenant="gpu", device=0)
    x = torch.randint(-2**31, 2**31 - 1, ({n},), dtype=torch.int32, device="cuda:0")
    x = x.view(torch.float32)                        # every bit pattern, NaNs included
    expect = x.cpu().view(torch.int32).clone()
    saved = client.offload(x)
    print(saved.lease.kind, saved.lease.device, saved.lease.tier, flush=True)
    del x
    torch.cuda.empty_cache()                          # the tenant's own copy is freed
    y = saved.restore()
    print(y.device, torch.equal(y.cpu().view(torch.int32), expect), flush=True)
    print(len(client.status()["leases"]), flush=True)
    client.close()
"""


@needs_torch_cuda
def test_offload_into_daemon_gpu_memory_and_restore_bit_exactly(start_daemon, tenants):
    daemon = gpu_daemon(start_daemon)
    tenant = tenants(daemon, OFFLOAD.format(n=16 * MiB))
    kind, device, tier = tenant.readline().split()
    assert kind == "cuda_ipc"
    ngpu = sum(d["backend"] == "cuda" for d in daemon.status()["devices"])
    if ngpu == 1:
        assert (device, tier) == ("0", "local")  # its own GPU, the only one
    assert tenant.readline() == "cuda:0 True"
    assert tenant.readline() == "0"
    assert tenant.finish()[0] == 0


@needs_torch_cuda
def test_host_tier_offload_is_pinned_shared_memory(start_daemon, tenants):
    # No GPU memory to lease: everything lands in the pinned host tier.
    daemon = gpu_daemon(start_daemon, "--gpu-reserve", "1024TiB", "--host-pinned", "256MiB")
    tenant = tenants(daemon, OFFLOAD.format(n=8 * MiB))
    kind, device, tier = tenant.readline().split()
    assert (kind, tier) == ("posix_shm", "host")
    assert tenant.readline() == "cuda:0 True"
    assert tenant.finish()[0] == 0


@needs_torch_cuda
def test_pager_pages_gpu_tensors_out_and_in(start_daemon, tenants):
    daemon = gpu_daemon(start_daemon)
    tenant = tenants(daemon, """
        import torch, aqua
        client = aqua.connect(tenant="pager", device=0)
        k = torch.randn(64, 1024, 256, device="cuda:0", dtype=torch.float16)
        v = torch.randn(64, 1024, 256, device="cuda:0", dtype=torch.bfloat16)[:, ::2]
        ks, vs = k.clone(), v.clone()
        pager = aqua.TensorPager(client, [k, v])
        for _ in range(3):
            pager.page_out()
            assert k.numel() == 0 and v.numel() == 0
            pager.page_in()
            assert torch.equal(k, ks) and torch.equal(v, vs)
        print("ok", pager.bytes_out == pager.bytes_in, flush=True)
        pager.close()
        client.close()
    """)
    assert tenant.readline() == "ok True"
    assert tenant.finish()[0] == 0


@needs_torch_cuda
def test_release_waits_for_live_aliases(start_daemon, tenants):
    daemon = gpu_daemon(start_daemon)
    tenant = tenants(daemon, """
        import sys, torch, aqua
        client = aqua.connect(tenant="alias", device=0)
        lease = client.lease(4 * 2**20)
        t = lease.tensor(torch.float32)
        t.fill_(1.5)
        lease.release()
        print("released", flush=True)
        sys.stdin.readline()
        print(float(t.sum()), flush=True)   # still mapped: the release waited
        del t
        print("dropped", flush=True)
        sys.stdin.readline()
    """)
    assert tenant.readline() == "released"
    assert len(daemon.status()["leases"]) == 1
    tenant.send("go")
    assert float(tenant.readline()) == 1.5 * 2**20
    assert tenant.readline() == "dropped"
    assert wait_until(lambda: daemon.status()["leases"] == [], 10)  # the heartbeat thread's
    tenant.send("bye")
    assert tenant.finish()[0] == 0


@needs_torch_cuda
def test_a_killed_tenant_frees_its_gpu_leases(start_daemon, tenants):
    daemon = gpu_daemon(start_daemon)
    tenant = tenants(daemon, """
        import time, torch, aqua
        client = aqua.connect(tenant="doomed", device=0)
        keep = [client.lease(8 * 2**20) for _ in range(3)]
        for l in keep:
            l.tensor().fill_(7)
        torch.cuda.synchronize()
        print("ready", flush=True)
        time.sleep(60)
    """)
    assert tenant.readline() == "ready"
    assert len(daemon.status()["leases"]) == 3
    tenant.proc.send_signal(signal.SIGKILL)
    assert wait_until(lambda: daemon.status()["leases"] == [], 5)
    status = daemon.status()
    assert status["leases"] == []
    assert all(d["leased_bytes"] == 0 for d in status["devices"])
