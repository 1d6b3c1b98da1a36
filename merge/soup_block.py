"""The ``mergescope: {greedy_soup: ...}`` block of a plan: its keys and their validation, with lines.

A greedy-soup plan is an ordinary mergekit ``linear`` plan listing the candidate models with equal weights —
mergekit reads it as the uniform soup of all of them — plus, under the top-level ``mergescope:`` key that
mergekit ignores::

    merge_method: linear
    models: [{model: ./ft-1}, {model: ./ft-2}, {model: ./ft-3}]
    parameters: {weight: 1.0}
    mergescope:
      greedy_soup:
        eval_cmd: "python eval.py {model}" # required: prints the score last (higher is better)
        timeout: 600                       # optional: seconds per evaluation

``mergescope merge`` on such a plan keeps only the models that do not lower the soup's score
(:mod:`.soup`). The rules checked here are what makes "uniform soup of a subset" well defined: method
``linear``, ``models:`` (no slices, no base_model — a base would be merged into every soup), one plain
number as every model's weight, ``normalize`` not false, at least two models.
"""

from __future__ import annotations

from mergescope.checkpoints import MergescopeError

from .eval_command import check_template
from .yaml_lines import LinedDict

GREEDY_SOUP_KEYS = {"eval_cmd": "the eval command, with {model}", "timeout": "seconds per evaluation"}

Problem = tuple[int, str]


def greedy_soup_options(block: object, document: LinedDict, line: int) -> tuple[dict, list[Problem]]:
    """The validated ``greedy_soup`` options and the problems found (each with its line)."""
    if not isinstance(block, LinedDict):
        return {}, [(line, "mergescope.greedy_soup must be a mapping: {eval_cmd: 'python eval.py {model}'}")]
    options, problems = _block_keys(block)
    return options, problems + _plan_shape_problems(document)


def _block_keys(block: LinedDict) -> tuple[dict, list[Problem]]:
    options: dict = {}
    problems: list[Problem] = []
    for key, value in block.items():
        where = block.line_of(key)
        if key not in GREEDY_SOUP_KEYS:
            known = ", ".join(f"{k} ({what})" for k, what in GREEDY_SOUP_KEYS.items())
            problems.append((where, f"unknown greedy_soup option {key!r} (known: {known})"))
        elif key == "eval_cmd":
            try:
                check_template(value)
                options[key] = value
            except MergescopeError as exc:
                problems.append((where, f"greedy_soup.eval_cmd: {exc}"))
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            problems.append((where, f"greedy_soup.timeout must be a positive number of seconds, not {value!r}"))
        else:
            options[key] = float(value)
    if "eval_cmd" not in block:
        problems.append((block.line, "greedy_soup needs eval_cmd: a command that prints the score of {model} last"))
    return options, problems


def _plan_shape_problems(document: LinedDict) -> list[Problem]:
    """What the rest of the plan must look like for a uniform soup of any subset of its models."""
    problems: list[Problem] = []
    if document.get("merge_method") != "linear":
        problems.append(
            (document.line_of("merge_method"), "greedy_soup builds uniform soups: merge_method must be linear")
        )
    if document.get("slices") is not None:
        problems.append((document.line_of("slices"), "greedy_soup chooses among models:, not slices:"))
    if document.get("base_model") is not None:
        problems.append((document.line_of("base_model"), "greedy_soup: a base_model would be merged into every soup; "
                         "remove it, or list it under models: as one more candidate"))
    models = document.get("models")
    if isinstance(models, list) and len(models) < 2:
        problems.append((document.line_of("models"), "greedy_soup needs at least two models to choose from"))
    top = document.get("parameters") if isinstance(document.get("parameters"), LinedDict) else LinedDict()
    if top.get("normalize") is False:
        problems.append((top.line_of("normalize"), "greedy_soup averages: normalize must not be false"))
    return problems + _weight_problems(models if isinstance(models, list) else [], top)


def _weight_problems(models: list, top: LinedDict) -> list[Problem]:
    """Every model's weight (its own, else the top-level one) must be the same plain number."""
    problems: list[Problem] = []
    seen: dict[float, int] = {}
    for entry in models:
        own = entry.get("parameters") if isinstance(entry, LinedDict) else None
        if isinstance(own, LinedDict) and "weight" in own:
            weight, line = own["weight"], own.line_of("weight")
        elif "weight" in top:
            weight, line = top["weight"], top.line_of("weight")
        else:
            continue  # linear's own "weight is required" problem reports it
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append((line, f"greedy_soup averages uniformly: weight must be one number, not {weight!r}"))
            continue
        seen.setdefault(float(weight), line)
    if len(seen) > 1:
        (first, _), (other, line) = list(seen.items())[:2]
        problems.append(
            (line, f"greedy_soup averages uniformly: every model needs the same weight (found {first:g} and {other:g})")
        )
    return problems
