"""The small files beside the weights: ``config.json`` and the tokenizer.

These are what make a folder of tensors a model that ``transformers`` loads, and what tells two
checkpoints apart before any tensor is read: architecture, depth, vocabulary size, and a fingerprint of
the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

#: files that define a tokenizer's vocabulary; hashed for the fingerprint
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")
#: every tokenizer file a merged model should carry
TOKENIZER_FILES = VOCAB_FILES + (
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
#: non-weight files copied into a merged model
MODEL_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


@dataclass(frozen=True)
class ModelConfig:
    """What ``config.json`` says about the model, under names that are the same for every architecture."""

    architecture: str | None = None
    model_type: str | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        # multimodal configs keep the language model's numbers under text_config
        text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}

        def first_int(keys: tuple[str, ...]) -> int | None:
            for source in (raw, text):
                for key in keys:
                    if type(source.get(key)) is int:
                        return source[key]
            return None

        architectures = raw.get("architectures")
        architecture = architectures[0] if isinstance(architectures, list) and architectures else None
        model_type = raw.get("model_type") if isinstance(raw.get("model_type"), str) else None
        return cls(
            architecture=str(architecture) if architecture is not None else model_type,
            model_type=model_type,
            num_layers=first_int(_LAYER_KEYS),
            vocab_size=first_int(("vocab_size",)),
            hidden_size=first_int(_HIDDEN_KEYS),
            raw=raw,
        )


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {twice!r} appears twice")
    return dict(pairs)


#: the largest config, shard index or adapter config read (real ones are kilobytes; indexes of the largest
#: models a few MB); the safetensors library bounds its headers the same way
MAX_JSON_BYTES = 100_000_000


def read_json(path: Path, what: str) -> dict:
    """Load a JSON object from ``path``; a broken file (or a key given twice, say a tensor listed twice in a
    shard index), one over :data:`MAX_JSON_BYTES` or nested deeper than the parser goes is a one-line
    :class:`CheckpointError`, read in bounded memory."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {what} is larger than {MAX_JSON_BYTES} bytes; not a {what}")
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc})") from None
    except ValueError as exc:  # a key given twice
        raise CheckpointError(f"{path}: {what}: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return value


def read_config(folder: Path | None) -> ModelConfig:
    """The ``config.json`` of ``folder``, or an empty config when there is none."""
    if folder is None or not (folder / "config.json").is_file():
        return ModelConfig()
    return ModelConfig.from_dict(read_json(folder / "config.json", "config.json"))


def tokenizer_fingerprint(folder: Path | None) -> str | None:
    """A short hash of the files that define the vocabulary, or ``None`` when the folder has none.

    ``tokenizer.json`` holds the whole vocabulary, merges and added tokens, so when it is present it
    alone is hashed; otherwise the legacy vocabulary files and ``added_tokens.json`` are. Settings that
    do not change which ids map to which strings (``tokenizer_config.json``, chat templates) are left
    out. Two checkpoints with the same fingerprint tokenize identically.
    """
    if folder is None:
        return None
    names = ["tokenizer.json"] if (folder / "tokenizer.json").is_file() else [*VOCAB_FILES[1:], "added_tokens.json"]
    digest = hashlib.sha256()
    found = False
    for name in names:
        path = folder / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16] if found else None


def checkpoint_roots(folder: Path) -> list[Path]:
    """Where the files of the checkpoint in ``folder`` may really live: the folder itself, and in a hub cache
    snapshot (``models--org--name/snapshots/REV``) the repository's ``blobs`` folder its files link into."""
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def model_files_in(folder: Path | None) -> list[Path]:
    """The config and tokenizer files present in ``folder``, to be copied beside merged weights: regular files
    only, and only those that are inside the checkpoint (:func:`checkpoint_roots`). A file that is a link out
    of it (``tokenizer.json -> ~/.ssh/id_rsa``) is left out, so a merge never copies a file from elsewhere
    into a model that may be shared."""
    if folder is None:
        return []
    roots = checkpoint_roots(folder)
    found = [folder / name for name in MODEL_FILES if (folder / name).is_file()]
    return [path for path in found if any(path.resolve().is_relative_to(root) for root in roots)]
