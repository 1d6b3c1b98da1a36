"""Compatibility checks: what makes a model a poor candidate for merging with this base.

Each problem becomes an :class:`AnalysisWarning` (code, model, tensor, message) and the analysis goes on.
Codes: ``architecture_mismatch``, ``tokenizer_mismatch``, ``missing_tensor``, ``extra_tensor``,
``shape_mismatch``, ``vocab_mismatch``, ``non_finite`` and ``different_base``.

``different_base`` rule: a fine-tune moves its weights little — the relative task-vector norm
‖τ‖/‖θ₀‖ of its matrices sits near 0.001–0.05 — while two independently trained models differ by about
√2 (unrelated weights of equal norm). A model whose **median relative delta over 2-D tensors is above
0.5** is reported as not a fine-tune of this base.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from mergescope.checkpoints import Checkpoint, TensorSpec

DIFFERENT_BASE_MEDIAN_REL = 0.5
_VOCAB_HINTS = ("embed", "wte", "lm_head", "word_embeddings", "embed_out", "output.weight")


@dataclass(frozen=True)
class AnalysisWarning:
    code: str
    model: str | None
    tensor: str | None
    message: str

    def to_json(self) -> dict:
        return asdict(self)


def checkpoint_warnings(base: Checkpoint, models: list[Checkpoint], names: list[str]) -> list[AnalysisWarning]:
    """Warnings visible from headers and config files alone (no tensor read)."""
    found: list[AnalysisWarning] = []
    for model, name in zip(models, names):
        a, b = base.config.architecture, model.config.architecture
        if a and b and a != b:
            found.append(AnalysisWarning("architecture_mismatch", name, None, f"{name} is {b}, the base is {a}"))
        ta, tb = base.tokenizer_fingerprint, model.tokenizer_fingerprint
        if ta and tb and ta != tb:
            found.append(AnalysisWarning(
                "tokenizer_mismatch", name, None,
                f"{name}'s tokenizer differs from the base's (fingerprint {tb} vs {ta}): "
                "token ids may mean different things",
            ))
        for tensor in base.tensor_names:
            if tensor not in model:
                message = f"{name} has no {tensor}; its task vector there counts as 0"
                found.append(AnalysisWarning("missing_tensor", name, tensor, message))
        for tensor in model.tensor_names:
            if tensor not in base:
                message = f"{name} has {tensor}, which the base lacks; it is not analysed"
                found.append(AnalysisWarning("extra_tensor", name, tensor, message))
    return found


def shared_rows(
    tensor: str, base: TensorSpec, model: TensorSpec, base_vocab: int | None, model_vocab: int | None
) -> int | None:
    """For an embedding or output head whose vocabulary grew or shrank, the rows both have; else None.

    A 2-D tensor counts as vocabulary-indexed when its name says so (embed, wte, lm_head…) or its row
    count is a config's ``vocab_size``, and only its row count differs.
    """
    if len(base.shape) != 2 or len(model.shape) != 2 or base.shape[1:] != model.shape[1:]:
        return None
    vocabulary_indexed = (
        any(h in tensor for h in _VOCAB_HINTS) or base.shape[0] == base_vocab or model.shape[0] == model_vocab
    )
    return min(base.shape[0], model.shape[0]) if vocabulary_indexed else None


def alignment_warning(tensor: str, name: str, base: TensorSpec, model: TensorSpec, rows: int | None) -> AnalysisWarning:
    if rows is None:
        return AnalysisWarning(
            "shape_mismatch", name, tensor,
            f"{tensor}: {name} has shape {list(model.shape)}, the base {list(base.shape)}; not compared",
        )
    extra = model.shape[0] - base.shape[0]
    grew = f"{extra} extra rows (ids {base.shape[0]}–{model.shape[0] - 1})" if extra > 0 else f"{-extra} fewer rows"
    return AnalysisWarning(
        "vocab_mismatch", name, tensor,
        f"{tensor}: {name} has {model.shape[0]} rows, the base {base.shape[0]}: {grew}; "
        f"the {rows} shared rows are compared",
    )


def non_finite_warning(tensor: str, name: str | None, count: int) -> AnalysisWarning:
    who = name or "the base"
    return AnalysisWarning(
        "non_finite", name, tensor,
        f"{tensor}: {count} NaN/Inf values in {who}; they are counted as 0 in the statistics, "
        "and a merge would spread them",
    )


def different_base_warnings(rel_by_model: dict[str, list[float]]) -> list[AnalysisWarning]:
    """Models whose median relative delta over 2-D tensors exceeds the threshold (see the module docstring)."""
    found = []
    for name, values in rel_by_model.items():
        if values and (median := statistics.median(values)) > DIFFERENT_BASE_MEDIAN_REL:
            found.append(AnalysisWarning(
                "different_base", name, None,
                f"{name} is probably not a fine-tune of this base: its median relative change of a weight matrix is "
                f"{median:.2f} (fine-tunes sit near 0.001–0.05); merging it will break the model",
            ))
    return found
