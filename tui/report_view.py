"""Read the analysis report (``mergescope.analysis/1``) the way the screens need it (pure, no Textual)."""

from __future__ import annotations

from mergescope.checkpoints.naming import layer_index

BADGE_CODES = {
    "base": ("different_base",),
    "tokenizer": ("tokenizer_mismatch",),
    "vocab": ("vocab_mismatch", "shape_mismatch"),
    "arch": ("architecture_mismatch",),
}


def model_names(report: dict) -> list[str]:
    return [m["name"] for m in report.get("models", [])]


def group_rel(group: dict, name: str) -> float | None:
    delta = group.get("delta", {}).get(name)
    return None if delta is None else delta.get("rel")


def group_norm(group: dict, name: str) -> float | None:
    delta = group.get("delta", {}).get(name)
    return None if delta is None else delta.get("norm")


def pair_value(stats: dict, a: str, b: str, key: str) -> float | None:
    """``key`` (cosine, sign_conflict) of the pair (a, b) in a statistics block; 1 / 0 on the diagonal."""
    if a == b:
        return 1.0 if key == "cosine" else 0.0
    for pair in stats.get("pairs", []):
        if {pair["a"], pair["b"]} == {a, b}:
            return pair.get(key)
    return None


def badges(report: dict, name: str) -> dict[str, bool]:
    """For each compatibility check (same base, tokenizer, vocab, architecture): True when it passed."""
    codes = {w["code"] for w in report.get("warnings", []) if w.get("model") == name}
    return {badge: not (codes & set(bad)) for badge, bad in BADGE_CODES.items()}


def token_changes(report: dict, name: str) -> tuple[list[str], list[str]] | None:
    """(tokens ``name`` added, tokens it lost) against the base's vocabulary, from the report's by-token comparison;
    None when the vocabularies agree (or the report predates the comparison)."""
    entry = (report.get("vocabularies") or {}).get(name)
    return None if entry is None else (list(entry.get("added", [])), list(entry.get("lost", [])))


def warnings_of(report: dict, name: str | None = None) -> list[dict]:
    return [w for w in report.get("warnings", []) if name is None or w.get("model") == name]


def depth_profile(report: dict, name: str) -> list[float | None]:
    """Model ``name``'s relative delta norm over the numbered layer groups, in depth order."""
    return [group_rel(g, name) for g in report.get("groups", []) if layer_index(g["name"]) is not None]


def group_by_name(report: dict, group: str) -> dict | None:
    return next((g for g in report.get("groups", []) if g["name"] == group), None)


def tensors_of(report: dict, group: str | None) -> list[dict]:
    """The tensors of ``group``; every tensor when ``group`` is None."""
    return [t for t in report.get("tensors", []) if group is None or t["group"] == group]
