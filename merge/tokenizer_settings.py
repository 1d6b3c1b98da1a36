"""A plan's tokenizer settings: ``tokenizer_source:`` or the ``tokenizer:`` block (mergekit 0.1.5's schema).

```yaml
tokenizer_source: union            # or base, or a model reference
# or, with per-token control:
tokenizer:
  source: union                    # union (the default), base or a model
  pad_to_multiple_of: 64           # round the output vocabulary up; the extra rows are each model's mean row
  tokens:
    <|im_start|>: {source: ./ft-chat}                                  # that model's row for the token
    <|im_end|>: {source: {kind: model_token, model: ./ft-chat, token: "</s>"}, force: true}
    <pad>: {source: {kind: zero}}
```

A token listed under ``tokens:`` that the output vocabulary lacks is added to it. ``force: true`` gives every
model the chosen row, even models that have the token. A token without a ``source`` keeps the default rule
(mergekit 0.1.5 fails on it when some model lacks the token). Giving both ``tokenizer_source`` and
``tokenizer`` is an error, as in mergekit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .yaml_lines import LinedDict


@dataclass(frozen=True)
class TokenSource:
    """Where one token's row comes from: ``kind`` is ``model`` (``model``'s own row for the token),
    ``model_token`` (``model``'s row for ``token`` or ``token_id``) or ``zero``."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSetting:
    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    source: str  # "union", "base" or a model reference
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    @property
    def models(self) -> list[str]:
        """Model references the settings name (the source, token sources)."""
        named = [] if self.source in ("union", "base") else [self.source]
        named += [s.source.model for s in self.tokens.values() if s.source is not None and s.source.model]
        return list(dict.fromkeys(named))


def tokenizer_settings(document: LinedDict, problems) -> TokenizerSettings | None:
    """The plan's tokenizer settings, or None when it has none; problems are added with their lines."""
    source, block = document.get("tokenizer_source"), document.get("tokenizer")
    if source is not None and block is not None:
        problems.add(document.line_of("tokenizer"), "give tokenizer_source or tokenizer:, not both")
        return None
    if source is not None:
        if not isinstance(source, str) or not source.strip():
            problems.add(document.line_of("tokenizer_source"), "tokenizer_source must be union, base or a model")
            return None
        return TokenizerSettings(source.strip())
    if block is None:
        return None
    if not isinstance(block, LinedDict):
        problems.add(document.line_of("tokenizer"), "tokenizer: must be a mapping (source, tokens, pad_to_multiple_of)")
        return None
    for key in block:
        if key not in ("source", "tokens", "pad_to_multiple_of"):
            problems.add(block.line_of(key), f"unknown key {key!r} in tokenizer: (known: pad_to_multiple_of, "
                         "source, tokens)")
    block_source = block.get("source", "union")
    if not isinstance(block_source, str) or not block_source.strip():
        problems.add(block.line_of("source"), "tokenizer.source must be union, base or a model")
        block_source = "union"
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (type(pad) is not int or pad < 1):
        problems.add(block.line_of("pad_to_multiple_of"), f"pad_to_multiple_of must be a positive integer, not {pad!r}")
        pad = None
    return TokenizerSettings(block_source.strip(), _tokens(block, problems), pad)


def _tokens(block: LinedDict, problems) -> dict[str, TokenSetting]:
    tokens = block.get("tokens")
    if tokens is None:
        return {}
    if not isinstance(tokens, LinedDict):
        problems.add(block.line_of("tokens"), "tokenizer.tokens must map token strings to {source, force}")
        return {}
    settings = {}
    for token, value in tokens.items():
        line = tokens.line_of(token)
        if value is None:  # `token:` alone: the default rule (the token is added when missing)
            value = LinedDict()
            value.key_lines = {}
        if not isinstance(value, LinedDict):
            problems.add(line, f"token {token!r}: give {{source: ..., force: ...}}")
            continue
        for key in value:
            if key not in ("source", "force"):
                problems.add(value.line_of(key), f"token {token!r}: unknown key {key!r} (known: force, source)")
        force = value.get("force", False)
        if not isinstance(force, bool):
            problems.add(value.line_of("force"), f"token {token!r}: force must be true or false")
            force = False
        settings[str(token)] = TokenSetting(_token_source(str(token), value.get("source"), line, problems), force)
    return settings


def _token_source(token: str, value: object, line: int, problems) -> TokenSource | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return TokenSource("model", model=value.strip())
    if isinstance(value, LinedDict):
        kind = value.get("kind")
        if kind == "zero":
            return TokenSource("zero")
        if kind == "model_token":
            model, text, token_id = value.get("model"), value.get("token"), value.get("token_id")
            if not isinstance(model, str) or (text is None) == (token_id is None):
                problems.add(line, f"token {token!r}: model_token needs model and exactly one of token, token_id")
                return None
            if token_id is not None and (type(token_id) is not int or token_id < 0):
                problems.add(line, f"token {token!r}: token_id must be a non-negative integer")
                return None
            return TokenSource("model_token", model.strip(), None if text is None else str(text), token_id)
    problems.add(line, f"token {token!r}: source must be a model, {{kind: zero}} or "
                 "{kind: model_token, model: ..., token: ...}")
    return None
