"""Diagnosis of a merged model: which sources it kept, where, and what removed the rest.

For a base θ₀, sources θ₁…θₙ and the merged model θ_m — a folder written by ``mergescope merge`` (its
``mergekit_config.yml`` names the rest), or any merged checkpoint given with its base and sources — one
analysis pass (:func:`~.stream.stream_analysis` over ``[θ₁…θₙ, θ_m]``, with sign patterns kept) gives, per
layer group and for the whole model, with τᵢ = θᵢ − θ₀ and τ_m = θ_m − θ₀:

* **retention** ⟨τ_m, τᵢ⟩ / ‖τᵢ‖² and **cosine** (see :mod:`.retention`), from the pass' Gram matrix;
* **where signs removed a source**, measured in *squared magnitude* (each entry of τᵢ weighs τᵢ², so the
  small entries a trim drops count for little, unlike a count of entries), from the sign-pattern mass
  M[p, i] = Σ τᵢ² over the entries whose signs (s₁…sₙ, s_m) form pattern p:

  - ``lost``: share of ‖τᵢ‖² at entries where τᵢ ≠ 0 and sign(τ_m) ≠ sign(τᵢ) — the merge zeroed or reversed it;
  - ``reversed``: the part of ``lost`` where sign(τ_m) = −sign(τᵢ);
  - ``conflict``: the part of ``lost`` where at least one other source j has sign(τⱼ) = −sign(τᵢ) — removed
    by a sign conflict — and ``conflict_with[j]``, the part where source j in particular opposes it (an entry
    opposed by two sources counts for both);
  - ``trimmed``: ``lost − conflict``, removed where no other source disagreed: a trim (density), a random
    drop, or — in a bf16 merge — a change below bf16's resolution.

  They need n + 1 ≤ 8 (the pass' exact pattern histogram); with more sources they are None.

The merge's parameters (weight, density per source and layer group, normalize) come from the plan when there
is one, to name the cause in the summary (:mod:`.diagnosis_summary`).

API::

    diagnosis = diagnose_merged_folder("merged/", base=None, on_event=callback, cancel=event)
    diagnosis = diagnose(base, sources, merged, context=PlanContext(...))
    for event in stream_diagnosis(base, sources, merged, ...): ...   # AnalysisWarning, Progress,
                                                                      # GroupDiagnosis, then the Diagnosis

* :class:`~.diagnosis_groups.SourceEffect` — one source in one group: ``norm``, ``retention``, ``cosine``, ``lost``,
  ``reversed``, ``conflict``, ``trimmed``, ``conflict_with`` (name → share), ``weight``, ``density``.
* :class:`~.diagnosis_groups.GroupDiagnosis` ``(group, numel, merged_norm, sources: list[SourceEffect])``.
* :class:`Diagnosis` ``(names, references, base, merged, method, groups, total, findings, summary, warnings)``;
  ``findings`` are :class:`~.diagnosis_summary.Finding` (a source, a run of groups keeping < 1/3, the cause);
  ``summary`` the plain-words sentences; :meth:`Diagnosis.to_json` the ``mergescope.diagnosis/2`` document.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from mergescope.checkpoints import Checkpoint, MergescopeError, open_checkpoint

from .compatibility import AnalysisWarning
from .diagnosis_context import PlanContext, plan_context_for_folder
from .diagnosis_groups import GroupDiagnosis, SourceEffect, group_diagnosis
from .diagnosis_summary import Finding, summarize
from .loss_parts import PARTS
from .report import AnalysisCancelled, unique_names
from .stream import Progress, TensorResult, stream_analysis
from .sums import TaskVectorSums

SCHEMA = "mergescope.diagnosis/2"


@dataclass
class Diagnosis:
    names: list[str]
    references: list[str]  # how the plan (or the caller) named each source
    base: str
    merged: str
    method: str | None
    groups: list[GroupDiagnosis]
    total: GroupDiagnosis
    findings: list[Finding]
    summary: list[str]
    warnings: list[str]

    def to_json(self) -> dict:
        """The ``mergescope.diagnosis/2`` document (plain JSON types; None for undefined ratios)."""
        return {
            "schema": SCHEMA,
            "base": self.base,
            "merged": self.merged,
            "method": self.method,
            "sources": [{"name": n, "reference": r} for n, r in zip(self.names, self.references)],
            "groups": [_group_json(g, self.names) for g in self.groups],
            "total": _group_json(self.total, self.names),
            "findings": [asdict(f) for f in self.findings],
            "summary": self.summary,
            "warnings": self.warnings,
        }


def _effect_json(effect: SourceEffect, names: list[str]) -> dict:
    document = {k: v for k, v in asdict(effect).items() if k != "parts"}
    parts = effect.parts
    document["loss_parts"] = None if parts is None else {
        **{p: getattr(parts, p) for p in PARTS},
        "reversed_by": {names[j]: share for j, share in parts.against.items()},
        "ratio": {names[j]: ratio for j, ratio in parts.ratio.items()},
    }
    return document


def _group_json(group: GroupDiagnosis, names: list[str]) -> dict:
    return {
        "name": group.group, "numel": group.numel, "merged_norm": group.merged_norm,
        "sources": {name: _effect_json(effect, names) for name, effect in zip(names, group.sources)},
    }


def stream_diagnosis(
    base: Checkpoint,
    sources: list[Checkpoint],
    merged: Checkpoint,
    *,
    names: list[str] | None = None,
    references: list[str] | None = None,
    context: PlanContext | None = None,
    device: str = "auto",
    cancel: threading.Event | None = None,
    memory_budget: int | str | None = None,
) -> Iterator[AnalysisWarning | Progress | GroupDiagnosis | Diagnosis]:
    """Yield the pass' warnings and progress, a :class:`GroupDiagnosis` as each layer group completes and,
    unless ``cancel`` stopped the pass (between tensors), the :class:`Diagnosis` last."""
    if not sources:
        raise MergescopeError("a diagnosis needs at least one source model besides the base")
    names = names or unique_names(sources)
    references = references or [s.source for s in sources]
    merged_name = unique_names([*sources, merged])[-1]
    n = len(sources)
    groups: list[GroupDiagnosis] = []
    warnings: list[AnalysisWarning] = []
    total, current, current_group = TaskVectorSums(n + 1), TaskVectorSums(n + 1), None
    events = stream_analysis(
        base, [*sources, merged], [*names, merged_name], device=device, cancel=cancel, patterns=True,
        memory_budget=memory_budget,
    )
    for event in events:
        if isinstance(event, TensorResult):
            if current_group is not None and event.group != current_group:
                groups.append(group_diagnosis(current_group, current, names, context))
                yield groups[-1]
                current = TaskVectorSums(n + 1)
            current_group = event.group
            current.add(event.sums)
            total.add(event.sums)
            continue
        if isinstance(event, AnalysisWarning):
            warnings.append(event)
        yield event
    if cancel is not None and cancel.is_set():
        return
    if current_group is not None:
        groups.append(group_diagnosis(current_group, current, names, context))
        yield groups[-1]
    whole = group_diagnosis("total", total, names, context)
    findings, summary = summarize(groups, whole, names, context)
    lines = [w.message for w in warnings] + (context.warnings if context is not None else [])
    yield Diagnosis(
        names, references, base.source, merged.source, context.method if context else None, groups, whole,
        findings, summary, lines,
    )


def diagnose(
    base: Checkpoint,
    sources: list[Checkpoint],
    merged: Checkpoint,
    *,
    on_event: Callable[[object], None] | None = None,
    **options,
) -> Diagnosis:
    """:func:`stream_diagnosis` to the end; raises :class:`~.report.AnalysisCancelled` when cancelled."""
    result = None
    for event in stream_diagnosis(base, sources, merged, **options):
        if on_event is not None:
            on_event(event)
        if isinstance(event, Diagnosis):
            result = event
    if result is None:
        raise AnalysisCancelled("diagnosis cancelled")
    return result


def diagnose_merged_folder(
    path: str | Path,
    *,
    base: str | Checkpoint | None = None,
    device: str = "auto",
    cancel: threading.Event | None = None,
    on_event: Callable[[object], None] | None = None,
    memory_budget: int | str | None = None,
) -> Diagnosis:
    """Diagnose the merge in ``path`` (a folder holding ``mergekit_config.yml``) against the sources its plan
    names; ``base`` is needed when the plan has no base_model (linear, karcher…)."""
    context = plan_context_for_folder(Path(path), base)
    merged = open_checkpoint(str(path))
    return diagnose(
        context.base, context.sources, merged, names=context.names, references=context.references, context=context,
        device=device, cancel=cancel, on_event=on_event, memory_budget=memory_budget,
    )
