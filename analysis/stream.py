"""One streaming pass over a base and its fine-tunes.

For each of the base's tensors, in model order, a row block at a time, a reader thread fetches the base's rows
and every model's (or a LoRA adapter's exact task vector) while the previous block's statistics are computed,
then everything is dropped; a tensor's sums are its blocks' sums. An embedding or head across vocabularies
(:mod:`.vocabulary_rows`) is compared over the shared tokens: a block of them gathers each checkpoint's rows for
those tokens (:meth:`~mergescope.checkpoints.Checkpoint.read_row_list`). :func:`stream_analysis` yields
:class:`TensorResult`, :class:`AnalysisWarning` and :class:`Progress` events as it goes, so a UI can fill its
tables during the pass; setting ``cancel`` stops it between tensors.

Memory bound: at most ``prefetch + 2`` block sets are alive (``prefetch + 1`` queued reads and the one
being computed) — each the base's rows and every model's in their stored dtypes (a LoRA delta in float32),
blocks sized from the memory budget (:mod:`mergescope.checkpoints.row_blocks`) — plus float32 chunk buffers
of ``(n + 1) × chunk`` elements (and a float64 one of at most ``(n + 1) × 2¹⁶``). With ``density < 1`` a
tensor larger than one block first gets each model's TIES cut from passes over its row blocks
(:mod:`.trim_pass`: one more block set, read into buffers reused block after block, with float32 θ₀, zeros
and |τ| per model of it, and what the cut gathers, at most 12 bytes per block entry), then each block is
trimmed by its own keep masks (n booleans per entry); the block size counts all of it, so memory stays flat
in the tensor's size.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mergescope.checkpoints import Checkpoint, layer_group, resolve_device
from mergescope.checkpoints.device import one_torch_thread, usable_cores
from mergescope.checkpoints.dtypes import ITEMSIZE
from mergescope.checkpoints.heap import hold_to_budget, release_over_budget
from mergescope.checkpoints.read_ahead import read_ahead
from mergescope.checkpoints.read_buffers import ReadBuffers
from mergescope.checkpoints.row_blocks import (
    DEFAULT_MEMORY_BUDGET,
    block_entries,
    parse_size,
    row_ranges,
    rows_per_block,
)
from mergescope.checkpoints.vocabulary import is_vocabulary_tensor

from .compatibility import AnalysisWarning, alignment_warning, checkpoint_warnings, non_finite_warning, shared_rows
from .sums import TaskVectorSums
from .tensor_pass import DEFAULT_CHUNK, TaskInput, tensor_sums
from .trim_pass import BlockTrim, MagnitudeBlocks, streamed_cuts, trim_masks
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
    buffers: list | None  # the read buffers the tensors above may view; given back when done


@dataclass
class _Layout:
    """What the headers say of one tensor: which models take part, the rows compared (all of the base's, or
    the rows shared with a grown vocabulary) and the warnings that go with it."""

    present: list[bool]
    rows: int  # rows compared
    limited: int | None  # set when a vocabulary mismatch limited the comparison
    warnings: list[AnalysisWarning]
    by_token: bool = False  # an embedding or head across vocabularies: rows are the shared tokens (vocabulary_rows)


@dataclass(frozen=True)
class RowUnit:
    """Rows ``start:stop`` of tensor ``name``: one unit of the pass; ``last`` ends the tensor."""

    name: str
    start: int
    stop: int
    last: bool


class _Loader:
    """Reads one row block of the base and of every model (the reader threads' job).

    Reads go into a fixed number of reusable buffer sets (:class:`~mergescope.checkpoints.read_buffers.ReadBuffers`),
    one set per block in flight; the consumer gives a set back (:meth:`release`) once the block's statistics
    are computed.
    """

    def __init__(self, base: Checkpoint, models: list[Checkpoint], names: list[str], device: str, sets: int):
        self.base, self.models, self.names, self.device = base, models, names, device
        # a LoRA model on this very base hands over its exact task vector instead of θ
        self.stored = [m.base is not None and m.base.fingerprint == base.fingerprint for m in models]
        self.buffers = ReadBuffers(sets, len(models) + 1)
        self.by_token = vocabulary_comparison(base, models, names)  # None: rows are compared by id

    def release(self, loaded: _Loaded) -> None:
        if loaded.buffers is not None:  # None: gathered rows, read without the buffer sets
            self.buffers.give_back(loaded.buffers)

    def layout(self, name: str) -> _Layout:
        """Which models take part in tensor ``name`` and over how many rows, from the headers."""
        spec = self.base.spec(name)
        if self.by_token is not None and is_vocabulary_tensor(name) and len(spec.shape) == 2:
            return self._by_token_layout(name, spec)
        present, warnings, limited = [], [], None
        for model, model_name in zip(self.models, self.names):
            if name not in model:
                present.append(False)
                continue
            model_spec = model.spec(name)
            if model_spec.shape == spec.shape:
                present.append(True)
                continue
            rows = shared_rows(name, spec, model_spec, self.base.config.vocab_size, model.config.vocab_size)
            warnings.append(alignment_warning(name, model_name, spec, model_spec, rows))
            if rows is not None:
                limited = rows if limited is None else min(limited, rows)
            present.append(rows is not None)
        return _Layout(present, spec.rows if limited is None else limited, limited, warnings)

    def _by_token_layout(self, name: str, spec) -> _Layout:
        """An embedding or head across vocabularies: the shared tokens' rows of the base and of each model
        (:mod:`.vocabulary_rows`) are compared, row k of the comparison being the k-th shared token."""
        comparison = self.by_token
        present, warnings = [], []
        for model, model_name, rows in zip(self.models, self.names, comparison.model_rows):
            model_spec = model.spec(name) if name in model else None
            if model_spec is None or tuple(model_spec.shape[1:]) != tuple(spec.shape[1:]):
                if model_spec is not None:
                    warnings.append(alignment_warning(name, model_name, spec, model_spec, None))
                present.append(False)
                continue
            if rows != comparison.base_rows or model_spec.shape[0] != spec.shape[0]:
                warnings.append(AnalysisWarning(
                    "vocab_mismatch", model_name, name,
                    f"{name}: {model_name} {comparison.summary(model_name)} tokens against the base; the "
                    f"{len(comparison.tokens)} shared tokens' rows are compared by token string",
                ))
            present.append(True)
        shared = len(comparison.tokens)
        return _Layout(present, shared, shared, warnings, by_token=True)

    def _by_token_block(self, unit: RowUnit, layout: _Layout) -> _Loaded:
        """Shared tokens ``start:stop`` of an embedding or head: each checkpoint's rows for them, gathered."""
        comparison, name, start, stop = self.by_token, unit.name, unit.start, unit.stop
        base_values = self.base.read_row_list(name, comparison.base_rows[start:stop], device=self.device)
        inputs = []
        for model, rows, present in zip(self.models, comparison.model_rows, layout.present):
            values = model.read_row_list(name, rows[start:stop], device=self.device) if present else None
            inputs.append(TaskInput(None if values is None else values.reshape(-1)))
        return _Loaded(base_values.reshape(-1), inputs, None)

    def _read(self, checkpoint: Checkpoint, name: str, start: int, stop: int, buffers: list, slot: int):
        spec = checkpoint.spec(name)
        buffer = ReadBuffers.slot(buffers, slot, (stop - start) * spec.row_numel * ITEMSIZE[spec.dtype])
        if not spec.shape:
            return checkpoint.read(name, device=self.device, buffer=buffer)
        return checkpoint.read_rows(name, start, stop, device=self.device, buffer=buffer)

    def __call__(self, unit: RowUnit, layout: _Layout, own: list | None = None) -> _Loaded:
        """The unit's rows; into ``own`` buffers (one slot per checkpoint, reused by the caller) instead of
        one of the sets, for a first pass while the sets are held by the reads ahead."""
        if layout.by_token:
            return self._by_token_block(unit, layout)
        buffers = own if own is not None else self.buffers.take()
        name, start, stop = unit.name, unit.start, unit.stop
        base_values = self._read(self.base, name, start, stop, buffers, 0).reshape(-1)
        inputs = []
        for slot, (model, stored, present) in enumerate(zip(self.models, self.stored, layout.present), 1):
            values, is_delta = None, False
            if present and stored and model.spec(name).shape == self.base.spec(name).shape:
                values, is_delta = model.stored_delta_rows(name, start, stop), True
            if present and values is None:
                values = self._read(model, name, start, stop, buffers, slot)
            inputs.append(TaskInput(None if values is None else values.to(self.device).reshape(-1), is_delta))
        return _Loaded(base_values, inputs, None if own is not None else buffers)


def plan_units(base: Checkpoint, names: list[str], layouts: dict[str, _Layout], entries: int) -> list[RowUnit]:
    """Every tensor as row blocks of at most ``entries`` entries over its compared rows."""
    units = []
    for name in names:
        spec = base.spec(name)
        rows = layouts[name].rows
        per_block = rows if not spec.shape else rows_per_block((rows, *spec.shape[1:]), entries)
        ranges = row_ranges(rows, max(per_block, 1))
        units.extend(RowUnit(name, a, b, k == len(ranges) - 1) for k, (a, b) in enumerate(ranges))
    return units


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
    memory_budget: int | str | None = None,
) -> Iterator[TensorResult | AnalysisWarning | Progress]:
    """Yield warnings from headers first, then per tensor its warnings, its result and a progress event.

    ``patterns`` keeps each tensor's sign-pattern histogram and pattern mass in ``sums.signs`` (n ≤ 8).
    Large tensors are read and summed a row block at a time, blocks sized from ``memory_budget``
    (:mod:`mergescope.checkpoints.row_blocks`); with ``density < 1`` a first pass over a large tensor's blocks
    finds the TIES trim of the whole tensor (:mod:`.trim_pass`).
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
    load = _Loader(base, models, names, device, sets=prefetch + 2)
    layouts = {name: load.layout(name) for name in tensor_names}
    budget = parse_size(memory_budget or DEFAULT_MEMORY_BUDGET, "memory_budget")
    stored = max((sum(ITEMSIZE[c.spec(n).dtype] for c in (base, *models) if n in c) for n in tensor_names), default=4)
    per_entry = stored * (prefetch + 2)
    if density < 1.0:  # the trim's own block set; float32 θ₀ and zeros, n |τ| (first pass); θ₀, |τ|, n masks
        per_entry += stored + 16 + 5 * len(models)
    entries = block_entries(budget, per_entry, stored)
    units = plan_units(base, tensor_names, layouts, entries)
    tensor_units: dict[str, list[RowUnit]] = {}
    for unit in units:
        tensor_units.setdefault(unit.name, []).append(unit)
    trim: BlockTrim | None = None  # the current tensor's TIES cuts, for its blocks' trim masks
    hold_to_budget(budget)
    if device == "cpu":
        one_torch_thread.enter()
    reader = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="mergescope-read")
    compute = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergescope-compute")
    start = time.perf_counter()
    done_tensors = done_bytes = 0
    total = None
    try:
        for unit, future in read_ahead(units, lambda u: load(u, layouts[u.name]), reader, prefetch):
            if cancel is not None and cancel.is_set():
                return
            name, layout = unit.name, layouts[unit.name]
            loaded = future.result()
            if unit.start == 0:
                yield from layout.warnings
            with torch.no_grad():
                masks = None
                if density < 1.0 and unit.start == 0 and unit.last:  # one block: trimmed in memory
                    masks = trim_masks(loaded.base, loaded.inputs, density, compute)
                elif density < 1.0:
                    if unit.start == 0:
                        trim = BlockTrim(_tensor_cuts(load, layout, tensor_units[name], entries, density))
                    masks = trim.masks(loaded.base, loaded.inputs, unit.start * _row_numel(base, name))
                result = tensor_sums(
                    loaded.base, loaded.inputs, trim_masks=masks, chunk=chunk, pool=compute, workers=workers,
                    patterns=patterns,
                )
            load.release(loaded)
            del loaded, masks
            release_over_budget()
            if total is None:
                total = result
            else:
                total.sums.add(result.sums)
                total.non_finite = [x + y for x, y in zip(total.non_finite, result.non_finite)]
            if not unit.last:
                continue
            for count, who in zip(total.non_finite, [None, *names]):
                if count:
                    yield non_finite_warning(name, who, count)
            yield TensorResult(name, layer_group(name), base.spec(name).shape, total.sums, layout.present,
                               layout.limited)
            total = None
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


def _row_numel(base: Checkpoint, name: str) -> int:
    return math.prod(base.spec(name).shape[1:])


def _tensor_cuts(load: _Loader, layout: _Layout, units: list[RowUnit], entries: int, density: float) -> list:
    """Each model's TIES cut over a tensor of several row blocks, from passes over them (read into buffers of
    their own, reused block after block: the sets are held by the reads ahead); what a pass gathers is capped
    at 12 bytes per block entry."""
    own: list = [None] * (len(load.models) + 1)

    def read(unit: RowUnit) -> tuple:
        loaded = load(unit, layout, own)
        return loaded.base, loaded.inputs

    source = MagnitudeBlocks(units, read, _row_numel(load.base, units[0].name), load.device, 12 * entries)
    return streamed_cuts(source, layout.present, density)
