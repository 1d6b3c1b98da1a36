"""Greedy soup (Wortsman et al., 2022, "Model soups", Algorithm 1), built with mergescope's merge engine.

1. Score every candidate alone with the eval command (:mod:`.evaluation`) and sort by score, best first
   (candidates with equal scores keep the order they were given in).
2. Start the soup with the best one. For each next candidate, merge the uniform average of the soup's
   ingredients plus the candidate (a ``linear`` plan, equal weights, ``normalize: true``) into a scratch
   folder, score it, remove it. Keep the candidate when the score does not drop — ``>=``, the paper's rule:
   an ingredient that leaves held-out accuracy unchanged still joins, since averaging more fine-tunes tends
   to help robustness off the held-out set. Otherwise reject it.
3. Merge the soup of the kept ingredients into the output folder.

A candidate that is a complete local model folder (a hub snapshot included) is scored in place; a LoRA
adapter or a single weight file is first written out as a one-model soup. The output's
``mergekit_config.yml`` is the soup as made — the plan with only the kept models and without the
``greedy_soup`` block, so mergescope and mergekit both rebuild exactly this soup from it — under a comment
header recording every step (candidate, its score alone, the soup's score with it, added or rejected).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergescope.checkpoints import Checkpoint, MergescopeError, check_output_folder

from .eval_command import check_template
from .evaluation import score_with_command
from .executor import run_merge
from .job import MergeJob, build_job
from .plan import PLAN_FILE_NAME, MergePlan, PlanError, parse_plan
from .trial_merge import score_merged_plan, scratch_folder
from .yaml_lines import dump_yaml, plain_document


@dataclass(frozen=True)
class CandidateScored:
    """One candidate's score alone (step 1)."""

    model: str
    score: float


@dataclass(frozen=True)
class SoupStep:
    """One candidate considered for the soup: the soup's score with it, whether it was kept, and the soup's
    ingredients after the step. The first step is the best candidate alone (``score == alone``)."""

    model: str
    alone: float
    score: float
    added: bool
    ingredients: tuple[str, ...]


@dataclass(frozen=True)
class SoupActivity:
    """What is running now (for a spinner): merging or evaluating, and of what."""

    message: str


@dataclass
class SoupResult:
    steps: list[SoupStep]
    output: Path

    @property
    def ingredients(self) -> tuple[str, ...]:
        return self.steps[-1].ingredients

    @property
    def score(self) -> float:
        return max(step.score for step in self.steps if step.added)


SoupEvent = CandidateScored | SoupStep | SoupActivity


def rank_by_score(scores: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Candidates sorted by score, best first; equal scores keep their given order."""
    return sorted(scores, key=lambda item: -item[1])


def greedy_selection(
    ranked: Sequence[tuple[str, float]], score_soup: Callable[[tuple[str, ...]], float]
) -> Iterator[SoupStep]:
    """The greedy soup over ``ranked`` (best first, with their scores alone): yields one step per candidate.
    ``score_soup(ingredients)`` scores the uniform soup of those models."""
    if not ranked:
        raise MergescopeError("a greedy soup needs at least one candidate model")
    first, best = ranked[0]
    ingredients: tuple[str, ...] = (first,)
    yield SoupStep(first, best, best, True, ingredients)
    for model, alone in ranked[1:]:
        trial = ingredients + (model,)
        score = score_soup(trial)
        added = score >= best
        if added:
            ingredients, best = trial, score
        yield SoupStep(model, alone, score, added, ingredients)


@dataclass
class SoupRecipe:
    """How to write the soup of any subset of the candidates: a plan document (plain dicts) whose
    ``models`` are the candidates' entries, in the order given."""

    document: dict
    source: str
    candidates: list[str]  # each entry's model reference, as the plan loader resolved it
    original: MergePlan | None = None  # the user's plan, whose lines errors cite

    def check_inputs(self) -> MergeJob:
        """Open every candidate and check they fit together (a :class:`~.job.MergeJob` of them all), citing the
        user's plan lines — or, for models given on the command line, no lines."""
        if self.original is not None:
            return build_job(self.original)
        plan = self.plan(self.candidates)
        try:
            return build_job(plan)
        except PlanError as exc:
            raise MergescopeError(message_without_lines(str(exc), plan.source)) from None

    def plan(self, ingredients: Sequence[str]) -> MergePlan:
        """The uniform soup of ``ingredients`` as a validated plan, without the greedy_soup block."""
        return parse_plan(self.yaml(ingredients), f"{self.source} (soup of {len(ingredients)})")

    def yaml(self, ingredients: Sequence[str]) -> str:
        by_model = dict(zip(self.candidates, self.document["models"]))
        document = {key: ([by_model[m] for m in ingredients] if key == "models" else value)
                    for key, value in self.document.items()}
        return dump_yaml(document)


def recipe_from_models(models: Sequence[str], source: str = "soup") -> SoupRecipe:
    """The recipe for ``mergescope soup MODEL...``: linear, weight 1 each, normalize."""
    document = {"merge_method": "linear", "models": [{"model": str(m)} for m in models],
                "parameters": {"weight": 1.0, "normalize": True}}
    return _checked(SoupRecipe(document, source, [str(m) for m in models]))


def recipe_from_plan(plan: MergePlan) -> SoupRecipe:
    """The recipe for a plan with a ``mergescope: {greedy_soup: ...}`` block (validated by the plan loader)."""
    document = plain_document(plan.raw)
    document["models"] = [{"model": entry} if isinstance(entry, str) else entry for entry in document["models"]]
    block = dict(document.get("mergescope") or {})
    block.pop("greedy_soup", None)
    if block:
        document["mergescope"] = block
    else:
        document.pop("mergescope", None)
    return _checked(SoupRecipe(document, plan.source, [entry.model for entry in plan.models or []], plan))


def message_without_lines(message: str, source: str) -> str:
    """A plan error about a generated plan, without its ``source:line:`` prefixes (lines nobody can see)."""
    return "; ".join(re.sub(rf"^{re.escape(source)}(:\d+)?: ", "", line) for line in message.splitlines())


def _checked(recipe: SoupRecipe) -> SoupRecipe:
    candidates = recipe.candidates
    repeated = sorted({m for m in candidates if candidates.count(m) > 1})
    if repeated:
        raise MergescopeError(f"{recipe.source}: {', '.join(repeated)} listed more than once; list each candidate once")
    if len(candidates) < 2:
        raise MergescopeError(f"{recipe.source}: a greedy soup needs at least two candidate models")
    return recipe


def scores_in_place(checkpoint: Checkpoint) -> bool:
    """Whether the eval command can be given the checkpoint's own folder: a complete local model folder."""
    source = Path(checkpoint.source).expanduser()
    return (checkpoint.kind != "lora" and checkpoint.root is not None and not source.is_file()
            and all(Path(f).parent == checkpoint.root for f in checkpoint.files))


def run_greedy_soup(recipe: SoupRecipe, eval_cmd: str, out: str | Path, *, device: str | None = None,
                    overwrite: bool = False, keep_scratch: bool = False, timeout: float | None = None,
                    scratch_dir: str | Path | None = None, on_event: Callable[[SoupEvent], None] | None = None,
                    cancel: threading.Event | None = None) -> SoupResult:
    """Score the candidates, choose the soup greedily, write it to ``out``; scratch folders are removed
    (unless ``keep_scratch``), also when interrupted."""
    check_template(eval_cmd)
    emit = on_event or (lambda event: None)
    out = Path(out)
    everything = recipe.check_inputs()  # every problem reported before any work
    check_output_folder(out, everything.checkpoints.values(), overwrite=overwrite)
    # beside the output (same disk, which has room for a model) unless scratch_dir is given
    parent = Path(scratch_dir) if scratch_dir else out.absolute().parent
    scratch = scratch_folder(parent, f".{out.name}.soup-scratch-", "the candidate soups")
    try:
        def score_soup(ingredients: tuple[str, ...]) -> float:
            emit(SoupActivity(f"merging and evaluating the soup of {len(ingredients)}: {_names(ingredients)}"))
            return score_merged_plan(recipe.plan(ingredients), scratch, eval_cmd, device=device, timeout=timeout,
                                     cancel=cancel, keep=keep_scratch, label=f"soup-{len(ingredients)}")

        alone = []
        for model in recipe.candidates:
            checkpoint = everything.checkpoints[model]
            if scores_in_place(checkpoint):
                emit(SoupActivity(f"evaluating {checkpoint.name} alone"))
                score = score_with_command(eval_cmd, checkpoint.root, timeout=timeout, cancel=cancel)
            else:
                score = score_soup((model,))
            alone.append((model, score))
            emit(CandidateScored(model, score))
        steps = []
        for step in greedy_selection(rank_by_score(alone), score_soup):
            steps.append(step)
            emit(step)
        emit(SoupActivity(f"writing the soup of {len(steps[-1].ingredients)} to {out}"))
        job = build_job(recipe.plan(steps[-1].ingredients))
        path = run_merge(job, out, device=device, overwrite=overwrite, cancel=cancel)
        _annotate_plan(path / PLAN_FILE_NAME, soup_header(steps, eval_cmd))
        return SoupResult(steps, path)
    finally:
        if not keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _names(models: Sequence[str]) -> str:
    return " + ".join(Path(m).name or m for m in models)


def soup_header(steps: Sequence[SoupStep], eval_cmd: str) -> str:
    """YAML comment lines recording the greedy selection."""
    kept = steps[-1].ingredients
    best = max(step.score for step in steps if step.added)
    lines = [f"greedy soup by mergescope: kept {len(kept)} of {len(steps)} candidates, soup score {best:.6g}",
             f"eval command: {' '.join(eval_cmd.split())}",  # one line, whatever the command holds
             "candidate, score alone, score of the soup with it, decision:"]
    width = max(len(step.model) for step in steps)
    for index, step in enumerate(steps):
        decision = "start (best alone)" if index == 0 else ("added" if step.added else "rejected")
        lines.append(f"  {step.model:<{width}}  {step.alone:>12.6g}  {step.score:>12.6g}  {decision}")
    lines.append(
        "The plan below is the soup of the kept models; the plan with mergescope.greedy_soup reruns the selection."
    )
    return "".join(f"# {line}\n" for line in lines)


def _annotate_plan(path: Path, header: str) -> None:
    """Put ``header`` above the written plan, replacing the file atomically."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(header + path.read_text(encoding="utf-8"), encoding="utf-8")
    os.replace(temporary, path)
