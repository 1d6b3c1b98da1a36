"""The eval command line: a template holding ``{model}``, checked and expanded without a shell.

Contract (``--eval-cmd``, ``greedy_soup.eval_cmd``): a command line holding ``{model}``, which is replaced by
the folder of the model to score. The command runs without a shell: it is split like a shell would
(:func:`shlex.split`, quotes honoured) and ``{model}`` is substituted inside each argument *after* splitting,
so a folder with spaces or quotes in its name stays one argument and nothing in a path is ever interpreted.
For pipes or redirections, ask for a shell explicitly and pass the folder as ``$0``::

    sh -c 'python eval.py "$0" | tail -n 1' {model}

Running it and reading its score is :mod:`.evaluation`; this module is what a plan's validation needs.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from mergescope.checkpoints import MergescopeError

PLACEHOLDER = "{model}"


def check_template(template: str) -> None:
    """Raise a one-line :class:`MergescopeError` unless ``template`` is a command line holding ``{model}``."""
    if not isinstance(template, str) or not template.strip():
        raise MergescopeError("the eval command is empty: give a command such as 'python eval.py {model}'")
    try:
        parts = shlex.split(template)
    except ValueError as exc:
        raise MergescopeError(f"eval command {template!r}: cannot be split into arguments ({exc})") from None
    if not any(PLACEHOLDER in part for part in parts):
        raise MergescopeError(f"eval command {template!r} has no {PLACEHOLDER}: write where the model folder goes, "
                              "e.g. 'python eval.py {model}'")


def command_arguments(template: str, model_dir: str | Path) -> list[str]:
    """The argument vector of ``template`` with ``{model}`` replaced by ``model_dir`` in every argument."""
    check_template(template)
    return [part.replace(PLACEHOLDER, str(model_dir)) for part in shlex.split(template)]
