"""``mergescope soup MODEL... --eval-cmd CMD -o OUT``: a greedy soup, printed step by step as it is built.

Also runs ``mergescope merge PLAN.yml`` when the plan has a ``mergescope: {greedy_soup: ...}`` block.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from mergescope.merge.plan import PLAN_FILE_NAME, MergePlan
from mergescope.merge.soup import (
    CandidateScored,
    SoupActivity,
    SoupEvent,
    SoupRecipe,
    SoupStep,
    recipe_from_models,
    recipe_from_plan,
    run_greedy_soup,
)

from .signals import Terminated, sigterm_raises, stopped


def run_soup_command(args: argparse.Namespace) -> int:
    return execute_soup(recipe_from_models(args.models), args.eval_cmd, args, timeout=args.timeout)


def run_plan_soup(plan: MergePlan, args: argparse.Namespace) -> int:
    """``mergescope merge`` on a greedy-soup plan: the eval command and timeout come from the plan."""
    block = plan.options["greedy_soup"]
    return execute_soup(recipe_from_plan(plan), block["eval_cmd"], args, timeout=block.get("timeout"))


def execute_soup(recipe: SoupRecipe, eval_cmd: str, args: argparse.Namespace, *, timeout: float | None) -> int:
    console = Console(highlight=False)
    out = Path(args.output)
    printer = _StepPrinter(console, len(recipe.candidates))
    try:
        with sigterm_raises(), console.status("scoring the candidates alone") as status:
            printer.status = status
            result = run_greedy_soup(
                recipe, eval_cmd, out, device=args.device, overwrite=args.force, timeout=timeout,
                keep_scratch=getattr(args, "keep_scratch", False), scratch_dir=getattr(args, "scratch", None),
                on_event=printer,
            )
    except (KeyboardInterrupt, Terminated) as exc:
        word, status = stopped(exc)
        console.print(f"[yellow]{word}: scratch folders removed, nothing was written to {out}[/]")
        return status
    kept = result.ingredients
    console.print(f"[bold]kept {len(kept)} of {len(result.steps)}:[/] {', '.join(escape(m) for m in kept)} · "
                  f"soup score {result.score:.6g}", soft_wrap=True)
    console.print(f"[green]wrote {result.output}[/] (the soup, and its plan as {PLAN_FILE_NAME})", soft_wrap=True)
    return 0


class _StepPrinter:
    """Prints each soup event as it arrives and keeps the spinner's text current."""

    def __init__(self, console: Console, candidates: int):
        self.console = console
        self.candidates = candidates
        self.status = None
        self.scored = 0
        self.best: float | None = None

    def __call__(self, event: SoupEvent) -> None:
        if isinstance(event, SoupActivity):
            if self.status is not None:
                self.status.update(escape(event.message))
        elif isinstance(event, CandidateScored):
            if self.scored == 0:
                self.console.print(f"[bold]scoring {self.candidates} candidates alone[/]")
            self.scored += 1
            self.console.print(f"  {event.score:>12.6g}  {escape(event.model)}", soft_wrap=True)
        elif isinstance(event, SoupStep):
            self._step(event)

    def _step(self, step: SoupStep) -> None:
        if self.best is None:
            self.console.print(
                "[bold]greedy soup[/] (best first; a candidate joins when the soup's score does not drop)"
            )
            self.console.print(f"  [cyan]start   [/] {step.score:>12.6g}  {escape(step.model)}", soft_wrap=True)
        else:
            change = f"{step.score - self.best:+.4g}"
            word = "[green]added   [/]" if step.added else "[red]rejected[/]"
            self.console.print(
                f"  {word} {step.score:>12.6g}  {escape(step.model)}  ({change} vs the soup without it)", soft_wrap=True
            )
        if step.added:
            self.best = step.score
