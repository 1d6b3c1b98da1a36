"""The programs a plan names, and the one rule for running them: a plan is data.

Plans travel: merged models downloaded from strangers carry theirs as ``mergekit_config.yml``. So a plan
never runs a program on its own. The keys whose values are programs are listed here (:data:`COMMAND_KEYS`,
today only ``mergescope.greedy_soup.eval_cmd``); every other key of a plan is data. A program named by a
plan runs only when the person running mergescope allowed it on the command line (``--allow-eval-cmd``);
without that, :func:`check_commands_allowed` stops the merge before anything is opened or written, with one
line saying what the plan wants to run and how to allow it. ``inspect``, ``diagnose`` and the TUI read
plans and never run their programs.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergescope.checkpoints import MergescopeError

from .plan import MergePlan
from .yaml_lines import LinedDict

#: the command-line flag that lets a plan's programs run
ALLOW_FLAG = "--allow-eval-cmd"
#: every plan key (a path under ``mergescope:``) whose value is a program; a new such key goes here
COMMAND_KEYS: tuple[tuple[str, ...], ...] = (("greedy_soup", "eval_cmd"),)


class PlanCommandRefused(MergescopeError):
    """A plan names a program and running it was not allowed on the command line."""


@dataclass(frozen=True)
class PlanCommand:
    """A program a plan names: its key (``mergescope.greedy_soup.eval_cmd``), its line, the command line."""

    key: str
    line: int
    command: str


def plan_commands(plan: MergePlan) -> list[PlanCommand]:
    """Every program ``plan`` names, from its validated ``mergescope:`` options, with the line it is on."""
    found = []
    for path in COMMAND_KEYS:
        value: object = plan.options
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            found.append(PlanCommand("mergescope." + ".".join(path), _line_of(plan.raw, ("mergescope", *path)), value))
    return found


def check_commands_allowed(plan: MergePlan, *, allowed: bool) -> None:
    """Raise :class:`PlanCommandRefused` (one line: the plan's line, the key, the exact command, the flag)
    when ``plan`` names a program and ``allowed`` is false. The only place that decides whether a plan's
    programs may run."""
    commands = plan_commands(plan)
    if commands and not allowed:
        first = commands[0]
        where = f"{plan.source}:{first.line}" if first.line else plan.source
        raise PlanCommandRefused(
            f"{where}: the plan wants to run {first.command!r} ({first.key}); a plan runs no program on its own: "
            f"read it, then pass {ALLOW_FLAG} to run it"
        )


def _line_of(document: object, path: tuple[str, ...]) -> int:
    line = 0
    for part in path:
        if not isinstance(document, LinedDict) or part not in document:
            return line
        line = document.line_of(part)
        document = document[part]
    return line
