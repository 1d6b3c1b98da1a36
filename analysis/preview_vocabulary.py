"""Preview inputs of an embedding or head merged by token (plans with tokenizer settings): the task's inputs read
whole and aligned to the output rows exactly as the executor aligns them
(:meth:`~mergescope.merge.vocabulary_merge.RowAlignment.align`), then sampled by output row when the preview
samples. The base the preview compares with is the aligned base input when the base is one of the task's inputs;
otherwise (a plan without base_model, previewed against the analysis' base) the base's own rows are placed at
its tokens' output rows and the rows of tokens it lacks are zero.

A row block of the exact preview (``rows`` a ``range``) is read as the executor reads one
(:class:`~mergescope.merge.aligned_rows.AlignedRows`: the task's fill rows computed once per tensor, then only
the block's rows gathered), with the bits of the whole-tensor alignment.
"""

from __future__ import annotations

from mergescope.checkpoints import Checkpoint, MergescopeError
from mergescope.checkpoints.vocabulary import checkpoint_vocabulary
from mergescope.merge.aligned_rows import AlignedRows, task_aligned_rows
from mergescope.merge.job import MergeJob, TensorTask
from mergescope.merge.tokenizer_settings import TokenizerSettings
from mergescope.merge.vocabulary_merge import RowAlignment, row_alignment


class AlignedInputs:
    """:func:`aligned_inputs`, keeping the row readers of the task last read by blocks (its fills computed once)."""

    def __init__(self) -> None:
        self._task: str | None = None
        self._readers: tuple[AlignedRows, AlignedRows, int] | None = None

    def __call__(self, job: MergeJob, task: TensorTask, base: Checkpoint, rows, device: str) -> tuple[list, object]:
        if not isinstance(rows, range):
            return aligned_inputs(job, task, base, rows, device)
        if self._task != task.output or self._readers is None:
            self._task, self._readers = None, None
            self._readers = _block_readers(job, task, base, device)
            self._task = task.output
        reads, base_reader, base_index = self._readers
        block = [reads.rows(i, rows.start, rows.stop) for i in range(len(task.reads))]
        base_rows = block[base_index] if base_reader is reads else base_reader.rows(0, rows.start, rows.stop)
        return block, base_rows


def aligned_inputs(job: MergeJob, task: TensorTask, base: Checkpoint, rows, device: str) -> tuple[list, object]:
    """(the task's reads aligned to the output rows, the base's aligned tensor), both restricted to ``rows``
    (output row indices) unless ``rows`` is None."""
    raw = [job.checkpoints[ref].read(name, device=device) for ref, name in task.reads]
    reads = task.vocabulary.align(raw)
    base_tensor = next((t for (ref, _), t in zip(task.reads, reads) if job.checkpoints[ref] is base), None)
    if base_tensor is None:
        base_tensor = _base_alone(job, task, base).align([base.read(task.output, device=device)])[0]
    if rows is not None:
        reads, base_tensor = [t[rows] for t in reads], base_tensor[rows]
    return reads, base_tensor


def _block_readers(job: MergeJob, task: TensorTask, base: Checkpoint,
                   device: str) -> tuple[AlignedRows, AlignedRows, int]:
    """(the task's aligned row reader, the base's, the base's index among the task's reads when it is one)."""
    reads = task_aligned_rows(job.checkpoints, task, device)
    index = next((i for i, (ref, _) in enumerate(task.reads) if job.checkpoints[ref] is base), None)
    if index is not None:
        return reads, reads, index
    return reads, AlignedRows([(base, task.output)], _base_alone(job, task, base), device), 0


def _base_alone(job: MergeJob, task: TensorTask, base: Checkpoint) -> RowAlignment:
    """The base's own rows placed at its tokens' output rows (zeros where it lacks a token)."""
    vocabulary = checkpoint_vocabulary(base)
    if vocabulary is None or job.vocabulary is None or job.plan.tokenizer is None:
        raise MergescopeError(f"{task.output}: the base {base.source} has no tokenizer.json to align its rows")
    settings = TokenizerSettings(job.plan.tokenizer.source, {}, job.plan.tokenizer.pad_to_multiple_of)
    return row_alignment(job.vocabulary, ["base"], {"base": vocabulary}, settings, None)
