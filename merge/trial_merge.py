"""Trial merges, as greedy soups and parameter searches run them: a plan merged into a fresh folder under a
scratch folder, scored with the eval command (:mod:`.evaluation`), and removed."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from mergescope.checkpoints import MergescopeError

from .evaluation import score_with_command
from .executor import run_merge
from .job import build_job
from .plan import MergePlan


def scratch_folder(parent: Path, prefix: str, purpose: str) -> Path:
    """A new folder named ``prefix…`` inside ``parent`` (created when missing); a one-line error naming
    ``purpose`` when it cannot be made. The caller removes it."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        raise MergescopeError(
            f"{parent}: cannot create a scratch folder for {purpose}: {exc.strerror or exc}"
        ) from None


def score_merged_plan(
    plan: MergePlan,
    scratch_root: Path,
    template: str,
    *,
    device: str | None = None,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
    keep: bool = False,
    label: str = "candidate",
) -> float:
    """Merge ``plan`` into a fresh folder under ``scratch_root``, score it with the eval command ``template``,
    and remove the folder (unless ``keep``)."""
    job = build_job(plan)
    folder = scratch_folder(scratch_root, f"{label}-", f"the {label} merge")
    try:
        merged = run_merge(job, folder / "model", device=device, cancel=cancel)
        return score_with_command(template, merged, timeout=timeout, cancel=cancel)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
