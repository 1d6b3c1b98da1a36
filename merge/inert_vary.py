"""Which ``--vary`` keys cannot change a merge, said before a search runs, with the keys that would.

mergekit looks a per-model parameter up in the model's own ``parameters`` first, then the slice's, then the
plan's: so ``parameters.density`` does nothing when every model sets its own density, and a parameter the
method ignores (``density`` in task arithmetic, ``int8_mask``) does nothing wherever it is set.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergescope.merge.methods import METHODS
from mergescope.merge.search_space import Variable


@dataclass(frozen=True)
class InertVary:
    """A ``--vary`` key that leaves every candidate the same merge."""

    key: str
    reason: str
    instead: list[str]  # keys that do act on the same parameter (may be empty)

    def message(self) -> str:
        hint = f"; vary {', '.join(self.instead)} instead" if self.instead else ""
        return f"--vary {self.key} changes nothing: {self.reason}{hint}"


def model_entries(document: dict) -> list[tuple[str, dict]]:
    """(key prefix, entry) of every model entry: ``models.i`` or ``slices.s.sources.j``."""
    if isinstance(document.get("models"), list):
        return [(f"models.{i}", e) for i, e in enumerate(document["models"]) if isinstance(e, dict)]
    found = []
    for s, piece in enumerate(document.get("slices") or []):
        for j, entry in enumerate((piece or {}).get("sources") or []):
            if isinstance(entry, dict):
                found.append((f"slices.{s}.sources.{j}", entry))
    return found


def inert_variables(document: dict, variables: list[Variable]) -> list[InertVary]:
    """The variables that cannot change the merge of ``document`` (see the module docstring)."""
    method = METHODS.get(str(document.get("merge_method")))
    if method is None:
        return []
    found = []
    for variable in variables:
        path = variable.path
        if not path or path[-2:-1] != ("parameters",):
            continue
        name = path[-1]
        spec = next((p for p in method.parameters if p.name == name), None)
        if spec is None:
            continue
        if spec.ignored:
            used = [p.name for p in method.parameters if not p.ignored]
            found.append(InertVary(variable.key, f"{method.name} ignores {name} (it uses {', '.join(used)})", []))
            continue
        if path == ("parameters", name) and spec.per_model:
            entries = model_entries(document)
            if entries and all(name in (entry.get("parameters") or {}) for _, entry in entries):
                found.append(InertVary(variable.key, f"every model sets its own {name}, which comes first",
                                       [f"{prefix}.parameters.{name}" for prefix, _ in entries]))
    return found
