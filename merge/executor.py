"""Running a merge job: tensor by tensor, on the GPU when there is one, into an atomic checkpoint.

For each output tensor, a reader thread fetches its inputs (in their stored dtype, moved to the device)
while the previous tensor is merged (:func:`~mergescope.checkpoints.read_ahead.read_ahead`); the method's pure
function merges them in float32 (:func:`~.tensor_merge.merge_tensor`); the result is cast to the output dtype
and written in place by :class:`~mergescope.checkpoints.CheckpointWriter` in a writer thread while the next
tensor is merged, then freed. An embedding or head merged by token (``task.vocabulary``) has its inputs aligned
to the output rows: whole (:meth:`~.vocabulary_merge.RowAlignment.align`) when it is one block, else a block of
output rows at a time from each input's rows for those tokens, its fill rows computed once per tensor
(:class:`~.aligned_rows.AlignedRows`): the same bits either way.

Memory bound: at most ``prefetch + 1`` input sets are alive, plus the method's temporaries and two output
tensors (one being written): a few copies of the largest tensor, never the model. Elementwise methods and
the task-arithmetic family hold float32 copies of one block only; the family's whole-tensor trims hold a
mask per model for DELLA on a 1-D tensor only; TIES keeps two numbers per model and breadcrumbs four
(thresholds and tie cuts, found block by block by the streamed selection; sce's variance cut and arcee_fusion's
quantiles are found the same way), DARE and DELLA their density and seed (each block draws its own mask), and
an L1 rescale one factor per model, from a pass over the row blocks. Non-finite inputs stop the merge naming
the model and tensor (``allow_non_finite`` overrides); so does a cancel (between tensors). Either way the
writer removes its temporary folder: the output appears only when complete.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mergescope.checkpoints import Cancelled, CheckpointWriter, MergescopeError, TensorSpec, resolve_device
from mergescope.checkpoints.device import one_torch_thread, usable_cores
from mergescope.checkpoints.dtypes import ITEMSIZE
from mergescope.checkpoints.heap import give_back_free_memory, hold_to_budget, keep_freed_memory, release_over_budget
from mergescope.checkpoints.read_ahead import read_ahead
from mergescope.checkpoints.read_buffers import ReadBuffers
from mergescope.checkpoints.row_blocks import (
    DEFAULT_MEMORY_BUDGET,
    RUNTIME_BYTES,
    block_entries,
    parse_size,
    row_ranges,
    rows_per_block,
)
from mergescope.checkpoints.writer import DEFAULT_MAX_SHARD_BYTES

from .aligned_rows import AlignedRows, task_aligned_rows
from .chat_templates import resolve_chat_template
from .job import MergeJob, TensorTask
from .model_card import model_card
from .plan import PLAN_FILE_NAME
from .row_source import RowBlocks
from .tensor_merge import DEFAULT_SEED, merge_rows, merge_tensor, tensor_seed
from .tokenizer_files import tokenizer_outputs

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)

#: around merging a tensor this large (an embedding, a head), freed heap memory is handed back to the OS
_TRIM_AFTER = 1 << 24


class MergeCancelled(Cancelled):
    """The merge was cancelled; nothing was written."""


@dataclass
class MergeProgress:
    tensor: str  # the tensor being merged; during a first pass over its blocks "pass k (p%) · NAME"
    tensors_done: int
    tensors_total: int
    bytes_done: int  # input bytes read and merged so far
    bytes_total: int
    elapsed_s: float
    device_memory: int | None  # bytes allocated on the GPU, None on the CPU

    @property
    def throughput(self) -> float:
        return self.bytes_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.throughput
        return None if rate == 0 else (self.bytes_total - self.bytes_done) / rate


@dataclass(frozen=True)
class RowBlock:
    """Rows ``start:stop`` of one output tensor: the executor's unit of reading, merging and writing.
    ``whole``: the tensor is one unit (it fits the block size, or its method needs it whole)."""

    task: TensorTask
    start: int
    stop: int
    whole: bool


def stored_per_entry(job: MergeJob) -> int:
    """The stored bytes of one entry of every input of the widest task; an embedding or head merged by token is
    read aligned, in float32 where a row is a mean (RowAlignment.align)."""
    return max((sum(max(ITEMSIZE[job.checkpoints[ref].spec(name).dtype], 4 if task.vocabulary else 0)
                    for ref, name in task.reads) for task in job.tasks), default=4)


def block_size(job: MergeJob, prefetch: int, budget: int) -> int:
    """Entries per row block of ``job`` under ``budget`` (:func:`~mergescope.checkpoints.row_blocks.block_entries`)."""
    return block_entries(budget, bytes_per_entry(job, prefetch), stored_per_entry(job))


def bytes_per_entry(job: MergeJob, prefetch: int) -> float:
    """Host bytes the executor holds per entry of a block: the inputs in their stored dtype for every block in
    flight (``prefetch + 1`` queued, the one merging, the one writing, and two more in a first pass), float32
    working copies of every input and the method's temporaries, and the output twice (merging, writing). A
    first pass's own temporaries (an L1 rescale's |τ|, mask and product: 9 bytes an entry) fit in the float32
    copies, which it does not use; random drops are drawn, and DELLA's ranks taken, 2¹⁸ entries at a time."""
    inputs = max((len(task.reads) for task in job.tasks), default=1)
    stored = stored_per_entry(job)
    return stored * (prefetch + 5) + 4 * (inputs + 4) + 2 * max(ITEMSIZE[job.out_dtype], 4)


def plan_blocks(job: MergeJob, entries: int, tasks: list[TensorTask] | None = None) -> list[RowBlock]:
    """Every output tensor (of ``tasks``, default the job's) as row blocks of at most ``entries`` entries, in
    order. A method that is neither elementwise nor two-phase would get its large tensors whole (every method
    registered today is one or the other)."""
    method = job.method
    blockwise = method.elementwise or method.two_phase
    units = []
    for task in job.tasks if tasks is None else tasks:
        per_block = rows_per_block(task.shape, entries)
        ranges = row_ranges(task.shape[0], per_block) if task.shape else [(0, 1)]
        if len(ranges) == 1 or not blockwise:
            units.append(RowBlock(task, 0, task.shape[0] if task.shape else 1, True))
        else:
            units.extend(RowBlock(task, a, b, False) for a, b in ranges)
    return units


def run_merge(
    job: MergeJob,
    out_dir: str | Path,
    *,
    device: str | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    allow_non_finite: bool | None = None,
    on_event: Callable[[MergeProgress], None] | None = None,
    cancel: threading.Event | None = None,
    prefetch: int = 1,
    memory_budget: int | str | None = None,
) -> Path:
    """Merge ``job`` into ``out_dir`` and return it. Settings left None come from the plan's
    ``mergescope:`` block, then the defaults. ``memory_budget`` (bytes or ``"1.5GB"``) sets the row blocks'
    size (:mod:`mergescope.checkpoints.row_blocks`)."""
    import torch

    options = job.plan.options
    device = resolve_device(device or options.get("device", "auto"))
    seed = seed if seed is not None else options.get("seed", DEFAULT_SEED)
    allow_non_finite = allow_non_finite if allow_non_finite is not None else options.get("allow_non_finite", False)
    shard = max_shard_bytes or parse_size(options.get("shard_size", DEFAULT_MAX_SHARD_BYTES), "shard_size")
    budget = parse_size(memory_budget or options.get("memory_budget", DEFAULT_MEMORY_BUDGET), "memory_budget")
    per_entry = bytes_per_entry(job, prefetch)
    entries = block_size(job, prefetch, budget)
    # what a first pass may gather (TIES' entries between its brackets): what the blocks leave of the budget
    gather = max(12 * entries, int(budget - RUNTIME_BYTES - entries * per_entry))
    units = plan_blocks(job, entries)
    keep_freed_memory()
    hold_to_budget(budget)
    specs = [TensorSpec(task.output, job.out_dtype, task.shape) for task in job.tasks]
    total = job.bytes_to_read
    done = tensors_done = 0
    trims: list | None = None  # the current tensor's whole-tensor trims, for a two-phase method's blocks
    start = time.perf_counter()

    def report(tensor: str) -> None:
        """A MergeProgress of the bytes merged so far; ``tensor`` says where (a first pass names its rows)."""
        if on_event is not None:
            memory = torch.cuda.memory_allocated(device) if device.startswith("cuda") else None
            on_event(MergeProgress(tensor, tensors_done, len(job.tasks), done, total, time.perf_counter() - start,
                                   memory))

    buffers = ReadBuffers(prefetch + 3, max((len(task.reads) for task in job.tasks), default=0))
    aligning: dict[str, AlignedRows] = {}  # the reader's aligned rows of the embedding or head being read

    def read(unit: RowBlock) -> tuple[list, list | None, AlignedRows | None]:
        # stored dtype (bf16 is half of float32) while waiting; float32 only for the block being merged; into
        # reused buffers, given back once the block's output is written (the output may view its input)
        task = unit.task
        if task.vocabulary is not None and not unit.whole:  # rows by token, a block of output rows at a time
            if unit.start == 0:
                aligning.clear()
                aligning[task.output] = task_aligned_rows(job.checkpoints, task, device)  # fills: once per tensor
            aligned = aligning[task.output]
            return [aligned.rows(i, unit.start, unit.stop) for i in range(len(task.reads))], None, aligned
        taken = buffers.take()
        tensors = []
        for slot, (ref, name) in enumerate(task.reads):
            checkpoint = job.checkpoints[ref]
            spec = checkpoint.spec(name)
            rows = spec.rows if unit.whole else unit.stop - unit.start  # an input's rows may differ by token
            buffer = ReadBuffers.slot(taken, slot, rows * spec.row_numel * ITEMSIZE[spec.dtype])
            if unit.whole:
                tensors.append(checkpoint.read(name, device=device, buffer=buffer))
            else:
                tensors.append(checkpoint.read_rows(name, unit.start, unit.stop, device=device, buffer=buffer))
        if task.vocabulary is not None:
            tensors = task.vocabulary.align(tensors)  # rows by token, the whole tensor
        return tensors, taken, None

    # On the CPU each block is split across `workers` threads running one-threaded kernels: torch's own OpenMP
    # pool spins against the reader and writer threads for the cores (2 to 3x the CPU time on 2 busy cores).
    workers = usable_cores() if device == "cpu" else 1
    with CheckpointWriter(out_dir, specs, max_shard_bytes=shard, overwrite=overwrite) as writer, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergescope-write") as writing, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergescope-merge") as compute, \
            _one_torch_thread(device == "cpu"):
        pool = compute if workers > 1 else None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergescope-read") as reader, \
                _unblocked(buffers, prefetch + 3):
            written = None  # the write in flight: one output block at most, written while the next merges
            held = None  # the read buffers of the block being written
            for unit, future in read_ahead(units, read, reader, prefetch):
                if cancel is not None and cancel.is_set():
                    raise MergeCancelled(f"merge cancelled; nothing was written to {out_dir}")
                task = unit.task
                tensors, taken, aligned = future.result()
                if not allow_non_finite:
                    _check_finite(task, tensors)
                large = unit.whole and task.numel >= _TRIM_AFTER
                if large:
                    give_back_free_memory()
                if unit.whole:
                    merged = merge_tensor(job.method, task, tensors, seed=seed, device=device,
                                          out_dtype=job.out_dtype, pool=pool)
                else:
                    if unit.start == 0:
                        trims = whole_tensor_trims(job, task, entries, device, seed, gather, aligned,
                                                   on_block=lambda number, rows, of, name=task.output: report(
                                                       f"pass {number} ({rows * 100 // of}%) · {name}"))
                    row_numel = task.numel // task.shape[0]
                    merged = merge_rows(job.method, task, tensors, first_entry=unit.start * row_numel, trims=trims,
                                        seed=seed, device=device, out_dtype=job.out_dtype, pool=pool)
                if written is not None:
                    written.result()
                    if held is not None:
                        buffers.give_back(held)
                held = taken
                if unit.whole:
                    written = writing.submit(writer.write, task.output, merged)
                else:
                    written = writing.submit(writer.write_rows, task.output, unit.start, merged)
                del tensors, merged
                if large:
                    give_back_free_memory()
                else:
                    release_over_budget()
                fraction = (unit.stop - unit.start) / (task.shape[0] if task.shape else 1)
                done += int(fraction * sum(job.checkpoints[ref].spec(name).nbytes for ref, name in task.reads))
                if unit.stop == (task.shape[0] if task.shape else 1):
                    tensors_done += 1
                    trims = None
                report(task.output)
            if written is not None:
                written.result()
        _write_model_files(job, writer)
        return writer.commit()


@contextlib.contextmanager
def _one_torch_thread(cpu: bool) -> Iterator[None]:
    if not cpu:
        yield
        return
    one_torch_thread.enter()
    try:
        yield
    finally:
        one_torch_thread.exit()


@contextlib.contextmanager
def _unblocked(buffers: ReadBuffers, sets: int) -> Iterator[None]:
    """On the way out (an error, a cancel) hand the reader fresh buffer sets, so that reads already queued do not
    wait for sets nobody will give back."""
    try:
        yield
    finally:
        for _ in range(sets):
            buffers.give_back([None] * buffers.slots)


def whole_tensor_trims(job: MergeJob, task: TensorTask, entries: int, device: str, seed: int,
                       gather_bytes: int | None = None, aligned: AlignedRows | None = None,
                       on_block: Callable[[int, int, int], None] | None = None) -> list | None:
    """A block-merged tensor's whole-tensor trims: None for an elementwise method; else from the method's
    streamed passes over row blocks (the selections — TIES' and breadcrumbs' thresholds and tie cuts, sce's
    variance cut, arcee_fusion's quantiles — norms, cosines, counts; DARE's and DELLA's drops, which are data
    drawn block by block; L1 rescale factors of any trim), or, where the method cannot stream these
    parameters, from ``prepare`` on the whole inputs (DELLA on a 1-D tensor: memory as large as the tensor).
    An embedding or head merged by token is read aligned to the output rows
    (``aligned``, made here when not given). ``on_block`` hears of the passes' blocks (:class:`RowBlocks`)."""
    import torch

    method = job.method
    if method.elementwise:
        return None
    if task.vocabulary is not None and aligned is None:
        aligned = task_aligned_rows(job.checkpoints, task, device)
    options = {**task.options, "tensor_name": task.output}
    draw_seed = tensor_seed(seed, task.output) if method.random else None
    if method.stream_prepare is not None:
        # what the trim's counting pass gathers: by default 12 bytes per block entry (a float32 and an index)
        rows = rows_per_block(task.shape, entries, method.stream_align)
        source = RowBlocks(job.checkpoints, task.reads, task.shape, rows, device,
                           gather_bytes=gather_bytes or 12 * entries, aligned=aligned, on_block=on_block)
        trims = method.stream_prepare(source, task.params, options, draw_seed)
        if trims is not None:
            return trims
    with torch.no_grad():
        whole = [job.checkpoints[ref].read(name, device=device) for ref, name in task.reads]
        if task.vocabulary is not None:
            whole = task.vocabulary.align(whole)
        return method.prepare(whole[0], whole[1:], task.params, options, draw_seed)


def _check_finite(task: TensorTask, tensors: list) -> None:
    """Refuse NaN/Inf inputs. ``aminmax`` propagates NaN and keeps ±Inf, so one reduction decides it (20×
    faster than ``isfinite`` on bf16, 3× faster than ``amax`` and ``amin``); only a failing tensor is
    counted, for the message."""
    import torch

    for (ref, name), tensor in zip(task.reads, tensors):
        if tensor.numel() == 0 or not tensor.is_floating_point():
            continue
        if bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
            continue
        bad = int(torch.count_nonzero(~torch.isfinite(tensor)))
        raise MergescopeError(
            f"{ref}: tensor {name} has {bad} NaN/Inf values; a merge would spread them. "
            "Fix the model or pass --allow-non-finite"
        )


def _write_model_files(job: MergeJob, writer: CheckpointWriter) -> None:
    """config.json (adjusted), generation config, tokenizer, model card and the plan itself."""
    if job.config is not None:
        config = dict(job.config)
        torch_names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
        config["torch_dtype"] = torch_names.get(job.out_dtype, config.get("torch_dtype"))
        writer.add_text("config.json", json.dumps(config, indent=2) + "\n")
    for path in job.reference.model_files():
        if path.name == "generation_config.json":
            writer.add_file(path)
    if job.tokenizer_from is not None:
        sources = [job.checkpoints[ref].model_files() for ref in job.plan_models]
        template = resolve_chat_template(job.plan.chat_template, sources)
        texts, copies = tokenizer_outputs(job.tokenizer_from.model_files(), job.vocabulary, template)
        for path in copies:
            writer.add_file(path)
        for name, text in texts.items():
            writer.add_text(name, text)
    writer.add_text(PLAN_FILE_NAME, job.plan.to_yaml())
    writer.add_text("README.md", model_card(job.plan, list(job.checkpoints)))
