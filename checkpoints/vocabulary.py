"""A checkpoint's vocabulary, read from its ``tokenizer.json``, and which tensors are indexed by it.

Rows of the embedding and the output head belong to token strings, not to ids: two models that both know
``<|im_end|>`` may store it at different rows. :class:`Vocabulary` maps each token string to its row (the
tokenizer model's vocabulary plus its added tokens), keeps the added tokens' settings (special, normalized,
strip flags) so a merged tokenizer can carry them, and is limited to the rows the model has: a token whose
id is at or past the embedding's row count has no row and is left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import CheckpointError

#: tensor names whose first axis is the vocabulary (embeddings and output heads of the common architectures)
VOCABULARY_TENSOR_SUFFIXES = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "embed_out.weight",
    "word_embeddings.weight",
)


def is_vocabulary_tensor(name: str) -> bool:
    """Whether ``name`` is an embedding or head whose rows are tokens (first axis = vocabulary)."""
    return name.endswith(VOCABULARY_TENSOR_SUFFIXES)


@dataclass(frozen=True)
class Vocabulary:
    """Token string → row, in a model's own numbering; ``added`` holds tokenizer.json's added-token entries
    (``content``, ``special``, ``normalized``, ``lstrip``, ``rstrip``, ``single_word``) by content."""

    tokens: dict[str, int]
    added: dict[str, dict] = field(default_factory=dict)
    source: str = ""
    size_in_file: int = 0  # tokens the tokenizer file names, before :meth:`limited`

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self.tokens

    def by_id(self) -> list[str]:
        """Token strings in row order."""
        return sorted(self.tokens, key=self.tokens.__getitem__)

    def limited(self, rows: int | None) -> Vocabulary:
        """The tokens whose row is below ``rows`` (a model's embedding size); all when ``rows`` is None."""
        if rows is None or all(i < rows for i in self.tokens.values()):
            return self
        tokens = {t: i for t, i in self.tokens.items() if i < rows}
        added = {t: a for t, a in self.added.items() if t in tokens}
        return Vocabulary(tokens, added, self.source, self.size_in_file)


def read_vocabulary(tokenizer_json: Path) -> Vocabulary:
    """The vocabulary of a ``tokenizer.json``: its model's vocabulary (BPE, WordPiece, WordLevel: a mapping;
    Unigram: a list of ``[piece, score]``, the row being the position) and its ``added_tokens``."""
    try:
        document = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{tokenizer_json}: cannot read the tokenizer ({exc})") from None
    model = document.get("model") if isinstance(document, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        tokens = {str(t): int(i) for t, i in vocab.items()}
    elif isinstance(vocab, list):
        tokens = {str(entry[0]): i for i, entry in enumerate(vocab)}
    else:
        raise CheckpointError(f"{tokenizer_json}: the tokenizer has no vocabulary (model.vocab)")
    added = {}
    for entry in document.get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and type(entry.get("id")) is int:
            tokens[entry["content"]] = entry["id"]
            added[entry["content"]] = {k: v for k, v in entry.items() if k != "id"}
    return Vocabulary(tokens, added, str(tokenizer_json), len(tokens))


def tokenizer_json_of(files: list[Path]) -> Path | None:
    """The ``tokenizer.json`` among a checkpoint's model files, None when it has none."""
    return next((p for p in files if p.name == "tokenizer.json"), None)


def model_rows(checkpoint: Checkpoint) -> int | None:
    """The rows a model has for tokens: its first vocabulary tensor's, else ``vocab_size`` from its config."""
    for name in checkpoint.tensor_names:
        if is_vocabulary_tensor(name) and checkpoint.spec(name).shape:
            return checkpoint.spec(name).shape[0]
    return checkpoint.config.vocab_size


def checkpoint_vocabulary(checkpoint: Checkpoint) -> Vocabulary | None:
    """The vocabulary of a checkpoint's ``tokenizer.json`` limited to its rows, None without one."""
    path = tokenizer_json_of(checkpoint.model_files())
    return read_vocabulary(path).limited(model_rows(checkpoint)) if path is not None else None
