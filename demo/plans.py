"""The demo workspace's merge plans: mergekit YAML that ``mergescope merge`` (and mergekit) run.

Model paths are absolute: mergescope resolves a plan's model references like any checkpoint source, relative
to the current directory, so absolute paths make ``mergescope merge DIR/plans/x.yml -o out`` work from
anywhere. When a workspace folder is moved, :func:`~mergescope.demo.workspace.build_workspace` rewrites them.

With a base θ₀ and fine-tunes θᵢ (task vectors τᵢ = θᵢ − θ₀) the plans compute:

- ``soup``: (θ_add + θ_reverse + θ_sort) / 3 = θ₀ + (τ_add + τ_reverse + τ_sort) / 3 (linear, normalised)
- ``task_arithmetic``: θ₀ + τ_add + τ_sort
- ``task_arithmetic_all``: θ₀ + τ_add + τ_reverse + τ_sort
- ``ties``: TIES of all three (top-50% magnitudes kept, sign election, agreeing entries averaged)
- ``dare_ties``: DARE (random 50% kept, rescaled by 2) then TIES' sign election, seed 0
- ``slerp``: spherical interpolation halfway between θ_add and θ_sort
- ``negation``: θ₀ + τ_reverse − τ_add (keep reverse, remove add)
- ``trap_other_base``: (θ_add + θ_trap) / 2 with a model that is not a fine-tune of θ₀ (the weights of two
  unrelated models averaged)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class DemoPlan:
    """One plan file: its name, method, what it shows, and its YAML document (model paths as folder names)."""

    name: str
    description: str
    document: dict

    @property
    def filename(self) -> str:
        return f"{self.name}.yml"

    @property
    def method(self) -> str:
        return self.document["merge_method"]


def _entry(model: str, **parameters: float) -> dict:
    return {"model": model, "parameters": parameters} if parameters else {"model": model}


def demo_plans(fine_tunes: dict[str, str], base: str, trap_other_base: str) -> list[DemoPlan]:
    """The plans, with ``fine_tunes`` (task → folder name), ``base`` and the different-base trap as given."""
    add, reverse, sort = fine_tunes["add"], fine_tunes["reverse"], fine_tunes["sort"]
    common = {"dtype": "float32"}
    return [
        DemoPlan("soup", "uniform model soup of the three fine-tunes (each skill at a third of its task vector)", {
            "merge_method": "linear",
            "models": [_entry(m, weight=1.0) for m in (add, reverse, sort)], **common}),
        DemoPlan("task_arithmetic", "base + τ_add + τ_sort: two fine-tunes that touch different characters", {
            "merge_method": "task_arithmetic", "base_model": base,
            "models": [_entry(add, weight=1.0), _entry(sort, weight=1.0)], **common}),
        DemoPlan("task_arithmetic_all", "base + all three task vectors: the largest (reverse) drowns the other two", {
            "merge_method": "task_arithmetic", "base_model": base,
            "models": [_entry(m, weight=1.0) for m in (add, reverse, sort)], **common}),
        DemoPlan("ties", "TIES of the three fine-tunes: top 50% of each task vector, sign election", {
            "merge_method": "ties", "base_model": base,
            "models": [_entry(m, weight=1.0, density=0.5) for m in (add, reverse, sort)],
            "parameters": {"normalize": True}, **common}),
        DemoPlan("dare_ties", "DARE (random half of each task vector, rescaled) with TIES sign election", {
            "merge_method": "dare_ties", "base_model": base,
            "models": [_entry(m, weight=1.0, density=0.5) for m in (add, reverse, sort)],
            "mergescope": {"seed": 0}, **common}),
        DemoPlan("slerp", "spherical interpolation halfway between the add and sort fine-tunes", {
            "merge_method": "slerp", "base_model": add,
            "models": [_entry(add), _entry(sort)], "parameters": {"t": 0.5}, **common}),
        DemoPlan("negation", "base + τ_reverse − τ_add: keeps reverse, removes add", {
            "merge_method": "task_arithmetic", "base_model": base,
            "models": [_entry(reverse, weight=1.0), _entry(add, weight=-1.0)], **common}),
        DemoPlan("trap_other_base", "average of a fine-tune and a model of another base: the analysis warns first", {
            "merge_method": "linear",
            "models": [_entry(add, weight=1.0), _entry(trap_other_base, weight=1.0)], **common}),
    ]


def _absolute(document: dict, root: Path) -> dict:
    """``document`` with every model reference made an absolute path under ``root``."""
    out = dict(document)
    if "base_model" in out:
        out["base_model"] = str(root / out["base_model"])
    out["models"] = [{**m, "model": str(root / m["model"])} for m in document["models"]]
    return out


def plan_text(plan: DemoPlan, root: Path) -> str:
    """The plan file: a comment saying what it shows and how to run it, then mergekit YAML."""
    header = (
        f"# {plan.description}\n"
        f"# run: mergescope merge {root / 'plans' / plan.filename} -o merged-{plan.name}\n"
    )
    return header + yaml.safe_dump(_absolute(plan.document, root), sort_keys=False, default_flow_style=False)


def write_plans(plans: list[DemoPlan], folder: Path, root: Path) -> None:
    """Write every plan into ``folder`` with model paths under ``root`` (the workspace's final place)."""
    folder.mkdir(parents=True, exist_ok=True)
    for plan in plans:
        (folder / plan.filename).write_text(plan_text(plan, root), encoding="utf-8")
