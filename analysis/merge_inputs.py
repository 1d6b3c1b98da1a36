"""What a merge can be warned of before it starts, without an analysis pass: the checks the headers and config
files allow (architecture, tokenizer, vocabulary size) and a sampled ``different_base`` check.

The sampled check reads a stratified sample of rows (≤ ``sample_size`` entries, the plan preview's sampling)
of up to ``MATRICES`` weight matrices spread over the model, for the reference and each model, and applies the
analysis' rule to them: a median relative change ‖θᵢ − θ₀‖/‖θ₀‖ over the sampled matrices above
:data:`~mergescope.analysis.compatibility.DIFFERENT_BASE_MEDIAN_REL`. The relative norm of a sample of rows
estimates the matrix's (each row stands for its stratum), and 0.5 sits far from both sides of the rule
(fine-tunes 0.001–0.05, unrelated models ≈ √2), so a sample decides the same way as the full pass.
"""

from __future__ import annotations

import statistics

from mergescope.checkpoints import Checkpoint

from .compatibility import DIFFERENT_BASE_MEDIAN_REL, AnalysisWarning, checkpoint_warnings
from .preview_sampling import read_rows, sample_rows

#: weight matrices sampled per model for the different-base check
MATRICES = 8
SAMPLE_SIZE = 4096


def merge_input_warnings(reference: Checkpoint, models: list[Checkpoint], names: list[str],
                         reference_name: str = "the base") -> list[AnalysisWarning]:
    """Architecture, tokenizer and vocabulary-size mismatches of ``models`` against ``reference``, and the
    models that are probably not fine-tunes of it (sampled; see the module docstring)."""
    found = [w for w in checkpoint_warnings(reference, models, names)
             if w.code in ("architecture_mismatch", "tokenizer_mismatch")]
    for model, name in zip(models, names):
        a, b = reference.config.vocab_size, model.config.vocab_size
        if a and b and a != b:
            found.append(AnalysisWarning("vocab_mismatch", name, None,
                                         f"{name} has a vocabulary of {b} tokens, {reference_name} {a}"))
        median = sampled_median_rel(reference, model)
        if median is not None and median > DIFFERENT_BASE_MEDIAN_REL:
            found.append(AnalysisWarning(
                "different_base", name, None,
                f"{name} is probably not a fine-tune of {reference_name}'s base: its median relative change of a "
                f"weight matrix is {median:.2f} (fine-tunes sit near 0.001–0.05; sampled); merging it will break "
                "the model",
            ))
    return found


def sampled_median_rel(reference: Checkpoint, model: Checkpoint) -> float | None:
    """The median over up to :data:`MATRICES` shared weight matrices of ‖θ − θ₀‖/‖θ₀‖ on a sample of rows;
    None when the two share no matrix of one shape."""
    shared = [name for name in reference.tensor_names
              if len(reference.spec(name).shape) == 2 and name in model
              and tuple(model.spec(name).shape) == tuple(reference.spec(name).shape)]
    if not shared:
        return None
    picked = [shared[i * len(shared) // min(MATRICES, len(shared))] for i in range(min(MATRICES, len(shared)))]
    values = []
    for name in picked:
        shape = tuple(reference.spec(name).shape)
        sample = sample_rows(shape, SAMPLE_SIZE, 0, name)
        if sample is None:
            theta0, theta = reference.read(name).double(), model.read(name).double()
        else:
            rows = sample[0]
            theta0, theta = read_rows(reference, name, rows).double(), read_rows(model, name, rows).double()
        norm = float(theta0.norm())
        if norm > 0:
            values.append(float((theta - theta0).norm()) / norm)
    return statistics.median(values) if values else None
