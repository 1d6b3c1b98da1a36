"""Preview inputs of an embedding or head merged by token (plans with tokenizer settings): the task's inputs read
whole and aligned to the output rows exactly as the executor aligns them
(:meth:`~mergescope.merge.vocabulary_merge.RowAlignment.align`), then sampled by output row when the preview
samples. The base the preview compares with is the aligned base input when the base is one of the task's inputs;
otherwise (a plan without base_model, previewed against the analysis' base) the base's own rows are placed at
its tokens' output rows and the rows of tokens it lacks are zero.
"""

from __future__ import annotations

from mergescope.checkpoints import Checkpoint, MergescopeError
from mergescope.checkpoints.vocabulary import checkpoint_vocabulary
from mergescope.merge.job import MergeJob, TensorTask
from mergescope.merge.tokenizer_settings import TokenizerSettings
from mergescope.merge.vocabulary_merge import row_alignment


def aligned_inputs(job: MergeJob, task: TensorTask, base: Checkpoint, rows, device: str) -> tuple[list, object]:
    """(the task's reads aligned to the output rows, the base's aligned tensor), both restricted to ``rows``
    (output row indices) unless ``rows`` is None."""
    raw = [job.checkpoints[ref].read(name, device=device) for ref, name in task.reads]
    reads = task.vocabulary.align(raw)
    base_tensor = next((t for (ref, _), t in zip(task.reads, reads) if job.checkpoints[ref] is base), None)
    if base_tensor is None:
        vocabulary = checkpoint_vocabulary(base)
        if vocabulary is None or job.vocabulary is None or job.plan.tokenizer is None:
            raise MergescopeError(f"{task.output}: the base {base.source} has no tokenizer.json to align its rows")
        settings = TokenizerSettings(job.plan.tokenizer.source, {}, job.plan.tokenizer.pad_to_multiple_of)
        alone = row_alignment(job.vocabulary, ["base"], {"base": vocabulary}, settings, None)
        base_tensor = alone.align([base.read(task.output, device=device)])[0]
    if rows is not None:
        reads, base_tensor = [t[rows] for t in reads], base_tensor[rows]
    return reads, base_tensor
