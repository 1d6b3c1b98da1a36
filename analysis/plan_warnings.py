"""Warnings about a merge plan before it runs: settings that quietly break a merge, and sources the analysis
flagged as incompatible. One line each, naming the model.

Rules, checked on every output tensor's resolved parameters (a gradient or filter can make one tensor the
worst; the line then names it):

* ``linear`` with ``normalize: false``: θ = Σ wᵢθᵢ, so weights summing to S ≠ 1 (|S − 1| > 0.1) scale the whole
  model by S. With ``normalize: true`` weights summing to 0 divide by 0.
* task arithmetic and its trimmed variants with ``normalize: false`` (task_arithmetic, dare_linear,
  breadcrumbs, della_linear; ties, dare_ties, breadcrumbs_ties, della when normalize is off): Δ = λ·Σ wᵢτ̃ᵢ, so
  where task vectors agree they add up: λ·Σ wᵢ > 1.5 overshoots; one λ·wᵢ > 1.5 extrapolates that model past
  its own fine-tune. With normalisation the weights only set proportions.
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

from mergescope.checkpoints import Checkpoint
from mergescope.merge.job import MergeJob

from .report import unique_names

SUM_TOLERANCE = 0.1
OVERSHOOT = 1.5
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


@dataclass
class _Worst:
    """The most severe value of one rule for one model, over the tensors."""

    severity: float
    message: str
    tensor: str
    tensors: int = 0  # how many tensors the rule fired on


def plan_warnings(job: MergeJob, analysis_report: dict | None = None) -> list[str]:
    """One line per problem (see the module docstring), in rule order."""
    names = reference_names(job)
    found: dict[tuple, _Worst] = {}

    def note(key: tuple, severity: float, message: str, tensor: str) -> None:
        worst = found.get(key)
        if worst is None:
            worst = found[key] = _Worst(severity, message, tensor)
        elif severity > worst.severity:
            worst.severity, worst.message, worst.tensor = severity, message, tensor
        worst.tensors += 1

    for task in job.tasks:
        for key, severity, message in _task_findings(job, task, names):
            note(key, severity, message, task.output)
    lines = []
    for worst in found.values():
        # a rule that fires on some tensors only (a gradient, a filter): say where it is worst
        some = worst.tensors < len(job.tasks)
        where = f" (at {worst.tensor}; {worst.tensors} of {len(job.tasks)} tensors)" if some else ""
        lines.append(worst.message + where)
    return lines + _report_warnings(job, names, analysis_report)


def _task_findings(job: MergeJob, task, names: dict[str, str]):
    """(key, severity, message) for one output tensor's parameters; the most severe per key is reported."""
    models = [names[ref] for ref, _ in task.inputs]
    yield from _weight_findings(job.method.name, task, models)
    yield from _density_findings(job, task, models)


def _weight_findings(method: str, task, models: list[str]):
    weights = [p.get("weight") for p in task.params]
    if any(w is not None for w in weights):
        weights = [float(w or 0.0) for w in weights]
        total = sum(weights)
        listed = " + ".join(f"{m} {w:g}" for m, w in zip(models, weights))
        normalize = bool(task.options.get("normalize", method == "linear"))
        scale = float(task.options.get("lambda", 1.0))
        if method == "linear" and not normalize and abs(total - 1) > SUM_TOLERANCE:
            yield ("sum",), abs(total - 1), (
                f"linear with normalize: false: weights {listed} sum to {total:g}, so the merged model is the "
                f"soup scaled by {total:g}; set normalize: true or make them sum to 1"
            )
        if method == "linear" and normalize and abs(total) < 1e-6:
            yield ("sum",), 1.0, (
                f"linear: weights {listed} sum to 0 and normalize divides by it: every weight becomes inf/NaN"
            )
        if method in _ADDITIVE and not normalize:
            if scale * total > OVERSHOOT:
                yield ("sum",), scale * total, (
                    f"{method} with normalize: false adds λ·Σw = {scale * total:g} times the task vectors ({listed}): "
                    "where they agree the merge overshoots; lower the weights or lambda, or set normalize: true"
                )
            for model, weight in zip(models, weights):
                if scale * weight > OVERSHOOT:
                    yield ("extrapolate", model), scale * weight, (
                        f"{model}: weight {weight:g} (× λ {scale:g}) extrapolates its task vector past the "
                        "fine-tune itself"
                    )
        for model, weight in zip(models, weights):
            if weight == 0:
                yield ("zero", model), 1.0, f"{model}: weight 0, so it contributes nothing to the merge"
            elif weight < 0:
                yield ("negative", model), -weight, (
                    f"{model}: negative weight {weight:g} subtracts its task vector (moves away from it)"
                )


def _density_findings(job: MergeJob, task, models: list[str]):
    method = job.method
    if method.name in _TRIMMING:
        for model, p in zip(models, task.params):
            density = float(p.get("density", 1.0))
            if method.random and task.options.get("rescale", False) and density < LOW_RANDOM_DENSITY:
                yield ("density", model), 1 / max(density, 1e-9), (
                    f"{model}: density {density:g} with rescale keeps {density:.0%} of its entries at random and "
                    f"multiplies them by about {1 / max(density, 1e-9):.0f}: expect noise; raise the density"
                )
            elif density < LOW_DENSITY:
                yield ("density", model), 1 / max(density, 1e-9), (
                    f"{model}: density {density:g} keeps only {density:.0%} of its task vector; raise it to keep more"
                )
    if method.name == "sce":
        fraction = float(task.options.get("select_topk", 1.0))
        if fraction < LOW_DENSITY:
            yield ("select_topk",), 1 / max(fraction, 1e-9), (
                f"sce: select_topk {fraction:g} keeps only {fraction:.0%} of the entries of every model; raise it"
            )


def _report_warnings(job: MergeJob, names: dict[str, str], report: dict | None) -> list[str]:
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
        lines.append(f"{names[reference]}: {code}: {items[0]['message']}{more}")
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
