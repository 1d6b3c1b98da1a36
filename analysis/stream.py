"""One streaming pass over a base and its fine-tunes.

For each of the base's tensors, in model order, a reader thread fetches the base tensor and every model's
tensor (or a LoRA adapter's exact task vector) while the previous tensor's statistics are computed, then
everything is dropped. :func:`stream_analysis` yields :class:`TensorResult`, :class:`AnalysisWarning` and
:class:`Progress` events as it goes, so a UI can fill its tables during the pass; setting ``cancel``
stops it between tensors.

Memory bound: at most ``prefetch + 1`` tensor sets are alive — each the base tensor and every model's
tensor in their stored dtypes (a LoRA delta in float32) — plus float32 chunk buffers of
``(n + 1) × chunk`` elements, and, with ``density < 1``, one float32 copy of a task vector and n boolean
trim masks. So peak memory is about ``(prefetch + 1) · (n + 1) · B_max`` where ``B_max`` is the largest
tensor's size: it does not grow with the number of tensors.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mergescope.checkpoints import Checkpoint, layer_group, resolve_device

from .compatibility import AnalysisWarning, alignment_warning, checkpoint_warnings, non_finite_warning, shared_rows
from .sums import TaskVectorSums
from .tensor_pass import DEFAULT_CHUNK, TaskInput, tensor_sums


@dataclass
class TensorResult:
    """The sums of one tensor; ``present[i]`` is False where model i lacks it or cannot be compared."""

    name: str
    group: str
    shape: tuple[int, ...]
    sums: TaskVectorSums
    present: list[bool]
    compared_rows: int | None = None  # set when a vocabulary mismatch limited the comparison


@dataclass
class Progress:
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    elapsed_s: float
    current: str

    @property
    def eta_s(self) -> float | None:
        if not self.bytes_done:
            return None
        return self.elapsed_s * (self.bytes_total - self.bytes_done) / self.bytes_done


@dataclass
class _Loaded:
    base: object  # flat torch tensor
    inputs: list[TaskInput]
    present: list[bool]
    rows: int | None
    warnings: list[AnalysisWarning]


def stream_analysis(
    base: Checkpoint,
    models: list[Checkpoint],
    names: list[str],
    *,
    density: float = 1.0,
    device: str = "auto",
    chunk: int | None = None,
    prefetch: int = 1,
    cancel: threading.Event | None = None,
) -> Iterator[TensorResult | AnalysisWarning | Progress]:
    """Yield warnings from headers first, then per tensor its warnings, its result and a progress event."""
    import torch

    device = resolve_device(device)
    if chunk is None:
        chunk = DEFAULT_CHUNK if device == "cpu" else 1 << 24
    yield from checkpoint_warnings(base, models, names)
    tensor_names = [n for names_in_group in base.groups().values() for n in names_in_group]
    total_bytes = sum(_tensor_bytes(base, models, n) for n in tensor_names)
    uses_stored_delta = [m.base is not None and m.base.fingerprint == base.fingerprint for m in models]
    start = time.perf_counter()
    done_bytes = 0

    def load(name: str) -> _Loaded:
        spec = base.spec(name)
        base_values = base.read(name, device=device).reshape(-1)
        inputs, present, warnings, rows = [], [], [], None
        for model, model_name, stored in zip(models, names, uses_stored_delta):
            if name not in model:
                inputs.append(TaskInput(None))
                present.append(False)
                continue
            model_spec = model.spec(name)
            values, is_delta = None, False
            model_rows = None
            if model_spec.shape != spec.shape:
                model_rows = shared_rows(name, spec, model_spec, base.config.vocab_size, model.config.vocab_size)
                warnings.append(alignment_warning(name, model_name, spec, model_spec, model_rows))
                if model_rows is not None:
                    rows = model_rows if rows is None else min(rows, model_rows)
            if stored and model_spec.shape == spec.shape:
                values, is_delta = model.stored_delta(name), True
            if values is None and (model_spec.shape == spec.shape or model_rows is not None):
                values = model.read(name, device=device)
            inputs.append(TaskInput(None if values is None else values.to(device).reshape(-1), is_delta))
            present.append(values is not None)
        if rows is not None:
            # compare the shared rows only: cut the base and every other model to them as well
            width = spec.numel // spec.shape[0]
            base_values = base_values[: rows * width]
            inputs = [TaskInput(None if i.values is None else i.values[: rows * width], i.is_delta) for i in inputs]
        return _Loaded(base_values, inputs, present, rows, warnings)

    with ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="mergescope-read") as pool:
        pending: deque = deque()
        upcoming = iter(tensor_names)
        for name in upcoming:
            pending.append((name, pool.submit(load, name)))
            if len(pending) > prefetch:
                break
        index = 0
        while pending:
            if cancel is not None and cancel.is_set():
                for _, future in pending:
                    future.cancel()
                return
            name, future = pending.popleft()
            next_name = next(upcoming, None)
            if next_name is not None:
                pending.append((next_name, pool.submit(load, next_name)))
            loaded = future.result()
            yield from loaded.warnings
            masks = None
            if density < 1.0:
                masks = _trim_masks(loaded, density)
            with torch.no_grad():
                result = tensor_sums(loaded.base, loaded.inputs, trim_masks=masks, chunk=chunk)
            for count, who in zip(result.non_finite, [None, *names]):
                if count:
                    yield non_finite_warning(name, who, count)
            spec = base.spec(name)
            yield TensorResult(name, layer_group(name), spec.shape, result.sums, loaded.present, loaded.rows)
            index += 1
            done_bytes += _tensor_bytes(base, models, name)
            del loaded, masks, result
            yield Progress(index, len(tensor_names), done_bytes, total_bytes, time.perf_counter() - start, name)


def _tensor_bytes(base: Checkpoint, models: list[Checkpoint], name: str) -> int:
    return base.spec(name).nbytes + sum(m.spec(name).nbytes for m in models if name in m)


def _trim_masks(loaded: _Loaded, density: float) -> list:
    """Each task vector's top-``density`` mask by magnitude: the trim a TIES merge applies."""
    import torch

    from mergescope.merge.sparsify import magnitude_mask

    masks = []
    for item in loaded.inputs:
        if item.values is None:
            masks.append(torch.zeros_like(loaded.base, dtype=torch.bool))
            continue
        tau = item.values.float() if item.is_delta else item.values.float() - loaded.base.float()
        masks.append(magnitude_mask(torch.nan_to_num(tau, nan=0.0, posinf=0.0, neginf=0.0), density))
        del tau
    return masks
