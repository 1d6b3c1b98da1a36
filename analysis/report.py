"""The analysis result: per tensor, per layer group and for the whole model, in the
``mergescope.analysis/1`` JSON shape that ``mergescope analyze --json`` writes and the TUI reads.

Group and total statistics are formed from summed :class:`TaskVectorSums`, never by averaging the ratios
of their tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from mergescope.checkpoints import Cancelled, Checkpoint, MergescopeError

from .cache import AnalysisCache, cache_key
from .compatibility import AnalysisWarning, different_base_warnings
from .stream import Progress, TensorResult, stream_analysis
from .sums import TaskVectorSums
from .vocabulary_rows import vocabulary_comparison

SCHEMA = "mergescope.analysis/1"


class AnalysisCancelled(Cancelled):
    """The pass was cancelled before it finished; nothing was cached."""


def unique_names(checkpoints: list[Checkpoint]) -> list[str]:
    """Each checkpoint's short name, with ``-2``, ``-3``… added where two would collide."""
    seen: dict[str, int] = {}
    names = []
    for checkpoint in checkpoints:
        name = checkpoint.name
        count = seen.get(name, 0) + 1
        seen[name] = count
        while count > 1 and f"{name}-{count}" in seen:
            count += 1
        names.append(name if count == 1 else f"{name}-{count}")
        if count > 1:
            seen[f"{name}-{count}"] = 1
    return names


def tensor_json(result: TensorResult, names: list[str]) -> dict:
    stats = result.sums.statistics(names)
    for i, name in enumerate(names):
        if not result.present[i]:
            stats["delta"][name] = None
    absent = {name for name, present in zip(names, result.present) if not present}
    for pair in stats["pairs"]:
        if pair["a"] in absent or pair["b"] in absent:
            pair.update({key: None for key in pair if key not in ("a", "b")})
    entry = {"name": result.name, "group": result.group, "shape": list(result.shape), **stats}
    if result.compared_rows is not None:
        entry["compared_rows"] = result.compared_rows
    return entry


class ReportBuilder:
    """Collects stream events into the JSON report."""

    def __init__(self, base: Checkpoint, models: list[Checkpoint], names: list[str], density: float):
        self.base, self.models, self.names, self.density = base, models, names, density
        self.tensors: list[dict] = []
        self.group_sums: dict[str, TaskVectorSums] = {}
        self.group_tensors: dict[str, list[str]] = {}
        self.total = TaskVectorSums(len(models))
        self.warnings: list[AnalysisWarning] = []
        self._matrix_rel: dict[str, list[float]] = {name: [] for name in names}

    def add(self, event: TensorResult | AnalysisWarning | Progress) -> None:
        if isinstance(event, AnalysisWarning):
            self.warnings.append(event)
        elif isinstance(event, TensorResult):
            self.tensors.append(tensor_json(event, self.names))
            group = self.group_sums.setdefault(event.group, TaskVectorSums(len(self.models)))
            group.add(event.sums)
            self.group_tensors.setdefault(event.group, []).append(event.name)
            self.total.add(event.sums)
            if len(event.shape) == 2:
                for i, name in enumerate(self.names):
                    rel = self.tensors[-1]["delta"][name]
                    if event.present[i] and rel is not None and rel["rel"] is not None:
                        self._matrix_rel[name].append(rel["rel"])

    def report(self) -> dict:
        warnings = self.warnings + different_base_warnings(self._matrix_rel)
        comparison = vocabulary_comparison(self.base, self.models, self.names)
        return {
            "schema": SCHEMA,
            "density": self.density,
            "base": {"name": self.base.name, "source": self.base.source},
            "models": [{"name": n, "source": m.source} for n, m in zip(self.names, self.models)],
            "tensors": self.tensors,
            "groups": [
                {"name": g, "tensors": self.group_tensors[g], **self.group_sums[g].statistics(self.names)}
                for g in self.group_sums
            ],
            "total": self.total.statistics(self.names),
            "warnings": [w.to_json() for w in warnings],
            # by-token comparison across vocabularies: each model's added and lost tokens (absent when ids agree)
            **({"vocabularies": comparison.to_json()} if comparison is not None else {}),
        }


def run_analysis(
    base: Checkpoint,
    models: list[Checkpoint],
    *,
    density: float = 1.0,
    device: str = "auto",
    use_cache: bool = True,
    on_event: Callable[[TensorResult | AnalysisWarning | Progress], None] | None = None,
    cancel: threading.Event | None = None,
    chunk: int | None = None,
    prefetch: int = 2,
    memory_budget: int | str | None = None,
) -> dict:
    """Analyse ``models`` against ``base`` and return the JSON report (from the cache when possible)."""
    if not 0.0 < density <= 1.0:
        raise MergescopeError(f"--density {density}: must be in (0, 1]")
    if not models:
        raise MergescopeError("give at least one model to compare with the base")
    names = unique_names(models)
    cache = AnalysisCache() if use_cache else None
    key = cache_key(base, models, names, density)
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    builder = ReportBuilder(base, models, names, density)
    for event in stream_analysis(
        base, models, names, density=density, device=device, chunk=chunk, prefetch=prefetch, cancel=cancel,
        memory_budget=memory_budget,
    ):
        builder.add(event)
        if on_event is not None:
            on_event(event)
    if cancel is not None and cancel.is_set():
        raise AnalysisCancelled("analysis cancelled")
    report = builder.report()
    if cache is not None:
        cache.put(key, report)
    return report
