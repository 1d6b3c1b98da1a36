"""Warnings about a merge plan before it runs: settings that quietly break a merge, and sources the analysis
flagged as incompatible. One line each, naming the model.

Rules, checked on every output tensor's resolved parameters (a gradient or filter can make one tensor the
worst; the line then names it):

* ``linear`` with ``normalize: false``: θ = Σ wᵢθᵢ, so weights summing to S ≠ 1 (|S − 1| > 0.1) scale the whole
  model by S. With ``normalize: true`` weights summing to 0 divide by 0.
* overshoot — task arithmetic and its trimmed variants with ``normalize: false`` (task_arithmetic, dare_linear,
  breadcrumbs, della_linear; ties, dare_ties, breadcrumbs_ties, della when normalize is off): Δ = λ·Σ wⱼτ̃ⱼ
  moves along source i's task vector by ρ̂ᵢ = ⟨Δ, τᵢ⟩/‖τᵢ‖² = λwᵢ + λ·Σ_{j≠i} wⱼ⟨τⱼ, τᵢ⟩/‖τᵢ‖² times the
  fine-tune's own move: task vectors add up only as far as they overlap. With the analysis report, ρ̂ᵢ comes
  from its Gram matrix (:func:`plan_overlap`, per layer group), and the rule fires when ρ̂ᵢ > 1.1 in a group
  holding ≥ 1% of ‖τᵢ‖², suggesting λ × 1/max ρ̂. Without the report the overlap is unknown and the rule
  takes the task vectors as orthogonal: λ·wᵢ > 1.1. (The old rule, λ·Σw > 1.5, fired on the demo's best
  plan — θ₀ + τ_add + τ_sort, two nearly orthogonal task vectors — and its fix, normalize: true, raised the
  measured kept share in 14 of the 27 study plans where it fired and lowered it by more than 0.1 in 10; the
  overlap rule fires on 15 and its fix raises the kept share in 14 of them: ``benchmarks/diagnosis_study.py``,
  ``docs/diagnosis_study.md``.) With normalisation the weights only set proportions.
* weight 0 (the model contributes nothing) and negative weights (its task vector is subtracted).
* trimming methods: density < 0.1 keeps almost nothing; random drops (DARE, DELLA) with ``rescale`` and
  density < 0.2 multiply the few kept entries by ~1/density, amplifying noise. sce: select_topk < 0.1.
* the analysis report's warnings (``different_base``, ``vocab_mismatch``, ``tokenizer_mismatch``,
  ``architecture_mismatch``, ``shape_mismatch``, ``non_finite``) about models the plan merges.

Also here: how the preview and the diagnosis name a plan's sources (:func:`reference_names`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mergescope.checkpoints import Checkpoint, layer_group
from mergescope.merge.job import MergeJob

from .report import unique_names

SUM_TOLERANCE = 0.1
#: the merge moves more than this many times as far along a source's task vector as the fine-tune did
#: (benchmarks/diagnosis_study.py: on the demo, 1.2× along τ_add already loses the skill, 1.0× keeps it)
OVERSHOOT = 1.1
#: a layer group counts for the overshoot rule when it holds at least this share of the source's ‖τᵢ‖²
OVERSHOOT_MIN_MASS = 0.01
LOW_DENSITY = 0.1
LOW_RANDOM_DENSITY = 0.2
INCOMPATIBLE_CODES = (
    "different_base", "vocab_mismatch", "tokenizer_mismatch", "architecture_mismatch", "shape_mismatch", "non_finite",
)
_TRIMMING = {"ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
_ADDITIVE = {"task_arithmetic", *_TRIMMING}


def reference_names(job: MergeJob) -> dict[str, str]:
    """Each plan reference's short name (the checkpoint's, made unique), in plan order."""
    references = list(job.checkpoints)
    return dict(zip(references, unique_names([job.checkpoints[r] for r in references])))


def source_references(job: MergeJob, base: Checkpoint) -> list[str]:
    """The references the job merges, in plan order, without ``base`` (an input of linear plans)."""
    found: list[str] = []
    for task in job.tasks:
        for reference, _ in task.inputs:
            checkpoint = job.checkpoints[reference]
            same = checkpoint is base or checkpoint.fingerprint == base.fingerprint
            if not same and reference not in found:
                found.append(reference)
    return found


def source_names(job: MergeJob, references: list[str]) -> list[str]:
    names = reference_names(job)
    return [names[r] for r in references]


@dataclass(frozen=True)
class PlanWarning:
    """One warning: the rule that fired (``linear_sum``, ``linear_zero_sum``, ``overshoot``, ``zero_weight``,
    ``negative_weight``, ``low_density``, ``low_random_density``, ``select_topk``, or an analysis code such as
    ``different_base``), the model reference it names (None for the whole plan), and its line."""

    rule: str
    model: str | None
    message: str


@dataclass
class _Worst:
    """The most severe value of one rule for one model, over the tensors."""

    severity: float
    message: str
    tensor: str
    tensors: int = 0  # how many tensors the rule fired on


def plan_warnings(job: MergeJob, analysis_report: dict | None = None) -> list[str]:
    """One line per problem (see the module docstring), in rule order."""
    return [w.message for w in plan_findings(job, analysis_report)]


def plan_findings(job: MergeJob, analysis_report: dict | None = None) -> list[PlanWarning]:
    """:func:`plan_warnings` with the rule and the model of each line."""
    names = reference_names(job)
    found: dict[tuple, _Worst] = {}

    def note(key: tuple, severity: float, message: str, tensor: str) -> None:
        worst = found.get(key)
        if worst is None:
            worst = found[key] = _Worst(severity, message, tensor)
        elif severity > worst.severity:
            worst.severity, worst.message, worst.tensor = severity, message, tensor
        worst.tensors += 1

    overlap = plan_overlap(job, analysis_report)
    for task in job.tasks:
        for key, severity, message in _task_findings(job, task, names, overlap is not None):
            note(key, severity, message, task.output)
    lines = []
    for (rule, model), worst in found.items():
        # a rule that fires on some tensors only (a gradient, a filter): say where it is worst
        where = (
            f" (at {worst.tensor}; {worst.tensors} of {len(job.tasks)} tensors)"
            if worst.tensors < len(job.tasks) else ""
        )
        lines.append(PlanWarning(rule, model, worst.message + where))
    if overlap is not None:
        lines += _overshoot_warnings(job, names, overlap)
    return lines + _report_warnings(job, names, analysis_report)


def _overshoot_warnings(job: MergeJob, names: dict[str, str], overlap: Overlap) -> list[PlanWarning]:
    """The overshoot rule with the analysis: a source whose predicted retention exceeds ``OVERSHOOT`` in a
    layer group holding at least ``OVERSHOOT_MIN_MASS`` of its ‖τᵢ‖²."""
    found = []
    scale = overlap.largest
    for reference, groups in overlap.by_group.items():
        mass = overlap.mass[reference]
        total = sum(mass.values())
        counted = {g: r for g, r in groups.items() if total > 0 and mass[g] / total >= OVERSHOOT_MIN_MASS}
        if not counted:
            continue
        group, worst = max(counted.items(), key=lambda item: item[1])
        if worst <= OVERSHOOT:
            continue
        where = "" if len(counted) == 1 or min(counted.values()) > OVERSHOOT else f" (at {group})"
        found.append(PlanWarning("overshoot", reference, (
            f"{names[reference]}: the merge moves {worst:.2g}× as far along its task vector as the fine-tune "
            f"itself{where} — "
            f"λ·w plus the other task vectors' overlap with it, from the analysis: past the fine-tune; "
            f"multiply lambda by {1 / scale:.2g} (the largest then 1×), or set normalize: true"
        )))
    return found


def _task_findings(job: MergeJob, task, names: dict[str, str], overlap_known: bool = False):
    """((rule, model reference), severity, message) for one output tensor's parameters; the most severe per
    key is reported."""
    references = [ref for ref, _ in task.inputs]
    yield from _weight_findings(job.method.name, task, references, names, overlap_known)
    yield from _density_findings(job, task, references, names)


def _weight_findings(method: str, task, references: list[str], names: dict[str, str], overlap_known: bool = False):
    models = [names[ref] for ref in references]
    weights = [p.get("weight") for p in task.params]
    if any(w is not None for w in weights):
        weights = [float(w or 0.0) for w in weights]
        total = sum(weights)
        listed = " + ".join(f"{m} {w:g}" for m, w in zip(models, weights))
        normalize = bool(task.options.get("normalize", method == "linear"))
        scale = float(task.options.get("lambda", 1.0))
        if method == "linear" and not normalize and abs(total - 1) > SUM_TOLERANCE:
            yield ("linear_sum", None), abs(total - 1), (
                f"linear with normalize: false: weights {listed} sum to {total:g}, so the merged model is the "
                f"soup scaled by {total:g}; set normalize: true or make them sum to 1"
            )
        if method == "linear" and normalize and abs(total) < 1e-6:
            yield ("linear_zero_sum", None), 1.0, (
                f"linear: weights {listed} sum to 0 and normalize divides by it: every weight becomes inf/NaN"
            )
        if method in _ADDITIVE and not normalize and not overlap_known:
            for ref, model, weight in zip(references, models, weights):
                if scale * weight > OVERSHOOT:
                    yield ("overshoot", ref), scale * weight, (
                        f"{model}: weight {weight:g} × λ {scale:g} moves the merge {scale * weight:.2g}× as far "
                        f"along its task vector as the fine-tune itself (more where other task vectors overlap it; "
                        f"analyse the models to see): past the fine-tune; multiply its weight by "
                        f"{1 / (scale * weight):.2g}, or set normalize: true"
                    )
        for ref, model, weight in zip(references, models, weights):
            if weight == 0:
                yield ("zero_weight", ref), 1.0, f"{model}: weight 0, so it contributes nothing to the merge"
            elif weight < 0:
                yield ("negative_weight", ref), -weight, (
                    f"{model}: negative weight {weight:g} subtracts its task vector (moves away from it)"
                )


@dataclass(frozen=True)
class Overlap:
    """What a plan's unnormalised task-vector sum Δ = λ·Σⱼ wⱼτⱼ does along each source, from the analysis'
    Gram matrix of the task vectors (per tensor: ⟨τᵢ, τⱼ⟩ = cos(τᵢ, τⱼ)·‖τᵢ‖·‖τⱼ‖), summed over the tensors
    with the plan's λ and weights resolved per tensor:

    * ``retention[ref]`` (whole model) and ``by_group[ref][group]`` (per layer group):
      ⟨Δ, τᵢ⟩ / ‖τᵢ‖² = λwᵢ + λ·Σ_{j≠i} wⱼ⟨τⱼ, τᵢ⟩/‖τᵢ‖²: how far the merge moves along τᵢ, in units of the
      fine-tune's own move — exactly the merge's retention of τᵢ for task_arithmetic (before any trim or sign
      election). With orthogonal task vectors it is λwᵢ; with equal ones λ·Σw.
    * ``mass[ref][group]``: ‖τᵢ‖² in the group;
    * ``largest``: the largest ``by_group`` value over groups holding ≥ ``OVERSHOOT_MIN_MASS`` of their source;
    * ``displacement`` = ‖Δ‖ / maxᵢ ‖τᵢ‖: how far the merge moves from the base, in units of the largest
      fine-tune's move.

    Tensors merged with ``normalize: true`` are left out (their weights only set proportions).
    """

    retention: dict[str, float]
    by_group: dict[str, dict[str, float]]
    mass: dict[str, dict[str, float]]
    largest: float
    displacement: float


def plan_overlap(job: MergeJob, report: dict | None) -> Overlap | None:
    """:class:`Overlap` of an additive plan (task_arithmetic and the trimming methods) from the analysis
    ``report`` of the same base and sources; None when the plan is not additive, merges every tensor with
    ``normalize: true``, or when the report lacks the plan's base, a source or a tensor."""
    if not report or job.method.name not in _ADDITIVE or job.plan.base_model is None:
        return None
    if _matching_reference(job, (report.get("base") or {}).get("source")) != job.plan.base_model:
        return None
    name_of: dict[str, str] = {}
    for model in report.get("models", []):
        reference = _matching_reference(job, model.get("source"))
        if reference is not None:
            name_of[reference] = model["name"]
    tensors = {t["name"]: t for t in report.get("tensors", [])}
    along: dict[str, dict[str, float]] = {}
    own: dict[str, dict[str, float]] = {}
    moved = 0.0
    for task in job.tasks:
        if task.options.get("normalize", False) or not task.inputs:
            continue
        references = [ref for ref, _ in task.inputs]
        entry = tensors.get(task.inputs[0][1])
        if entry is None or any(ref not in name_of for ref in references):
            return None
        names = [name_of[ref] for ref in references]
        norms = [float(((entry.get("delta") or {}).get(n) or {}).get("norm") or 0.0) for n in names]
        cosines = {(p["a"], p["b"]): p.get("cosine") for p in entry.get("pairs", [])}

        def inner(
            i: int, j: int, norms: list[float] = norms, cosines: dict = cosines, names: list[str] = names
        ) -> float:
            if i == j:
                return norms[i] ** 2
            cosine = cosines.get((names[i], names[j]), cosines.get((names[j], names[i])))
            return float(cosine or 0.0) * norms[i] * norms[j]

        scale = float(task.options.get("lambda", 1.0))
        weights = [scale * float(p.get("weight") or 0.0) for p in task.params]
        group = layer_group(task.output)
        for i, ref in enumerate(references):
            along.setdefault(ref, {})[group] = along.get(ref, {}).get(group, 0.0) + sum(
                w * inner(i, j) for j, w in enumerate(weights)
            )
            own.setdefault(ref, {})[group] = own.get(ref, {}).get(group, 0.0) + inner(i, i)
        moved += sum(weights[i] * weights[j] * inner(i, j) for i in range(len(names)) for j in range(len(names)))
    if not own:
        return None
    by_group = {ref: {g: along[ref][g] / m for g, m in groups.items() if m > 0} for ref, groups in own.items()}
    retention = {
        ref: sum(along[ref].values()) / sum(groups.values()) for ref, groups in own.items() if sum(groups.values()) > 0
    }
    largest = 0.0
    for ref, groups in by_group.items():
        total = sum(own[ref].values())
        for g, value in groups.items():
            if total > 0 and own[ref][g] / total >= OVERSHOOT_MIN_MASS:
                largest = max(largest, value)
    biggest = max((sum(groups.values()) for groups in own.values()), default=0.0)
    displacement = (max(moved, 0.0) / biggest) ** 0.5 if biggest > 0 else 0.0
    return Overlap(retention, by_group, own, largest, displacement)


def _density_findings(job: MergeJob, task, references: list[str], names: dict[str, str]):
    method = job.method
    if method.name in _TRIMMING:
        for ref, p in zip(references, task.params):
            model = names[ref]
            density = float(p.get("density", 1.0))
            if method.random and task.options.get("rescale", False) and density < LOW_RANDOM_DENSITY:
                yield ("low_random_density", ref), 1 / max(density, 1e-9), (
                    f"{model}: density {density:g} with rescale keeps {density:.0%} of its entries at random and "
                    f"multiplies them by about {1 / max(density, 1e-9):.0f}: expect noise; raise the density"
                )
            elif density < LOW_DENSITY:
                yield ("low_density", ref), 1 / max(density, 1e-9), (
                    f"{model}: density {density:g} keeps only {density:.0%} of its task vector; raise it to keep more"
                )
    if method.name == "sce":
        fraction = float(task.options.get("select_topk", 1.0))
        if fraction < LOW_DENSITY:
            yield ("select_topk", None), 1 / max(fraction, 1e-9), (
                f"sce: select_topk {fraction:g} keeps only {fraction:.0%} of the entries of every model; raise it"
            )


def _report_warnings(job: MergeJob, names: dict[str, str], report: dict | None) -> list[PlanWarning]:
    """The analysis' compatibility warnings about models this plan merges, one line per model and code."""
    if not report:
        return []
    merged = {reference for task in job.tasks for reference, _ in task.inputs}  # not every checkpoint the job knows
    by_report_name: dict[str, str] = {}
    for model in report.get("models", []):
        reference = _matching_reference(job, model.get("source"))
        if reference in merged:
            by_report_name[model["name"]] = reference
    grouped: dict[tuple[str, str], list[dict]] = {}
    for warning in report.get("warnings", []):
        reference = by_report_name.get(warning.get("model"))
        if reference is not None and warning.get("code") in INCOMPATIBLE_CODES:
            grouped.setdefault((warning["code"], reference), []).append(warning)
    lines = []
    for (code, reference), items in grouped.items():
        more = f" (and {len(items) - 1} more tensors)" if len(items) > 1 else ""
        lines.append(PlanWarning(code, reference, f"{names[reference]}: {code}: {items[0]['message']}{more}"))
    return lines


def _matching_reference(job: MergeJob, source: str | None) -> str | None:
    """The plan reference that names the same model as an analysed ``source`` (same text or same path)."""
    if source is None:
        return None
    for reference, checkpoint in job.checkpoints.items():
        if source in (reference, checkpoint.source):
            return reference
    for reference in job.checkpoints:
        if os.path.exists(source) and os.path.exists(reference) and os.path.samefile(source, reference):
            return reference
    return None
