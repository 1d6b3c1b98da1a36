"""Comparing embeddings and heads across vocabularies: rows matched by token string.

When a model's tokenizer differs from the base's (a chat fine-tune that added ``<|im_start|>``, a model whose
tokens sit at other ids), row i of its embedding is not row i of the base's. The analysis then compares, for
every vocabulary tensor (:func:`~mergescope.checkpoints.vocabulary.is_vocabulary_tensor`), only the **shared
tokens** — those the base and every model have — each model's row for a token against the base's row for the
same token; the statistics of those tensors count shared rows only. Each model's **added** tokens (it has, the
base lacks) and **lost** tokens (the base has, it lacks) are listed in the report.

Without ``tokenizer.json`` on the base, or when every model's vocabulary equals the base's, rows are compared by
id as before (:func:`vocabulary_comparison` returns None). A model without ``tokenizer.json`` is taken to share
the base's vocabulary (limited to its rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from mergescope.checkpoints import Checkpoint, MergescopeError
from mergescope.checkpoints.vocabulary import checkpoint_vocabulary, model_rows

#: tokens listed per model in a warning message (the report lists them all)
_SHOWN = 6


@dataclass(frozen=True)
class VocabularyComparison:
    """The shared tokens (in the base's id order), the base's row and each model's row for each, and each model's
    added and lost tokens (in id order)."""

    tokens: list[str]
    base_rows: list[int]
    model_rows: list[list[int]]
    added: dict[str, list[str]]
    lost: dict[str, list[str]]

    def to_json(self) -> dict:
        return {name: {"added": self.added[name], "lost": self.lost[name], "shared": len(self.tokens)}
                for name in self.added}

    def summary(self, name: str) -> str:
        """``added 3 (<pad>, <|im_start|>, …), lost 0`` for one model."""
        def listed(tokens: list[str]) -> str:
            shown = ", ".join(tokens[:_SHOWN]) + (", …" if len(tokens) > _SHOWN else "")
            return f"{len(tokens)} ({shown})" if tokens else "0"
        return f"added {listed(self.added[name])}, lost {listed(self.lost[name])}"


def vocabulary_comparison(base: Checkpoint, models: list[Checkpoint], names: list[str]) -> VocabularyComparison | None:
    """The by-token comparison of ``models`` with ``base`` (module docstring), None when ids can be compared."""
    try:
        base_vocabulary = checkpoint_vocabulary(base)
        vocabularies = [checkpoint_vocabulary(m) for m in models]
    except MergescopeError:
        return None  # an unreadable tokenizer: the header checks already warn about the tokenizer
    if base_vocabulary is None:
        return None
    vocabularies = [v if v is not None else base_vocabulary.limited(model_rows(m))
                    for v, m in zip(vocabularies, models)]
    if all(v.tokens == base_vocabulary.tokens for v in vocabularies):
        return None
    order = base_vocabulary.by_id()
    tokens = [t for t in order if all(t in v for v in vocabularies)]
    return VocabularyComparison(
        tokens,
        [base_vocabulary.tokens[t] for t in tokens],
        [[v.tokens[t] for t in tokens] for v in vocabularies],
        {name: [t for t in v.by_id() if t not in base_vocabulary] for name, v in zip(names, vocabularies)},
        {name: [t for t in order if t not in v] for name, v in zip(names, vocabularies)},
    )
