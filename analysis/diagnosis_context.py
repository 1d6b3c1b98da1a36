"""What a diagnosis needs from the merge's plan: the base and sources it names, found on disk, and the
parameters it gave each source per layer group.

A plan written into a merged folder names its models as the user wrote them, often relative to the folder the
merge ran in. :func:`resolve_reference` tries each as given (relative to the current folder), then relative to
the merged folder's parent, then as a hub id; a model found nowhere is a one-line error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergescope.checkpoints import Checkpoint, MergescopeError, layer_group, open_checkpoint
from mergescope.checkpoints.hub import parse_hub_id
from mergescope.merge.job import MergeJob, build_job
from mergescope.merge.plan import PLAN_FILE_NAME, MergePlan, load_plan, plan_file_in

from .plan_warnings import reference_names


@dataclass
class GroupParameters:
    """A source's resolved parameters over one layer group, averaged over its tensors by size."""

    weights: list[float | None]
    densities: list[float | None]
    weight_total: float | None = None  # Σ of every input's weight (the base too, where it is an input)


@dataclass
class PlanContext:
    """The plan behind a merge, as the diagnosis uses it."""

    method: str | None
    normalize: bool | None
    base: Checkpoint | None
    sources: list[Checkpoint]
    names: list[str]
    references: list[str]
    parameters: dict[str, GroupParameters] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def plan_file(folder: Path) -> Path:
    """The plan a merged folder holds; a one-line error when it holds none."""
    found = plan_file_in(folder)
    if found is None:
        raise MergescopeError(
            f"{folder}: no {PLAN_FILE_NAME}, so not a folder written by mergescope merge (or mergekit)"
        )
    return found


def resolve_reference(reference: str, folder: Path, plan_path: Path) -> str:
    """``reference`` as given when it exists, else relative to ``folder``'s parent, else a hub id."""
    if "+" in reference and not Path(reference).expanduser().exists():
        model, adapter = reference.rsplit("+", 1)
        return f"{resolve_reference(model, folder, plan_path)}+{resolve_reference(adapter, folder, plan_path)}"
    for candidate in (Path(reference).expanduser(), folder.resolve().parent / reference):
        if candidate.exists():
            return str(candidate)
    if parse_hub_id(reference):
        return reference
    raise MergescopeError(
        f"{plan_path} names model {reference}, found neither as given nor in {folder.resolve().parent}: "
        "run from the folder the merge ran in"
    )


def plan_context_for_folder(folder: Path, base: str | Checkpoint | None) -> PlanContext:
    """Open the base and sources named by ``folder``'s plan (``base`` overrides or supplies the base)."""
    path = plan_file(folder)
    plan = load_plan(path)
    if plan.models is None:
        raise MergescopeError(
            f"{path}: a slices: plan stacks layers, so its tensors do not line up with a base; nothing to diagnose"
        )
    opened: dict[str, Checkpoint] = {}

    def open_reference(reference: str, base_checkpoint: Checkpoint | None = None) -> Checkpoint:
        try:
            return open_checkpoint(resolve_reference(reference, folder, path), base=base_checkpoint)
        except MergescopeError as exc:
            raise MergescopeError(f"{path}: cannot open {reference}: {exc}") from None

    if isinstance(base, Checkpoint):
        base_checkpoint = base
    elif base is not None:
        base_checkpoint = open_checkpoint(base)
    elif plan.base_model:
        base_checkpoint = opened[plan.base_model] = open_reference(plan.base_model)
    else:
        raise MergescopeError(
            f"{path}: this {plan.merge_method} plan has no base_model: pass the base the sources were fine-tuned from "
            "(--base BASE)"
        )
    if plan.base_model and plan.base_model not in opened:
        opened[plan.base_model] = open_reference(plan.base_model)
    references = []
    for entry in plan.models:
        if entry.model in references:
            continue
        # a plan's base_model that is also one of its models (slerp's t = 0 end) is a source whenever it is
        # not the base the task vectors are taken from (the --base the caller gave)
        checkpoint = opened.get(entry.model) or open_reference(entry.model, base_checkpoint)
        opened[entry.model] = checkpoint
        if checkpoint.fingerprint != base_checkpoint.fingerprint:
            references.append(entry.model)
    if not references:
        raise MergescopeError(f"{path}: the plan merges no model besides the base; nothing to diagnose")
    return _with_job(plan, opened, base_checkpoint, references)


def _with_job(plan: MergePlan, opened: dict[str, Checkpoint], base: Checkpoint, references: list[str]) -> PlanContext:
    """Resolve the plan's parameters per tensor (headers only) and average them per layer group."""
    sources = [opened[r] for r in references]
    try:
        job = build_job(plan, checkpoints=opened)
    except MergescopeError as exc:
        names = [s.name for s in sources]
        first = str(exc).splitlines()[0]
        not_shown = [f"the plan's parameters are not shown: {first}"]
        return PlanContext(plan.merge_method, None, base, sources, names, references, {}, not_shown)
    names = [reference_names(job)[r] for r in references]
    normalize = job.tasks[0].options.get("normalize") if job.tasks else None
    return PlanContext(plan.merge_method, normalize, base, sources, names, references, plan_parameters(job, references))


def plan_parameters(job: MergeJob, references: list[str]) -> dict[str, GroupParameters]:
    """Per layer group: each source's weight and density (None when the method has none), averaged over the
    group's tensors weighted by their size, and the average sum of all inputs' weights."""
    sums: dict[str, dict] = {}
    for task in job.tasks:
        entry = sums.setdefault(
            layer_group(task.output), {"numel": 0, "weights": {}, "densities": {}, "total": 0.0, "has_total": False}
        )
        entry["numel"] += task.numel
        weights = [p.get("weight") for p in task.params]
        if any(w is not None for w in weights):
            entry["total"] += task.numel * sum(float(w or 0) for w in weights)
            entry["has_total"] = True
        for (reference, _), params in zip(task.inputs, task.params):
            for key, value in (("weights", params.get("weight")), ("densities", params.get("density"))):
                if value is not None:
                    entry[key][reference] = entry[key].get(reference, 0.0) + task.numel * float(value)
    found = {}
    for group, entry in sums.items():
        numel = max(entry["numel"], 1)
        weights = [entry["weights"][r] / numel if r in entry["weights"] else None for r in references]
        densities = [entry["densities"][r] / numel if r in entry["densities"] else None for r in references]
        found[group] = GroupParameters(weights, densities, entry["total"] / numel if entry["has_total"] else None)
    return found
