"""What ``mergescope inspect TARGET...`` opens, decided before the app starts (no Textual here).

- ``BASE MODEL...``: the overview of the models' task vectors against BASE.
- ``PLAN.yml``: base and models from the plan, opened in the plan builder.
- ``MERGED_DIR`` (a folder holding ``mergekit_config.yml``): the diagnosis of that merge, over the overview
  of its sources.
- a demo workspace (a folder holding the demo's manifest): its base and models.
- ``SEARCH.db`` (a ``mergescope tune`` search file): the search screen, over the plan's base and models.

Checkpoints are opened here (headers only, milliseconds), so a bad path is a one-line error at the shell
rather than inside the app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mergescope.analysis.diagnosis_context import plan_context_for_folder
from mergescope.checkpoints import Checkpoint, MergescopeError, open_checkpoint
from mergescope.demo.session import is_workspace, workspace_models
from mergescope.merge.plan import MergePlan, load_plan, parse_plan, plan_file_in
from mergescope.merge.search_store import open_for_reading


@dataclass
class Session:
    """The checkpoints the app shows and the screen it starts on."""

    base: Checkpoint
    models: list[Checkpoint]
    start: Literal["overview", "plan", "diagnosis", "search"] = "overview"
    plan_path: Path | None = None  # the plan opened in the builder
    merged_dir: Path | None = None  # the merge to diagnose
    search_path: Path | None = None  # the search file to show
    workspace: Path | None = None  # a demo workspace: merges land here, the demo scores them
    references: list[str] = field(default_factory=list)  # how the plan names each model (base first)
    #: references of models a first plan leaves unticked even before the analysis flags them (the demo's
    #: traps, and its LoRA twin of a full fine-tune)
    set_aside: frozenset[str] = frozenset()


def open_session(targets: list[str], base: str | None = None) -> Session:
    """Resolve the command line's targets into a :class:`Session`; raise a one-line MergescopeError.

    ``base`` is the base of a merged folder whose plan names none (a linear soup)."""
    if len(targets) == 1:
        target = Path(targets[0])
        if is_workspace(target):
            return _demo_session(target)
        if target.is_dir() and plan_file_in(target) is not None:
            return _merged_session(target, base)
        if target.suffix in (".yml", ".yaml") and target.is_file():
            return _plan_session(target)
        if target.suffix == ".db":
            return _search_session(target)
        raise MergescopeError(
            f"{targets[0]}: give a base and at least one model (mergescope inspect BASE MODEL...), "
            "a plan (PLAN.yml), a merged folder holding mergekit_config.yml, a demo workspace or a search file "
            "(SEARCH.db)"
        )
    base = open_checkpoint(targets[0])
    models = [open_checkpoint(t, base=base) for t in targets[1:]]
    return Session(base, models, references=list(targets))


def _plan_models(plan: MergePlan) -> tuple[str, list[str]]:
    """The plan's base reference (its base_model, else its first model) and its other model references."""
    entries = plan.models or [s for sl in plan.slices or [] for s in sl.sources]
    refs = list(dict.fromkeys(e.model for e in entries))
    base = plan.base_model or refs[0]
    others = [r for r in refs if r != base]
    if not others:
        raise MergescopeError(f"{plan.source}: the plan merges no model besides its base; nothing to compare")
    return base, others


def _plan_session(path: Path) -> Session:
    """A plan: its base and models; a plan in a demo workspace's plans/ also gets the workspace (its scores,
    its merges/ folder)."""
    plan = load_plan(path)
    base_ref, refs = _plan_models(plan)
    base = open_checkpoint(base_ref)
    models = [open_checkpoint(r, base=base) for r in refs]
    folder = path.resolve().parent
    workspace = next((f for f in (folder, folder.parent) if is_workspace(f)), None)
    return Session(base, models, start="plan", plan_path=path, references=[base_ref, *refs], workspace=workspace)


def _search_session(path: Path) -> Session:
    """A search file: the searched plan's base and models (the plan as the search stored it)."""
    settings, _ = open_for_reading(path)
    if not isinstance(settings.get("plan"), str):
        raise MergescopeError(f"{path}: a search file without its plan; was it written by mergescope tune?")
    plan = parse_plan(settings["plan"], str(settings.get("plan_path") or path))
    base_ref, refs = _plan_models(plan)
    base = open_checkpoint(base_ref)
    models = [open_checkpoint(r, base=base) for r in refs]
    return Session(base, models, start="search", search_path=path, references=[base_ref, *refs])


def _merged_session(folder: Path, base: str | None) -> Session:
    """A merged folder: its plan's base and sources (found as the merge named them, or beside the folder)."""
    context = plan_context_for_folder(folder, base)
    opened = [context.base, *context.sources]
    return Session(context.base, context.sources, start="diagnosis", merged_dir=folder,
                   references=[c.source for c in opened])


def _demo_session(folder: Path) -> Session:
    """A demo workspace: the base and models its manifest names."""
    found = workspace_models(folder)
    base = open_checkpoint(str(found.base))
    models = [open_checkpoint(str(path), base=base) for path in found.models]
    return Session(base, models, workspace=folder, references=[str(found.base), *map(str, found.models)],
                   set_aside=frozenset(map(str, found.set_aside)))
