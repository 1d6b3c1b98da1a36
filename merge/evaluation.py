"""Running the eval command on a model folder and reading its score.

The command (:mod:`.eval_command`: a template holding ``{model}``, run without a shell) must print a finite
number as its LAST non-empty stdout line; higher is better. Anything it prints before that (progress, logs)
is ignored; stderr is only shown when it fails.

Merging a plan into a scratch folder and scoring it, as greedy soups and parameter searches do, is
:mod:`.trial_merge`.
"""

from __future__ import annotations

import math
import shlex
import subprocess
import threading
import time
from pathlib import Path

from mergescope.checkpoints import Cancelled, MergescopeError

from .eval_command import command_arguments

#: how often a running command checks whether it was cancelled, in seconds
_POLL_S = 0.1


class EvaluationCancelled(Cancelled):
    """The evaluation was cancelled (Ctrl-C); its command was killed."""


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
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
    except OSError as exc:
        raise MergescopeError(f"eval command {command!r} cannot start: {exc.strerror or exc}") from None
    stdout, stderr = _wait(process, command, timeout, cancel)
    if process.returncode != 0:
        last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no stderr output")
        raise MergescopeError(f"eval command {command!r} exited with status {process.returncode}: {_clip(last)}")
    return parse_score(stdout, command)


def _wait(
    process: subprocess.Popen, command: str, timeout: float | None, cancel: threading.Event | None
) -> tuple[str, str]:
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
                    raise MergescopeError(
                        f"eval command {command!r} ran longer than {timeout:g} s (its timeout)"
                    ) from None
    except BaseException:
        process.kill()
        process.communicate()
        raise


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
