"""The diagnosis in plain words: where a source lost most of its change, and why.

For each source, a *finding* is a run of consecutive layer groups (model order) where its retention
⟨τ_m, τᵢ⟩ / ‖τᵢ‖² is below ``LOW_RETENTION`` = 1/3 — a group where the source changed nothing ends a run —
holding at least ``MIN_RUN_MASS`` = 1 % of the source's ‖τᵢ‖² (at most ``MAX_FINDINGS`` runs per source, the
ones holding most of it); and, for a source whose skill is likely lost over the whole model
(:func:`likely_lost`) but that has no such run, one finding over the whole model. Over a run, every share
is averaged with weights ‖τᵢ‖² per group (so it equals the share over the run's concatenated elements).

The cause is the largest part of the exact decomposition 1 − ρ = zeroed + reversed + shrunk + amplified
(:mod:`.loss_parts`), in the method's terms:

1. **reversed**: the merge moved the other way where another source disagrees — with sign election (TIES,
   DARE-TIES, DELLA, breadcrumbs-TIES) it *lost the sign election* to the source opposing most of that cost,
   whose change is r× larger there; without election that source's opposite change outweighs it. Next
   step: lower that source's weight to about wⱼ/r (when r is clearly above 1).
2. **zeroed**: the merge left the base's values — *trimmed* at the plan's density (magnitude trims),
   *dropped at random* (DARE, DELLA), or zeroed where nothing says why. Next step: double the density.
3. **shrunk**: its signs survive but it is scaled down — by its weight, or averaged (normalize) with the
   weights of the sources that agree there. No next step: none the study tested helped (below).

Every next step is one the ground-truth study applied and measured (``benchmarks/diagnosis_study.py``,
docs/diagnosis_study.md: merged with the suggestion, the mean kept share of the plan's fine-tunes compared):
lowering the winning source's weight as suggested helped in 37 of 42 study plans (mean +0.15), doubling a
trimmed source's density in 3 of 5 (+0.18); "normalize: false" for an averaged source helped in only 2 of 8
(mean −0.73: for a linear soup it sums whole models), so the diagnosis no longer suggests it.

Without the decomposition (more than 7 sources) the older sign-share rules apply: lost share against
(1 − ρ)/2, then the weight. Then one line per source with its whole-model retention and cosine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mergescope.checkpoints import layer_index

from .diagnosis_context import PlanContext
from .diagnosis_groups import GroupDiagnosis, SourceEffect
from .ground_truth import LIKELY_LOST
from .loss_parts import LossParts

LOW_RETENTION = 1 / 3
#: the share of ‖τᵢ‖² the merge must have zeroed or reversed before a large own distance counts (see likely_lost)
LIKELY_LOST_CHANGE = 0.05
MIN_RUN_MASS = 0.01
MAX_FINDINGS = 3
#: a second source is named when it opposes at least this share of what the first opposes (an unrelated
#: source opposes about half of any other's entries, so 0.5 would name it next to the real culprit)
SECOND_CULPRIT = 0.8
#: a source's change that wins against another's is named as larger, with a weight to lower, from this ratio
CLEARLY_LARGER = 1.2
#: methods that elect a sign per entry, so a source opposed by larger changes is outvoted
ELECTING_METHODS = {"ties", "dare_ties", "breadcrumbs_ties", "della", "sce"}
#: methods whose trim drops entries at random (the rest trim by magnitude)
RANDOM_DROP_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}


@dataclass
class Finding:
    """A run of layer groups where one source keeps less than a third of its change."""

    source: str
    groups: list[str]
    where: str  # "layers 18–27", or "the whole model"
    retention: float
    cause: str
    sentence: str
    advice: str = ""  # the next step the numbers support, "" when none


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
    parts: LossParts | None = None
    #: every source's weight over the run (index → mean over the run's groups), for advice about another source
    weights: dict[int, float] = field(default_factory=dict)


def aggregate(groups: list[GroupDiagnosis], i: int, context: PlanContext | None) -> _RunEffect:
    """Source i's retention and loss shares over ``groups``, each group weighted by ‖τᵢ‖² there."""
    run = _RunEffect()
    parameters: dict[str, list[tuple[float, float]]] = {"weight": [], "weight_total": [], "density": []}
    parts: list[tuple[float, LossParts]] = []
    weights: dict[int, list[float]] = {}
    for group in groups:
        effect = group.sources[i]
        mass = effect.norm**2
        if mass <= 0 or effect.retention is None:
            continue
        if effect.parts is not None:
            parts.append((mass, effect.parts))
        for j, other in enumerate(group.sources):
            if other.weight is not None:
                weights.setdefault(j, []).append(other.weight)
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
    every_group_has_parts = len(parts) == sum(1 for g in groups if g.sources[i].norm > 0)
    run.parts = LossParts.weighted_mean(parts) if parts and every_group_has_parts else None
    run.weights = {j: sum(v) / len(v) for j, v in weights.items()}
    return run


def cause_from_parts(run: _RunEffect, names: list[str], method: str | None, normalize: bool | None) -> tuple[str, str]:
    """(cause, advice) from the largest part of the exact decomposition (the rules of the module docstring)."""
    parts = run.parts
    if run.weight is not None and run.weight < 0:
        return f"the plan subtracts it (weight {run.weight:.2g})", ""
    largest = max(("reversed", "zeroed", "shrunk"), key=lambda p: getattr(parts, p))
    if largest == "reversed" and parts.against:
        culprit = max(parts.against, key=parts.against.get)
        who, ratio = names[culprit], parts.ratio.get(culprit)
        own_weight, weight = run.weight, run.weights.get(culprit)
        weighted = bool(ratio is not None and own_weight and weight and own_weight > 0 and weight > 0)
        weighted = weighted and weight != own_weight
        if weighted:
            ratio = ratio * weight / own_weight  # the election compares wⱼ|τⱼ| with wᵢ|τᵢ|
        what = "weighted change" if weighted else "change"
        larger = "" if ratio is None or ratio < CLEARLY_LARGER else f", whose {what} is {ratio:.1f}× larger there"
        cost = percent(parts.against[culprit])
        if method in ELECTING_METHODS:
            cause = f"loses {cost} of its change to the sign election where {who} disagrees{larger}"
        else:
            cause = f"loses {cost} of its change where {who} moves the other way{larger}"
        if weight is not None and weight > 0 and ratio and ratio >= CLEARLY_LARGER:
            return cause, f"lower {who}'s weight to ~{weight / ratio:.2g} (from {weight:.2g})"
        return cause, ""
    if largest == "zeroed":
        trimmed = run.density is not None and run.density < 1
        density = f" (density {run.density:.2g})" if trimmed else ""
        advice = f"raise its density to ~{min(1.0, 2 * run.density):.2g}" if trimmed else ""
        if method in RANDOM_DROP_METHODS:
            return f"loses {percent(parts.zeroed)} of its change to random drops{density}", advice
        if density:
            return f"loses {percent(parts.zeroed)} of its change to trimming{density}", advice
        return f"loses {percent(parts.zeroed)} of its change where the merge keeps the base's values", ""
    lost = percent(parts.shrunk)
    if normalize and run.weight is not None and run.weight_total:
        return f"loses {lost} of its change to averaging (weight {run.weight:.2g} of {run.weight_total:.2g})", ""
    if run.weight is not None:
        return f"loses {lost} of its change to its weight there ({run.weight:.2g})", ""
    return f"loses {lost} of its change to scaling although its signs survive", ""


def cause_of(run: _RunEffect, normalize: bool | None) -> str:
    """Why a source keeps little over a run, from sign shares alone (no decomposition: more than 7 sources)."""
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


def likely_lost(effect: SourceEffect) -> bool:
    """Whether a source's skill is likely lost, from its whole-model numbers: its own distance (the merge's
    distance from the fine-tune, not counting what the other sources add) above ``LIKELY_LOST``, where the
    merge also zeroed or reversed at least ``LIKELY_LOST_CHANGE`` of it. The rule and its threshold come from
    the ground-truth study (docs/diagnosis_study.md: 63 demo merges, Spearman −0.32 and balanced accuracy
    0.68–0.70, where retention predicts nothing) — a weak signal, stated as such. The second condition leaves
    the study's score unchanged (16 of 24 kept skills called kept, 84 of 121 lost ones lost) and keeps a source
    whose every entry the merge left intact from being called lost when the sources overlap."""
    if effect.own_distance is None or effect.parts is None:
        return False
    removed = effect.parts.zeroed + effect.parts.reversed
    return effect.own_distance > LIKELY_LOST and removed >= LIKELY_LOST_CHANGE


def explain(run: _RunEffect, names: list[str], context: PlanContext | None) -> tuple[str, str]:
    """(cause, advice) of one source's loss over a run or the whole model."""
    normalize = context.normalize if context is not None else None
    if run.parts is not None:
        return cause_from_parts(run, names, context.method if context is not None else None, normalize)
    return cause_of(run, normalize), ""


def summarize(
    groups: list[GroupDiagnosis], total: GroupDiagnosis, names: list[str], context: PlanContext | None
) -> tuple[list[Finding], list[str]]:
    """The findings and the summary sentences: findings first (source order, then model order), then one
    whole-model line per source."""
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
            cause, advice = explain(effect, names, context)
            sentence = f"{name} keeps {percent(effect.retention)} of its change in {where}: {cause}"
            findings.append(Finding(name, [g.group for g in run], where, effect.retention, cause, sentence, advice))
        if not kept and likely_lost(total.sources[i]):
            effect = aggregate(groups, i, context)
            cause, advice = explain(effect, names, context)
            whole = total.sources[i]
            sentence = (f"{name}'s skill is likely lost (own distance {whole.own_distance:.2f} > {LIKELY_LOST:g}: the "
                        f"merge gives its change an effective weight of {whole.effective_weight:.2f} and adds "
                        f"{whole.off_span:.2f} of its size that no source has): {cause}")
            everywhere = [g.group for g in groups]
            findings.append(Finding(name, everywhere, "the whole model", whole.retention, cause, sentence, advice))
    lines = [f"{f.sentence}; {f.advice}" if f.advice else f.sentence for f in findings]
    for name, effect in zip(names, total.sources):
        if effect.retention is None:
            lines.append(f"{name} changed nothing relative to the base")
            continue
        cosine = "" if effect.cosine is None else f" (cosine {effect.cosine:.2f} with the merge's change"
        cosine += "" if effect.own_distance is None else f", own distance {effect.own_distance:.2f})"
        cosine += ")" if effect.cosine is not None and effect.own_distance is None else ""
        lines.append(f"{name} keeps {percent(effect.retention)} of its change over the whole model{cosine}")
    return findings, lines
