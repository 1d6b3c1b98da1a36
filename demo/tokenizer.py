"""A character tokenizer: one token per character, plus ``<pad>``, ``<bos>`` and ``<eos>``.

Saved as ``vocab.json`` (token → id) and as a ``tokenizer.json`` that the ``tokenizers`` library reads as the
same tokenizer (a BPE model with no merges splits text into its characters), so mergescope's tokenizer
fingerprint and ``transformers.AutoTokenizer`` both see it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergescope.checkpoints.errors import MergescopeError

from .tasks import TASK_CHARACTERS

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = 0, 1, 2
#: the characters of every demo task
DEMO_CHARACTERS = TASK_CHARACTERS
VOCAB_FILE = "vocab.json"


@dataclass(frozen=True)
class CharTokenizer:
    """Ids 0–2 are the special tokens, then one id per character, in ``characters`` order."""

    characters: str = DEMO_CHARACTERS

    @property
    def tokens(self) -> list[str]:
        return [*SPECIAL_TOKENS, *self.characters]

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.characters)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a character outside the vocabulary is an error."""
        index = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(self.characters)}
        try:
            return [index[c] for c in text]
        except KeyError as exc:
            raise MergescopeError(f"character {exc.args[0]!r} is not in the demo vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        """The characters of ``ids`` up to the first ``<eos>``; special tokens are dropped."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIAL_TOKENS):
                out.append(self.characters[i - len(SPECIAL_TOKENS)])
        return "".join(out)

    def grown(self, extra: str) -> CharTokenizer:
        """This vocabulary with the characters of ``extra`` appended (new ids at the end)."""
        return CharTokenizer(self.characters + "".join(c for c in dict.fromkeys(extra) if c not in self.characters))

    def files(self) -> dict[str, str]:
        """The tokenizer's files, name → text: ``vocab.json``, ``tokenizer.json``, ``tokenizer_config.json`` and
        ``special_tokens_map.json``."""
        vocab = {token: i for i, token in enumerate(self.tokens)}
        special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                    "special": True}
                   for i, t in enumerate(SPECIAL_TOKENS)]
        tokenizer_json = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                      "merges": []},
        }
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
                  "pad_token": "<pad>", "model_max_length": 64}
        documents = {
            VOCAB_FILE: vocab,
            "tokenizer.json": tokenizer_json,
            "tokenizer_config.json": config,
            "special_tokens_map.json": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
        }
        return {name: json.dumps(content, indent=1, ensure_ascii=False) + "\n" for name, content in documents.items()}

    def save(self, folder: Path) -> list[Path]:
        """Write :meth:`files` into ``folder``."""
        paths = []
        for name, text in self.files().items():
            (folder / name).write_text(text, encoding="utf-8")
            paths.append(folder / name)
        return paths

    @classmethod
    def from_vocab(cls, vocab: dict, source: str = VOCAB_FILE) -> CharTokenizer:
        """Rebuild from a ``vocab.json`` mapping; a one-line error unless it is a demo character vocabulary."""
        by_id = sorted((i, t) for t, i in vocab.items() if isinstance(i, int))
        tokens = [t for _, t in by_id]
        if ([i for i, _ in by_id] != list(range(len(by_id))) or tuple(tokens[:3]) != SPECIAL_TOKENS
                or any(len(t) != 1 for t in tokens[3:])):
            raise MergescopeError(f"{source}: not a mergescope demo character vocabulary "
                                  "(<pad>, <bos>, <eos>, then single characters)")
        return cls("".join(tokens[3:]))

    @classmethod
    def load(cls, path: Path) -> CharTokenizer:
        """Read a ``vocab.json`` file."""
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MergescopeError(f"{path}: cannot read the demo vocabulary ({exc})") from None
        if not isinstance(vocab, dict):
            raise MergescopeError(f"{path}: not a mergescope demo character vocabulary")
        return cls.from_vocab(vocab, str(path))
