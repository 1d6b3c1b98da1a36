"""Preview of a merge plan: what each source would keep, per layer group, before anything is written.

For a resolved plan (:class:`~mergescope.merge.job.MergeJob`) and a base θ₀ — the plan's ``base_model``, or
the analysis' base for plans without one (linear soups) — every output tensor is merged by the executor's own
:func:`~mergescope.merge.tensor_merge.merge_tensor` (same method function, parameters, seed and output dtype, so a
preview and a merge cannot disagree), and compared with the sources: τᵢ = θᵢ − θ₀ for each source the plan
merges (matched to the job's inputs by reference; the base itself, an input of linear plans, is left out) and
τ_m = θ_merged − θ₀. Per layer group and for the whole model it reports ‖τ_m‖, ‖τᵢ‖, the retention
⟨τ_m, τᵢ⟩ / ‖τᵢ‖² and the cosine (see :mod:`.retention`).

Modes:

* ``"exact"``: whole tensors, bit for bit the merge's maths.
* ``"sampled"``: per tensor of more than ``sample_size`` entries, a deterministic stratified sample of rows
  (dim 0; the entries of a 1-D tensor): the rows are cut into r equal strata, one row drawn in each from a
  generator seeded by the tensor's name, r = ⌊sample_size / row width⌋. The method runs on the sampled rows
  (a tensor of shape ``(r, *shape[1:])``) and each sampled row counts for its stratum's length L: Σ over the
  tensor ≈ Σ over the sample of L·(…), an unbiased estimate. Smaller tensors are computed whole (exact).
  Methods that act entry by entry (linear, task_arithmetic, passthrough, nearswap, ram) and row by row keep
  their exact per-entry results, so only the estimate of the sums is approximate; methods that use
  whole-tensor statistics — TIES' and breadcrumbs' top-k thresholds, sce's variance top-k and weights,
  slerp's and the other spherical methods' norms, model_stock's cosines, ramplus_tl's overlap ratio,
  arcee_fusion's quantile threshold — see the sample's statistics instead, and random methods (DARE, DELLA)
  draw a different realisation. A :class:`SampleCache` keeps the samples, so re-previewing after a weight
  change reads nothing.

API (what the TUI uses)::

    for event in stream_preview(job, base, mode="sampled", cancel=event):   # GroupPreview, PreviewProgress,
        ...                                                                   # then one PlanPreview
    preview = run_preview(job, base, mode="exact")                           # the PlanPreview
    plan_warnings(job, analysis_report)                                      # list[str], see .plan_warnings

* :class:`GroupPreview` ``(group, merged_norm, source_norms, retention, cosine, numel, evaluated)`` — lists are
  per source, in :attr:`PlanPreview.names` order; ``None`` where the source did not change the group.
* :class:`PreviewProgress` ``(tensors_done, tensors_total, elapsed_s, current)``.
* :class:`PlanPreview` ``(names, references, mode, groups, total, skipped, elapsed_s)``; ``total`` is the
  whole model as a :class:`GroupPreview` named ``"total"``; ``skipped`` lists output tensors the base lacks
  or holds in another shape (not comparable).

Memory: at most ``prefetch + 1`` tensors' inputs at a time (in sampled mode only the sampled rows are read),
the method's temporaries, and the analysis pass' chunk buffers for the Gram sums; a :class:`SampleCache` adds
about ``sample_size`` entries per tensor and checkpoint in their stored dtype. On the CPU torch runs
one-threaded during a preview (as during an analysis) and large Gram sums are split over the cores.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from mergescope.checkpoints import Cancelled, Checkpoint, MergescopeError, layer_group, resolve_device
from mergescope.checkpoints.device import one_torch_thread
from mergescope.checkpoints.dtypes import torch_dtype
from mergescope.checkpoints.read_ahead import read_ahead
from mergescope.checkpoints.row_blocks import DEFAULT_MEMORY_BUDGET, parse_size
from mergescope.merge.executor import RowBlock, block_size, plan_blocks, whole_tensor_trims
from mergescope.merge.job import MergeJob, TensorTask
from mergescope.merge.tensor_merge import DEFAULT_SEED, merge_rows, merge_tensor

from . import preview_sampling
from .plan_warnings import plan_warnings, source_names, source_references  # noqa: F401 (plan_warnings: API)
from .preview_sampling import SampleCache, sample_gram, sample_rows
from .preview_vocabulary import AlignedInputs
from .retention import MergeGram, merge_gram_from_task_sums
from .stream import usable_cores
from .tensor_pass import TaskInput, tensor_sums

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)

DEFAULT_SAMPLE_SIZE = 1 << 14
#: methods whose result at an entry depends only on the inputs at that entry: sampling is exact per entry
ENTRYWISE_METHODS = frozenset({"linear", "task_arithmetic", "passthrough", "nearswap", "ram"})


class PreviewCancelled(Cancelled):
    """The preview was cancelled before it finished."""


@dataclass
class GroupPreview:
    """One layer group (or ``"total"``): ‖τ_m‖ and, per source, ‖τᵢ‖, retention and cosine."""

    group: str
    merged_norm: float
    source_norms: list[float]
    retention: list[float | None]
    cosine: list[float | None]
    numel: int
    evaluated: int  # entries the method ran on; == numel when exact

    @property
    def exact(self) -> bool:
        return self.evaluated == self.numel


@dataclass
class PreviewProgress:
    tensors_done: int
    tensors_total: int
    elapsed_s: float
    current: str


@dataclass
class PlanPreview:
    names: list[str]  # the sources, in plan order
    references: list[str]  # how the plan names each source
    mode: str
    groups: list[GroupPreview]
    total: GroupPreview
    skipped: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def group_preview(group: str, sums: MergeGram) -> GroupPreview:
    """The numbers a user reads from a group's (or the model's) summed Gram matrix."""
    n = sums.n
    return GroupPreview(
        group, sums.merged_norm, [sums.norm(i) for i in range(n)], [sums.retention(i) for i in range(n)],
        [sums.cosine(i) for i in range(n)], sums.numel, sums.evaluated,
    )


def whole_gram(base, vectors: list, pool, workers: int) -> MergeGram:
    """⟨vₐ − θ₀, v_b − θ₀⟩ over a whole tensor for [θ₁…θₙ, θ_m], by the analysis pass' fused Gram kernel
    (float32 blocks of 1024 summed in float64, slices on ``workers`` threads)."""
    sums = tensor_sums(base.reshape(-1), [TaskInput(v.reshape(-1)) for v in vectors], pool=pool, workers=workers).sums
    return merge_gram_from_task_sums(sums.gram, base.numel())


@dataclass
class _Layout:
    """Where each source and the base come from in each task's reads."""

    base: Checkpoint
    references: list[str]
    names: list[str]


def preview_layout(job: MergeJob, base: Checkpoint | None) -> _Layout:
    """The base to compare against and the sources (plan order, the base left out)."""
    if job.plan.slices is not None:
        raise MergescopeError(
            "a plan with slices: stacks layers, so its tensors do not line up with a base: preview needs models:"
        )
    if base is None:
        if not job.plan.base_model:
            raise MergescopeError(
                f"{job.plan.merge_method} plan without base_model: pass the base the sources were fine-tuned from"
            )
        base = job.checkpoints[job.plan.base_model]
    references = source_references(job, base)
    if not references:
        raise MergescopeError("the plan merges no model besides the base: nothing to preview")
    return _Layout(base, references, source_names(job, references))


def stream_preview(
    job: MergeJob,
    base: Checkpoint | None = None,
    *,
    mode: str = "sampled",
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    sample_seed: int = 0,
    seed: int | None = None,
    device: str = "cpu",
    cancel: threading.Event | None = None,
    cache: SampleCache | None = None,
    prefetch: int = 1,
    memory_budget: int | str | None = None,
) -> Iterator[GroupPreview | PreviewProgress | PlanPreview]:
    """Yield a :class:`GroupPreview` as each layer group completes, a :class:`PreviewProgress` per tensor and,
    unless ``cancel`` was set (checked between tensors), the :class:`PlanPreview` last. ``seed`` is the merge's
    (default: the plan's ``mergescope.seed``, else 0). The exact mode merges large tensors in the executor's row
    blocks (:func:`~mergescope.merge.executor.plan_blocks`, sized from ``memory_budget``) and adds their sums."""
    import torch

    if mode not in ("sampled", "exact"):
        raise MergescopeError(f"preview mode {mode!r}: use sampled or exact")
    layout = preview_layout(job, base)
    device = resolve_device(device)
    seed = seed if seed is not None else job.plan.options.get("seed", DEFAULT_SEED)
    comparable = [  # an embedding or head merged by token is aligned to the output rows (preview_vocabulary)
        t for t in job.tasks if t.output in layout.base
        and (t.vocabulary is not None or tuple(layout.base.spec(t.output).shape) == tuple(t.shape))
    ]
    kept = {t.output for t in comparable}
    skipped = [t.output for t in job.tasks if t.output not in kept]
    n = len(layout.references)
    loader = _Loader(job, layout, mode, sample_size, sample_seed, device, cache)
    budget = parse_size(memory_budget or DEFAULT_MEMORY_BUDGET, "memory_budget")
    entries = block_size(job, prefetch, budget)
    items = comparable if mode == "sampled" else plan_blocks(job, entries, comparable)
    trims = None
    start = time.perf_counter()
    groups: list[GroupPreview] = []
    total, current, current_group = MergeGram(n), MergeGram(n), None
    # as in the analysis pass: on the CPU torch's own thread pool would fight the reader thread (and, on a
    # busy machine, other processes) for the cores; large Gram sums are split over our own workers instead
    workers = usable_cores() if device == "cpu" else 1
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergescope-preview-read")
    compute = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergescope-preview-compute")
    if device == "cpu":
        one_torch_thread.enter()
    try:
        done = 0
        for item, future in read_ahead(items, loader, reader, prefetch):
            if cancel is not None and cancel.is_set():
                return
            task = item if isinstance(item, TensorTask) else item.task
            group = layer_group(task.output)
            if current_group is not None and group != current_group:
                groups.append(group_preview(current_group, current))
                yield groups[-1]
                current = MergeGram(n)
            current_group = group
            with torch.no_grad():
                if isinstance(item, RowBlock) and not item.whole:
                    if item.start == 0:
                        trims = whole_tensor_trims(job, task, entries, device, seed)
                    sums = _block_sums(job, item, future.result(), trims, seed, device, compute, workers)
                else:
                    sums = _task_sums(job, task, future.result(), seed, device, compute, workers)
            current.add(sums)
            total.add(sums)
            if isinstance(item, RowBlock) and item.stop < task.shape[0]:
                continue
            done += 1
            yield PreviewProgress(done, len(comparable), time.perf_counter() - start, task.output)
        if current_group is not None:
            groups.append(group_preview(current_group, current))
            yield groups[-1]
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        compute.shutdown(wait=True, cancel_futures=True)
        if device == "cpu":
            one_torch_thread.exit()
    yield PlanPreview(
        layout.names, layout.references, mode, groups, group_preview("total", total), skipped,
        time.perf_counter() - start,
    )


def run_preview(job: MergeJob, base: Checkpoint | None = None, **options) -> PlanPreview:
    """:func:`stream_preview` to the end; raises :class:`PreviewCancelled` when ``cancel`` stopped it."""
    result = None
    for event in stream_preview(job, base, **options):
        if isinstance(event, PlanPreview):
            result = event
    if result is None:
        raise PreviewCancelled("preview cancelled")
    return result


@dataclass
class _Loaded:
    """One task's inputs (``task.reads`` order) then the sources' and base's tensors; sampled or whole."""

    reads: list
    sources: list
    base: object
    rows: object = None  # sampled row indices, None when whole
    lengths: object = None  # stratum length per sampled row


class _Loader:
    """Reads one task's tensors (the reader thread's job): the executor's reads, plus any source or base the
    task does not read itself; in sampled mode keeps only the sampled rows."""

    def __init__(
        self, job: MergeJob, layout: _Layout, mode: str, sample_size: int, sample_seed: int, device: str, cache
    ):
        self.job, self.layout, self.device = job, layout, device
        self.mode, self.sample_size, self.sample_seed, self.cache = mode, sample_size, sample_seed, cache
        self.aligned = AlignedInputs()

    def __call__(self, item: TensorTask | RowBlock) -> _Loaded:
        task = item if isinstance(item, TensorTask) else item.task
        sample = None
        if self.mode == "sampled":
            sample = sample_rows(tuple(task.shape), self.sample_size, self.sample_seed, task.output)
        rows, lengths = sample if sample is not None else (None, None)
        if isinstance(item, RowBlock) and not item.whole:
            rows = range(item.start, item.stop)  # a row block of the exact mode
        if task.vocabulary is not None:  # an embedding or head merged by token: aligned as the executor does
            reads, base = self.aligned(self.job, task, self.layout.base, rows, self.device)
            return _Loaded(reads, self._sources(task, reads), base, rows, lengths)
        loaded: dict[tuple[int, str], object] = {}

        def tensor(checkpoint: Checkpoint, name: str):
            key = (id(checkpoint), name)
            if key not in loaded:
                loaded[key] = self._read(checkpoint, name, rows)
            return loaded[key]

        reads = [tensor(self.job.checkpoints[ref], name) for ref, name in task.reads]
        return _Loaded(reads, self._sources(task, reads), tensor(self.layout.base, task.output), rows, lengths)

    def _sources(self, task: TensorTask, reads: list) -> list:
        by_reference = dict(zip([ref for ref, _ in task.reads], reads))
        sources = []
        for ref in self.layout.references:
            if ref not in by_reference:
                raise MergescopeError(
                    f"{task.output}: {ref} is not among this tensor's inputs; preview needs the same models for every "
                    "tensor"
                )
            sources.append(by_reference[ref])
        return sources

    def _read(self, checkpoint: Checkpoint, name: str, rows):
        if rows is None:
            return checkpoint.read(name, device=self.device)
        if isinstance(rows, range):
            return checkpoint.read_rows(name, rows.start, rows.stop, device=self.device)
        key = (checkpoint.fingerprint, checkpoint.source, name, self.sample_size, self.sample_seed)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            return cached.clone()  # a method may work in place on its float32 inputs
        sampled = preview_sampling.read_rows(checkpoint, name, rows).to(self.device)
        if self.cache is not None:
            self.cache.put(key, sampled.clone())
        return sampled


def _block_sums(job: MergeJob, block: RowBlock, loaded: _Loaded, trims: list | None, seed: int, device: str, pool,
                workers: int) -> MergeGram:
    """Merge one row block with the executor's function and sum its Gram matrix."""
    task = block.task
    first_entry = block.start * (task.numel // task.shape[0])
    merged = merge_rows(job.method, task, loaded.reads, first_entry=first_entry, trims=trims, seed=seed,
                        device=device, out_dtype=job.out_dtype)
    merged = merged.to(torch_dtype(job.out_dtype))  # what the merge writes
    sums = whole_gram(loaded.base, [*loaded.sources, merged], pool, workers)
    sums.numel = sums.evaluated = loaded.base.numel()
    return sums


def _task_sums(
    job: MergeJob, task: TensorTask, loaded: _Loaded, seed: int, device: str, pool, workers: int
) -> MergeGram:
    """Merge one tensor (or its sample) with the executor's function and sum its Gram matrix."""
    shape = tuple(loaded.base.shape)
    run = task if loaded.rows is None else replace(task, shape=shape)
    merged = merge_tensor(job.method, run, loaded.reads, seed=seed, device=device, out_dtype=job.out_dtype)
    merged = merged.to(torch_dtype(job.out_dtype))  # what the merge writes
    vectors = [*loaded.sources, merged]
    if loaded.rows is None:
        sums = whole_gram(loaded.base, vectors, pool, workers)
    else:
        sums = sample_gram(loaded.base, vectors, loaded.lengths)
    sums.numel, sums.evaluated = task.numel, loaded.base.numel()
    return sums


__all__ = [
    "DEFAULT_SAMPLE_SIZE", "ENTRYWISE_METHODS", "GroupPreview", "PlanPreview", "PreviewCancelled", "PreviewProgress",
    "SampleCache", "group_preview", "plan_warnings", "run_preview", "sample_rows", "stream_preview", "whole_gram",
]
