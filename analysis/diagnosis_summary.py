"""The diagnosis in plain words: where a source lost most of its change, and why.

For each source, a *finding* is a run of consecutive layer groups (model order) where its retention
⟨τ_m, τᵢ⟩ / ‖τᵢ‖² is below ``LOW_RETENTION`` = 1/3 — a group where the source changed nothing ends a run —
holding at least ``MIN_RUN_MASS`` = 1 % of the source's ‖τᵢ‖² (at most ``MAX_FINDINGS`` runs per source, the
ones holding most of it). Over the run, every share is averaged with weights ‖τᵢ‖² per group (so it equals the
share over the run's concatenated elements), and the cause is, in order:

1. the entries the merge zeroed or reversed explain at least half of what τᵢ lost: their share ``lost`` of
   ‖τᵢ‖² is ≥ (1 − ρ)/2 for ρ ≥ 0 (≥ 0.5 for ρ < 0). This is a sufficient condition: with K the entries where
   sign(τ_m) = sign(τᵢ) and L the others (shares k + ``lost`` = 1 of ‖τᵢ‖²),
   1 − ρ = (k − Σ_K τ_mτᵢ/‖τᵢ‖²) + (lost − Σ_L τ_mτᵢ/‖τᵢ‖²), and the last sum is ≤ 0, so L accounts for at least
   ``lost``. Then, if more of that is opposed by another source
   than not: **sign conflicts with** the source opposing most of it (and a second one opposing at least
   ``SECOND_CULPRIT`` = 0.8 as much);
2. the same, mostly where no other source disagreed: **trimmed** (its density, when the plan has one);
3. retention < 0 while its signs mostly survive: the merge **moves the opposite way**;
4. otherwise its signs survive but it is scaled down: **its weight** (with the plan's weights), else
   averaging or a small weight.

Then one line per source with its whole-model retention and cosine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mergescope.checkpoints import layer_index

from .diagnosis_context import PlanContext
from .diagnosis_groups import GroupDiagnosis

LOW_RETENTION = 1 / 3
MIN_RUN_MASS = 0.01
MAX_FINDINGS = 3
#: a second source is named when it opposes at least this share of what the first opposes (an unrelated
#: source opposes about half of any other's entries, so 0.5 would name it next to the real culprit)
SECOND_CULPRIT = 0.8


@dataclass
class Finding:
    """A run of layer groups where one source keeps less than a third of its change."""

    source: str
    groups: list[str]
    where: str  # "layers 18–27"
    retention: float
    cause: str
    sentence: str


@dataclass
class _RunEffect:
    """A source's shares over several groups, weighted by its ‖τᵢ‖² in each."""

    mass: float = 0.0
    retention: float = 0.0
    shares: dict[str, float] = field(default_factory=dict)
    share_mass: float = 0.0
    conflict_with: dict[str, float] = field(default_factory=dict)
    weight: float | None = None
    weight_total: float | None = None
    density: float | None = None


def aggregate(groups: list[GroupDiagnosis], i: int, context: PlanContext | None) -> _RunEffect:
    """Source i's retention and loss shares over ``groups``, each group weighted by ‖τᵢ‖² there."""
    run = _RunEffect()
    parameters: dict[str, list[tuple[float, float]]] = {"weight": [], "weight_total": [], "density": []}
    for group in groups:
        effect = group.sources[i]
        mass = effect.norm**2
        if mass <= 0 or effect.retention is None:
            continue
        run.mass += mass
        run.retention += mass * effect.retention
        if effect.lost is not None:
            run.share_mass += mass
            for key in ("lost", "reversed", "conflict", "trimmed"):
                run.shares[key] = run.shares.get(key, 0.0) + mass * getattr(effect, key)
            for name, share in effect.conflict_with.items():
                run.conflict_with[name] = run.conflict_with.get(name, 0.0) + mass * share
        total = context.parameters.get(group.group) if context is not None else None
        weight_total = total and total.weight_total
        for key, value in (("weight", effect.weight), ("density", effect.density), ("weight_total", weight_total)):
            if value is not None:
                parameters[key].append((mass, value))
    if run.mass > 0:
        run.retention /= run.mass
    if run.share_mass > 0:
        run.shares = {k: v / run.share_mass for k, v in run.shares.items()}
        run.conflict_with = {k: v / run.share_mass for k, v in run.conflict_with.items()}
    for key, values in parameters.items():
        if values:
            setattr(run, key, sum(m * v for m, v in values) / sum(m for m, _ in values))
    return run


def cause_of(run: _RunEffect, normalize: bool | None) -> str:
    """Why a source keeps little over a run (the rules of the module docstring)."""
    lost = run.shares.get("lost")
    if lost is not None and lost >= min(0.5, (1 - run.retention) / 2):
        if run.shares["conflict"] >= run.shares["trimmed"]:
            ranked = sorted(((share, name) for name, share in run.conflict_with.items() if share > 0), reverse=True)
            who = ranked[0][1]
            if len(ranked) > 1 and ranked[1][0] >= SECOND_CULPRIT * ranked[0][0]:
                who = f"{who} and {ranked[1][1]}"
            return f"sign conflicts with {who} there"
        if run.density is not None and run.density < 1:
            return f"trimmed away there (density {run.density:.2g})"
        return "zeroed there where no other source disagrees (a trim or drop)"
    if run.retention < 0:
        return "the merge moves the opposite way there"
    if run.weight is not None:
        if normalize and run.weight_total:
            return f"averaged in with weight {run.weight:.2g} of {run.weight_total:.2g}"
        return f"its weight there is {run.weight:.2g}"
    return "scaled down there although its signs survive (averaging or a small weight)"


def describe_groups(groups: list[str]) -> str:
    """``["model.layers.18", …, "model.layers.27"]`` → ``"layers 18–27"``; other groups by name; numbered groups
    of several stacks (an encoder and a decoder) keep their prefix: ``"encoder.block 5 and decoder.block 0"``."""
    prefixes = {g.rsplit(".", 1)[0] for g in groups if layer_index(g) is not None}
    parts: list[str] = []
    numbered: list[tuple[str, int]] = []

    def flush() -> None:
        if numbered:
            prefix, first, last = numbered[0][0], numbered[0][1], numbered[-1][1]
            span = str(first) if first == last else f"{first}–{last}"
            word = prefix if len(prefixes) > 1 else ("layer" if first == last else "layers")
            parts.append(f"{word} {span}")
            numbered.clear()

    for group in groups:
        index = layer_index(group)
        prefix = group.rsplit(".", 1)[0]
        if index is None:
            flush()
            parts.append(group)
            continue
        if numbered and (numbered[-1][0] != prefix or numbered[-1][1] != index - 1):
            flush()
        numbered.append((prefix, index))
    flush()
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def low_runs(groups: list[GroupDiagnosis], i: int) -> list[list[GroupDiagnosis]]:
    """Maximal runs of consecutive groups where source i's retention is below ``LOW_RETENTION``."""
    runs: list[list] = [[]]
    for group in groups:
        retention = group.sources[i].retention
        if retention is not None and retention < LOW_RETENTION:
            runs[-1].append(group)
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def percent(value: float) -> str:
    return f"{round(100 * value)}%"


def summarize(
    groups: list[GroupDiagnosis], total: GroupDiagnosis, names: list[str], context: PlanContext | None
) -> tuple[list[Finding], list[str]]:
    """The findings and the summary sentences: findings first (source order, then model order), then one
    whole-model line per source."""
    normalize = context.normalize if context is not None else None
    findings: list[Finding] = []
    for i, name in enumerate(names):
        source_mass = sum(g.sources[i].norm ** 2 for g in groups)
        candidates = []
        for run in low_runs(groups, i):
            effect = aggregate(run, i, context)
            if source_mass > 0 and effect.mass / source_mass >= MIN_RUN_MASS:
                candidates.append((effect.mass * (1 - effect.retention), run, effect))
        kept = sorted(candidates, key=lambda c: -c[0])[:MAX_FINDINGS]
        for _, run, effect in sorted(kept, key=lambda c: groups.index(c[1][0])):
            where = describe_groups([g.group for g in run])
            cause = cause_of(effect, normalize)
            sentence = f"{name} keeps {percent(effect.retention)} of its change in {where}: {cause}"
            findings.append(Finding(name, [g.group for g in run], where, effect.retention, cause, sentence))
    lines = [f.sentence for f in findings]
    for name, effect in zip(names, total.sources):
        if effect.retention is None:
            lines.append(f"{name} changed nothing relative to the base")
            continue
        cosine = "" if effect.cosine is None else f" (cosine {effect.cosine:.2f} with the merge's change)"
        lines.append(f"{name} keeps {percent(effect.retention)} of its change over the whole model{cosine}")
    return findings, lines
