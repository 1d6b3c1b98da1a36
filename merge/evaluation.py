"""The evaluation hook: score a model folder with any command that prints a number.

Contract (``--eval-cmd``, ``greedy_soup.eval_cmd``): a command line holding ``{model}``, which is replaced by
the folder of the model to score. The command's LAST non-empty stdout line must be a finite number; higher
is better. Anything it prints before that (progress, logs) is ignored; stderr is only shown when it fails.

The command runs without a shell: it is split like a shell would (:func:`shlex.split`, quotes honoured) and
``{model}`` is substituted inside each argument *after* splitting, so a folder with spaces or quotes in its
name stays one argument and nothing in a path is ever interpreted. For pipes or redirections, ask for a
shell explicitly and pass the folder as ``$0``::

    sh -c 'python eval.py "$0" | tail -n 1' {model}

:func:`score_merged_plan` is what greedy soups and parameter searches use: merge a plan into a scratch
folder, score it with the hook, remove the folder.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from mergescope.checkpoints import MergescopeError

PLACEHOLDER = "{model}"
#: how often a running command checks whether it was cancelled, in seconds
_POLL_S = 0.1


class EvaluationCancelled(MergescopeError):
    """The evaluation was cancelled (Ctrl-C); its command was killed."""


def command_arguments(template: str, model_dir: str | Path) -> list[str]:
    """The argument vector of ``template`` with ``{model}`` replaced by ``model_dir`` in every argument."""
    check_template(template)
    return [part.replace(PLACEHOLDER, str(model_dir)) for part in shlex.split(template)]


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


def parse_score(stdout: str, command: str) -> float:
    """The finite number on the last non-empty line of ``stdout``."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise MergescopeError(f"eval command {command!r} printed nothing; its last stdout line must be the score")
    try:
        score = float(lines[-1])
    except ValueError:
        raise MergescopeError(f"eval command {command!r}: last line {_clip(lines[-1])!r} is not a number; "
                              "print the score (higher is better) last") from None
    if not math.isfinite(score):
        raise MergescopeError(f"eval command {command!r}: the score {lines[-1]!r} is not a finite number")
    return score


def score_with_command(template: str, model_dir: str | Path, timeout: float | None = None,
                       cancel: threading.Event | None = None) -> float:
    """Run the eval command on ``model_dir`` and return its score.

    Raises a one-line :class:`MergescopeError` naming the command when it cannot start, exits non-zero (with
    its last stderr line), runs past ``timeout`` seconds or prints no number last; when ``cancel`` is set
    while it runs, the command is killed and :class:`EvaluationCancelled` raised.
    """
    argv = command_arguments(template, model_dir)
    command = shlex.join(argv)
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    except OSError as exc:
        raise MergescopeError(f"eval command {command!r} cannot start: {exc.strerror or exc}") from None
    stdout, stderr = _wait(process, command, timeout, cancel)
    if process.returncode != 0:
        last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no stderr output")
        raise MergescopeError(f"eval command {command!r} exited with status {process.returncode}: {_clip(last)}")
    return parse_score(stdout, command)


def _wait(process: subprocess.Popen, command: str, timeout: float | None, cancel: threading.Event | None) -> tuple[str, str]:
    """Collect the process's output; kill it on timeout, cancel or any exception (Ctrl-C)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise EvaluationCancelled(f"eval command {command!r} cancelled")
            step = _POLL_S if deadline is None else min(_POLL_S, max(0.0, deadline - time.monotonic()))
            try:
                return process.communicate(timeout=step)
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    raise MergescopeError(f"eval command {command!r} ran longer than {timeout:g} s (its timeout)") from None
    except BaseException:
        process.kill()
        process.communicate()
        raise


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def score_merged_plan(plan, scratch_root: Path, template: str, *, device: str | None = None, timeout: float | None = None,
                      cancel: threading.Event | None = None, keep: bool = False, label: str = "candidate") -> float:
    """Merge ``plan`` (a :class:`~mergescope.merge.plan.MergePlan`) into a fresh folder under ``scratch_root``,
    score it with the eval command, and remove the folder (unless ``keep``)."""
    from .executor import run_merge
    from .job import build_job

    job = build_job(plan)
    folder = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=scratch_root))
    try:
        merged = run_merge(job, folder / "model", device=device, cancel=cancel)
        return score_with_command(template, merged, timeout=timeout, cancel=cancel)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
