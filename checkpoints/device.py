"""Choosing where tensors are computed: ``auto`` takes the GPU when there is one."""

from __future__ import annotations

import os
import threading

from .errors import MergescopeError

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)


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


class _OneTorchThread:
    """Process-wide "run torch's CPU kernels on one thread" sections that may overlap (an analysis and a
    preview in the same app): the first section to open saves torch's thread count and sets 1, the last one
    to close restores the saved count. Without the count, overlapping sections could restore each other's 1
    and leave later merges single-threaded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._saved = 1

    def enter(self) -> None:
        import torch

        with self._lock:
            if self._open == 0:
                self._saved = torch.get_num_threads()
                torch.set_num_threads(1)
            self._open += 1

    def exit(self) -> None:
        import torch

        with self._lock:
            self._open -= 1
            if self._open == 0:
                torch.set_num_threads(self._saved)


#: call ``enter()`` / ``exit()`` (in a ``finally``) around a section of one-threaded torch kernels
one_torch_thread = _OneTorchThread()


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)
