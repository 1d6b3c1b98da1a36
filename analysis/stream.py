"""One streaming pass over a base and its fine-tunes.

For each of the base's tensors, in model order, a reader thread fetches the base tensor and every model's
tensor (or a LoRA adapter's exact task vector) while the previous tensor's statistics are computed, then
everything is dropped. :func:`stream_analysis` yields :class:`TensorResult`, :class:`AnalysisWarning` and
:class:`Progress` events as it goes, so a UI can fill its tables during the pass; setting ``cancel``
stops it between tensors.

Memory bound: at most ``prefetch + 2`` tensor sets are alive (``prefetch + 1`` queued reads and the one
being computed) — each the base tensor and every model's
tensor in their stored dtypes (a LoRA delta in float32) — plus float32 chunk buffers of
``(n + 1) × chunk`` elements (and a float64 one of at most ``(n + 1) × 2¹⁶``), and, with
``density < 1``, one float32 copy of a task vector and n boolean trim masks. So peak memory is about
``(prefetch + 1) · (n + 1) · B_max`` where ``B_max`` is the largest tensor's size: it does not grow with
the number of tensors.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mergescope.checkpoints import Checkpoint, layer_group, resolve_device
from mergescope.checkpoints.device import one_torch_thread
from mergescope.checkpoints.read_ahead import read_ahead
from mergescope.checkpoints.vocabulary import is_vocabulary_tensor
from mergescope.merge.magnitude_trim import abs_task_vector
from mergescope.merge.sparsify import top_magnitude_mask

from .compatibility import AnalysisWarning, alignment_warning, checkpoint_warnings, non_finite_warning, shared_rows
from .sums import TaskVectorSums
from .tensor_pass import DEFAULT_CHUNK, TaskInput, tensor_sums
from .vocabulary_rows import vocabulary_comparison

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)


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
    buffers: list  # the read buffers the tensors above may view; given back when done


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


#: read buffers up to this size are kept for reuse whatever passes through them
_KEEP_BUFFER_BYTES = 64 << 20


class _Loader:
    """Reads one tensor of the base and of every model (the reader threads' job).

    Reads go into a fixed number of reusable buffer sets, one set per tensor in flight: fresh memory for
    every tensor would cost a page fault per 4 KiB, as much time as the copy itself. A load takes a free
    set; the consumer gives it back (:meth:`release`) once the tensor's statistics are computed.
    """

    def __init__(self, base: Checkpoint, models: list[Checkpoint], names: list[str], device: str, sets: int):
        self.base, self.models, self.names, self.device = base, models, names, device
        # a LoRA model on this very base hands over its exact task vector instead of θ
        self.stored = [m.base is not None and m.base.fingerprint == base.fingerprint for m in models]
        self.by_token = vocabulary_comparison(base, models, names)  # None: rows are compared by id
        self.free: queue.Queue = queue.Queue()
        for _ in range(sets):
            self.free.put([None] * (len(models) + 1))

    def release(self, loaded: _Loaded) -> None:
        self.free.put(loaded.buffers)

    def _read(self, checkpoint: Checkpoint, name: str, buffers: list, slot: int):
        import torch

        nbytes = checkpoint.spec(name).nbytes
        current = buffers[slot]
        # grow to fit; give back a huge buffer (an embedding's) once only small tensors pass through it
        if current is None or current.numel() < nbytes or current.numel() > max(4 * nbytes, _KEEP_BUFFER_BYTES):
            buffers[slot] = None
            buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return checkpoint.read(name, device=self.device, buffer=buffers[slot])

    def __call__(self, name: str) -> _Loaded:
        buffers = self.free.get()
        spec = self.base.spec(name)
        if self.by_token is not None and is_vocabulary_tensor(name) and len(spec.shape) == 2:
            return self._by_token(name, spec, buffers)
        base_values = self._read(self.base, name, buffers, 0).reshape(-1)
        inputs, present, warnings, rows = [], [], [], None
        for slot, (model, model_name, stored) in enumerate(zip(self.models, self.names, self.stored), 1):
            if name not in model:
                inputs.append(TaskInput(None))
                present.append(False)
                continue
            model_spec = model.spec(name)
            model_rows = None
            if model_spec.shape != spec.shape:
                model_rows = shared_rows(name, spec, model_spec, self.base.config.vocab_size, model.config.vocab_size)
                warnings.append(alignment_warning(name, model_name, spec, model_spec, model_rows))
                if model_rows is not None:
                    rows = model_rows if rows is None else min(rows, model_rows)
            values, is_delta = None, False
            if stored and model_spec.shape == spec.shape:
                values, is_delta = model.stored_delta(name), True
            if values is None and (model_spec.shape == spec.shape or model_rows is not None):
                values = self._read(model, name, buffers, slot)
            inputs.append(TaskInput(None if values is None else values.to(self.device).reshape(-1), is_delta))
            present.append(values is not None)
        if rows is not None:
            # compare the shared rows only: cut the base and every other model to them as well
            width = spec.numel // spec.shape[0]
            base_values = base_values[: rows * width]
            inputs = [TaskInput(None if i.values is None else i.values[: rows * width], i.is_delta) for i in inputs]
        return _Loaded(base_values, inputs, present, rows, warnings, buffers)


    def _by_token(self, name: str, spec, buffers: list) -> _Loaded:
        """An embedding or head across vocabularies: the shared tokens' rows of the base and of each model
        (:mod:`.vocabulary_rows`)."""
        import torch

        comparison = self.by_token
        base_values = self._read(self.base, name, buffers, 0)
        index = torch.tensor(comparison.base_rows, dtype=torch.long, device=base_values.device)
        base_values = base_values.index_select(0, index)
        inputs, present, warnings = [], [], []
        for slot, (model, model_name, rows) in enumerate(zip(self.models, self.names, comparison.model_rows), 1):
            model_spec = model.spec(name) if name in model else None
            if model_spec is None or tuple(model_spec.shape[1:]) != tuple(spec.shape[1:]):
                if model_spec is not None:
                    warnings.append(alignment_warning(name, model_name, spec, model_spec, None))
                inputs.append(TaskInput(None))
                present.append(False)
                continue
            if rows != comparison.base_rows or model_spec.shape[0] != spec.shape[0]:
                warnings.append(AnalysisWarning(
                    "vocab_mismatch", model_name, name,
                    f"{name}: {model_name} {comparison.summary(model_name)} tokens against the base; the "
                    f"{len(comparison.tokens)} shared tokens' rows are compared by token string",
                ))
            values = self._read(model, name, buffers, slot)
            values = values.index_select(0, torch.tensor(rows, dtype=torch.long, device=values.device))
            inputs.append(TaskInput(values.to(self.device).reshape(-1)))
            present.append(True)
        return _Loaded(base_values.reshape(-1), inputs, present, len(comparison.tokens), warnings, buffers)


def stream_analysis(
    base: Checkpoint,
    models: list[Checkpoint],
    names: list[str],
    *,
    density: float = 1.0,
    device: str = "auto",
    chunk: int | None = None,
    prefetch: int = 2,
    cancel: threading.Event | None = None,
    patterns: bool = False,
) -> Iterator[TensorResult | AnalysisWarning | Progress]:
    """Yield warnings from headers first, then per tensor its warnings, its result and a progress event.

    ``patterns`` keeps each tensor's sign-pattern histogram and pattern mass in ``sums.signs`` (n ≤ 8).
    """
    import torch

    device = resolve_device(device)
    if chunk is None:
        chunk = DEFAULT_CHUNK if device == "cpu" else 1 << 24
    yield from checkpoint_warnings(base, models, names)
    tensor_names = [n for group in base.groups().values() for n in group]
    total_bytes = sum(_tensor_bytes(base, models, n) for n in tensor_names)
    # On the CPU a tensor is split across `workers` threads running one-threaded kernels: torch's own
    # OpenMP pool would fight the reader thread for the cores (5x slower on a 2-core machine).
    workers = usable_cores() if device == "cpu" else 1
    if device == "cpu":
        one_torch_thread.enter()
    reader = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="mergescope-read")
    compute = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergescope-compute")
    load = _Loader(base, models, names, device, sets=prefetch + 2)
    start = time.perf_counter()
    done_tensors = done_bytes = 0
    try:
        for name, future in read_ahead(tensor_names, load, reader, prefetch):
            if cancel is not None and cancel.is_set():
                return
            loaded = future.result()
            yield from loaded.warnings
            with torch.no_grad():
                masks = _trim_masks(loaded, density, compute) if density < 1.0 else None
                result = tensor_sums(
                    loaded.base, loaded.inputs, trim_masks=masks, chunk=chunk, pool=compute, workers=workers,
                    patterns=patterns,
                )
            for count, who in zip(result.non_finite, [None, *names]):
                if count:
                    yield non_finite_warning(name, who, count)
            present, rows = loaded.present, loaded.rows
            load.release(loaded)
            del loaded, masks
            yield TensorResult(name, layer_group(name), base.spec(name).shape, result.sums, present, rows)
            done_tensors += 1
            done_bytes += _tensor_bytes(base, models, name)
            elapsed = time.perf_counter() - start
            yield Progress(done_tensors, len(tensor_names), done_bytes, total_bytes, elapsed, name)
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        compute.shutdown(wait=True, cancel_futures=True)
        if device == "cpu":
            one_torch_thread.exit()


def _tensor_bytes(base: Checkpoint, models: list[Checkpoint], name: str) -> int:
    return base.spec(name).nbytes + sum(m.spec(name).nbytes for m in models if name in m)


#: float32 bytes of |τ| the trim of one tensor may hold at once; above it the models are trimmed one by one
TRIM_MEMORY_BYTES = 256 << 20


def _trim_masks(loaded: _Loaded, density: float, pool: ThreadPoolExecutor) -> list:
    """Each task vector's top-``density`` mask by magnitude: the trim a TIES merge applies.

    Each model needs one float32 |τ| = |θ − θ₀| of the tensor (no float copy of θ₀; NaN/Inf → 0);
    the models run in parallel unless their copies together would exceed :data:`TRIM_MEMORY_BYTES`
    (an embedding or a head), so peak memory does not grow with the number of cores or models.
    """
    import torch

    def mask(item: TaskInput):
        if item.values is None:
            return torch.zeros_like(loaded.base, dtype=torch.bool)
        if item.is_delta:
            magnitude = item.values.to(torch.float32, copy=True).abs_()
        else:
            magnitude = abs_task_vector(item.values, loaded.base)  # |τ| in float32, without a float copy of θ₀
        return top_magnitude_mask(magnitude.nan_to_num_(nan=0.0, posinf=0.0), density, absolute=True)

    if 4 * loaded.base.numel() * len(loaded.inputs) > TRIM_MEMORY_BYTES:
        return [mask(item) for item in loaded.inputs]
    return list(pool.map(mask, loaded.inputs))
