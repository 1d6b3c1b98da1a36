"""The merged model's tokenizer files, made to agree with its vocabulary.

``tokenizer.json`` is the tokenizer the output vocabulary starts from (:class:`~.vocabulary_merge.OutputVocabulary`:
the base's, a model's), without tokens past that model's rows and with the new tokens appended to
``added_tokens`` at their ids. ``tokenizer_config.json`` is that model's, with ``added_tokens_decoder`` (when
it has one) extended the same way and the plan's chat template stored under ``chat_template``.
``special_tokens_map.json`` is that model's, or, when it has none (transformers 5 writes none), the special
tokens ``tokenizer_config.json`` names. Vocabulary files a fast tokenizer does not need once
``tokenizer.json`` is there (``vocab.json``, ``merges.txt``, ``added_tokens.json``…) are left out when the
vocabulary changed, so nothing disagrees with ``tokenizer.json``; so are chat template files when the plan
sets the template.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergescope.checkpoints import MergescopeError

from .vocabulary_merge import OutputVocabulary

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                 "additional_special_tokens")
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def tokenizer_outputs(files: list[Path], vocabulary: OutputVocabulary | None,
                      chat_template: str | None) -> tuple[dict[str, str], list[Path]]:
    """(file name → text to write, files to copy unchanged) for the tokenizer of a merged model.

    ``files`` are the tokenizer source's model files; ``vocabulary`` None keeps its vocabulary;
    ``chat_template`` None keeps its chat template."""
    by_name = {p.name: p for p in files if p.name not in ("config.json", "generation_config.json")}
    texts: dict[str, str] = {}
    changed = vocabulary is not None and bool(vocabulary.new or _stripped(vocabulary))
    if not changed and chat_template is None:
        return texts, list(by_name.values())
    if changed:
        if "tokenizer.json" not in by_name:
            raise MergescopeError("the tokenizer source has no tokenizer.json to extend")
        texts["tokenizer.json"] = _tokenizer_json(by_name.pop("tokenizer.json"), vocabulary)
        for name in ("vocab.json", "merges.txt", "vocab.txt", "added_tokens.json"):
            by_name.pop(name, None)
    config = _read(by_name.pop("tokenizer_config.json")) if "tokenizer_config.json" in by_name else None
    if config is not None or chat_template is not None:
        config = dict(config or {})
        if changed:
            _extend_decoder(config, vocabulary)
        if chat_template is not None:
            config["chat_template"] = chat_template
            for name in _TEMPLATE_FILES:
                by_name.pop(name, None)
        texts["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    if "special_tokens_map.json" not in by_name and config is not None:
        special = {k: config[k] for k in _SPECIAL_KEYS if config.get(k)}
        extra = config.get("extra_special_tokens")
        if isinstance(extra, list) and extra and "additional_special_tokens" not in special:
            special["additional_special_tokens"] = extra
        texts["special_tokens_map.json"] = json.dumps(special, indent=2, ensure_ascii=False) + "\n"
    return texts, list(by_name.values())


def _stripped(vocabulary: OutputVocabulary) -> bool:
    """Whether the source tokenizer names tokens past its model's rows (dropped from the output)."""
    return len(vocabulary.start) < vocabulary.start.size_in_file


def _read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergescopeError(f"{path}: cannot read ({exc})") from None
    if not isinstance(value, dict):
        raise MergescopeError(f"{path}: not a JSON object")
    return value


def _tokenizer_json(path: Path, vocabulary: OutputVocabulary) -> str:
    document = _read(path)
    keep = vocabulary.start.tokens
    model = document.get("model", {})
    if isinstance(model.get("vocab"), dict):
        model["vocab"] = {t: i for t, i in model["vocab"].items() if keep.get(t) == i}
        if isinstance(model.get("merges"), list):
            model["merges"] = [m for m in model["merges"] if all(p in keep for p in _merge_parts(m))]
    elif isinstance(model.get("vocab"), list):
        model["vocab"] = [entry for i, entry in enumerate(model["vocab"]) if keep.get(entry[0]) == i]
    added = [e for e in document.get("added_tokens") or [] if keep.get(e.get("content")) == e.get("id")]
    index = vocabulary.index()
    for token, settings in vocabulary.new:
        added.append({"id": index[token], "content": token, **{k: v for k, v in settings.items() if k != "id"}})
    document["added_tokens"] = added
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _merge_parts(merge) -> list[str]:
    return merge.split(" ") if isinstance(merge, str) else list(merge)


def _extend_decoder(config: dict, vocabulary: OutputVocabulary) -> None:
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        return
    keep = vocabulary.start.tokens
    decoder = {k: v for k, v in decoder.items() if isinstance(v, dict) and keep.get(v.get("content")) == int(k)}
    index = vocabulary.index()
    for token, settings in vocabulary.new:
        decoder[str(index[token])] = {"content": token, **{k: v for k, v in settings.items() if k != "id"}}
    config["added_tokens_decoder"] = decoder
