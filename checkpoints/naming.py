"""Layer groups: how tensor names gather into the rows a user reads (``model.layers.12``, ``lm_head``).

A tensor's group is its name up to and including the first path component that is an integer
(``model.layers.12.mlp.up_proj.weight`` → ``model.layers.12``, ``transformer.h.5.attn.c_attn.weight`` →
``transformer.h.5``, ``bert.encoder.layer.3.output.dense.bias`` → ``bert.encoder.layer.3``); a name with no
integer component belongs to its module path, the name without its last component
(``model.embed_tokens.weight`` → ``model.embed_tokens``, ``lm_head.weight`` → ``lm_head``). No
architecture is special-cased.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "tok_embeddings")


def layer_group(tensor_name: str) -> str:
    """The layer group of ``tensor_name`` (see the module docstring for the rule)."""
    parts = tensor_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else tensor_name


def layer_index(group: str) -> int | None:
    """The block number of a numbered group (``model.layers.12`` → 12), else ``None``."""
    last = group.rsplit(".", 1)[-1]
    return int(last) if last.isdigit() else None


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs numerically: ``layers.2`` before ``layers.10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def group_order_key(group: str) -> tuple:
    """Sort key putting groups in model order: embeddings, numbered blocks by index, then the rest.

    Numbered groups keep their prefix in the key, so an encoder-decoder's ``encoder.block.*`` and
    ``decoder.block.*`` stay apart; output heads (``lm_head``, ``*.head``) sort last.
    """
    index = layer_index(group)
    if index is not None:
        return (1, natural_key(group))
    lowered = group.lower()
    if any(hint in lowered for hint in _EMBEDDING_HINTS):
        return (0, natural_key(group))
    if "head" in lowered.rsplit(".", 1)[-1]:
        return (3, natural_key(group))
    return (2, natural_key(group))


def group_tensors(names: Iterable[str]) -> dict[str, list[str]]:
    """Map each layer group, in model order, to its tensor names in natural order."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=natural_key):
        groups.setdefault(layer_group(name), []).append(name)
    return {g: groups[g] for g in sorted(groups, key=group_order_key)}
