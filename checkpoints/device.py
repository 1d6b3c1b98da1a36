"""Choosing where tensors are computed: ``auto`` takes the GPU when there is one."""

from __future__ import annotations

from .errors import MergescopeError


def resolve_device(spec: str = "auto") -> str:
    """``auto`` → ``cuda`` when available else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are checked."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MergescopeError(f"device {spec!r}: no CUDA GPU is available here; use --device cpu or auto")
        index = spec.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise MergescopeError(f"device {spec!r}: there are {torch.cuda.device_count()} GPUs (cuda:0…)")
        return spec
    raise MergescopeError(f"device {spec!r}: use auto, cpu, cuda or cuda:N")
