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

* :class:`SourceEffect` — one source in one group: ``norm``, ``retention``, ``cosine``, ``lost``, ``reversed``,
  ``conflict``, ``trimmed``, ``conflict_with`` (name → share), ``weight``, ``density``.
* :class:`GroupDiagnosis` ``(group, numel, merged_norm, sources: list[SourceEffect])``.
* :class:`Diagnosis` ``(names, references, base, merged, method, groups, total, findings, summary, warnings)``;
  ``findings`` are :class:`~.diagnosis_summary.Finding` (a source, a run of groups keeping < 1/3, the cause);
  ``summary`` the plain-words sentences; :meth:`Diagnosis.to_json` the ``mergescope.diagnosis/2`` document.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mergescope.checkpoints import Checkpoint, MergescopeError, open_checkpoint

from .compatibility import AnalysisWarning
from .diagnosis_context import PlanContext, plan_context_for_folder
from .diagnosis_summary import Finding, summarize
from .loss_parts import PARTS, LossParts, loss_parts
from .report import AnalysisCancelled, unique_names
from .retention import merge_gram_from_task_sums
from .sign_patterns import pattern_table
from .stream import Progress, TensorResult, stream_analysis
from .sums import TaskVectorSums

SCHEMA = "mergescope.diagnosis/2"


@dataclass
class SourceEffect:
    """What the merge did to one source's task vector over one group (see the module docstring)."""

    norm: float
    retention: float | None
    cosine: float | None
    lost: float | None = None
    reversed: float | None = None
    conflict: float | None = None
    trimmed: float | None = None
    conflict_with: dict[str, float] = field(default_factory=dict)
    weight: float | None = None
    density: float | None = None
    parts: LossParts | None = None  # 1 − retention, split exactly (see .loss_parts)


@dataclass
class GroupDiagnosis:
    group: str  # a layer group, or "total"
    numel: int
    merged_norm: float
    sources: list[SourceEffect]


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


def sign_losses(pattern_mass: np.ndarray, n: int) -> list[dict]:
    """Per source i < n: ``lost``, ``reversed``, ``conflict``, ``trimmed`` and ``conflict_with`` (index → share)
    as shares of Σ τᵢ², from the pattern mass of the n sources and the merge (the last of n + 1 vectors)."""
    patterns = pattern_table(n + 1)
    merged = patterns[:, n]
    found = []
    for i in range(n):
        own = patterns[:, i]
        mass = pattern_mass[:, i]
        total = float(mass[own != 0].sum())
        if total <= 0:
            found.append({"lost": None, "reversed": None, "conflict": None, "trimmed": None, "conflict_with": {}})
            continue
        lost = (own != 0) & (merged != own)
        opposed_by = {j: lost & (patterns[:, j] == -own) for j in range(n) if j != i}
        conflicted = np.zeros_like(lost)
        for mask in opposed_by.values():
            conflicted |= mask
        share = lambda mask: float(mass[mask].sum()) / total  # noqa: E731
        found.append({
            "lost": share(lost),
            "reversed": share(lost & (merged == -own)),
            "conflict": share(conflicted),
            "trimmed": share(lost & ~conflicted),
            "conflict_with": {j: share(mask) for j, mask in opposed_by.items()},
        })
    return found


def group_diagnosis(group: str, sums: TaskVectorSums, names: list[str], context: PlanContext | None) -> GroupDiagnosis:
    """The numbers of one group (or ``"total"``) from its summed analysis sums over ``[τ₁…τₙ, τ_m]``."""
    n = len(names)
    gram = merge_gram_from_task_sums(sums.gram, sums.numel)
    losses = sign_losses(sums.signs.pattern_mass, n) if sums.signs.pattern_mass is not None else [None] * n
    parameters = context.parameters.get(group) if context is not None else None
    effects = []
    for i, (loss, parts) in enumerate(zip(losses, loss_parts(sums.signs, n))):
        effect = SourceEffect(gram.norm(i), gram.retention(i), gram.cosine(i), parts=parts)
        if loss is not None:
            effect.lost, effect.reversed, effect.conflict, effect.trimmed = loss["lost"], loss["reversed"], loss["conflict"], loss["trimmed"]
            effect.conflict_with = {names[j]: value for j, value in loss["conflict_with"].items()}
        if parameters is not None:
            effect.weight, effect.density = parameters.weights[i], parameters.densities[i]
        effects.append(effect)
    return GroupDiagnosis(group, sums.numel, gram.merged_norm, effects)


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
) -> Iterator[AnalysisWarning | Progress | GroupDiagnosis | Diagnosis]:
    """Yield the pass' warnings and progress, a :class:`GroupDiagnosis` as each layer group completes and,
    unless ``cancel`` stopped the pass (between tensors), the :class:`Diagnosis` last."""
    if not sources:
        raise MergescopeError("a diagnosis needs at least one source model besides the base")
    names = names or unique_names(sources)
    references = references or [s.source for s in sources]
    labels = unique_names([*sources, merged])
    n = len(sources)
    groups: list[GroupDiagnosis] = []
    warnings: list[AnalysisWarning] = []
    total, current, current_group = TaskVectorSums(n + 1), TaskVectorSums(n + 1), None
    for event in stream_analysis(base, [*sources, merged], [*names, labels[-1]], device=device, cancel=cancel, patterns=True):
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
) -> Diagnosis:
    """Diagnose the merge in ``path`` (a folder holding ``mergekit_config.yml``) against the sources its plan
    names; ``base`` is needed when the plan has no base_model (linear, karcher…)."""
    context = plan_context_for_folder(Path(path), base)
    merged = open_checkpoint(str(path))
    return diagnose(
        context.base, context.sources, merged, names=context.names, references=context.references, context=context,
        device=device, cancel=cancel, on_event=on_event,
    )
