"""The demo's training in a child process, so that its kernels can be pinned before torch loads
(:mod:`.kernels`). The workspace runs ``python -m mergescope.demo.build_process`` and writes one JSON job
to its standard input, ``{"out": FOLDER, "recipe": {...}}``; the child prints one JSON line per progress
report, ``{"stage": …, "done": N, "total": N}``, and last ``{"models": {...}}`` (the manifest's model part).

:func:`run_build` is the parent's side: it starts the child, relays progress, and turns a failure into a
one-line :class:`MergescopeError` carrying the child's last line of error output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mergescope.checkpoints.errors import MergescopeError

from .kernels import build_environment
from .recipe import Recipe, train_models

MODULE = "mergescope.demo.build_process"


def run_build(out: Path, recipe_json: dict, kernels: str, progress=None) -> dict:
    """Train the demo models into ``out`` in a child process with ``kernels``; the manifest's model part."""
    job = json.dumps({"out": str(out), "recipe": recipe_json})
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as errors:
        child = subprocess.Popen(
            [sys.executable, "-m", MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
            env=build_environment(kernels, os.environ), text=True, encoding="utf-8",
        )
        models = None
        try:
            child.stdin.write(job)
            child.stdin.close()
            for line in child.stdout:
                message = json.loads(line)
                if "models" in message:
                    models = message["models"]
                elif progress is not None:
                    progress(message["stage"], message["done"], message["total"])
            code = child.wait()
        finally:
            if child.poll() is None:  # interrupted: the child's training dies with the build
                child.kill()
                child.wait()
        if code != 0 or models is None:
            errors.seek(0)
            lines = [line.strip() for line in errors.read().splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {code}"
            raise MergescopeError(f"training the demo models failed: {reason}")
    return models


def main() -> None:
    job = json.load(sys.stdin)

    def report(stage: str, done: int, total: int) -> None:
        print(json.dumps({"stage": stage, "done": done, "total": total}), flush=True)

    models = train_models(Path(job["out"]), Recipe.from_json(job["recipe"]), report)
    print(json.dumps({"models": models}), flush=True)


if __name__ == "__main__":
    main()
