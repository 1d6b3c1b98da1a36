"""``build_workspace(DIR)``: train the demo models and lay out a workspace that every mergescope command opens.

DIR holds

- ``base/`` — a small Llama-architecture model pre-trained on the easy half of every task
- ``ft_add/``, ``ft_reverse/``, ``ft_sort/`` — full fine-tunes of the base, one task each, different lengths
- ``lora_sort/`` — a LoRA fine-tune, saved as a PEFT adapter whose ``base_model_name_or_path`` is DIR/base
- ``trap_other_base/`` — a fine-tune of a *different* base (another initialisation): merging it breaks
- ``trap_grown_vocab/`` — a fine-tune whose vocabulary grew by 8 characters (more embedding/head rows)
- ``plans/*.yml`` — mergekit plans (see :mod:`.plans`)
- ``mergescope-demo.json`` — the manifest: what is where, the tasks, each model's measured accuracy, the
  recipe, the seed, the kernels and a SHA-256 of each model's weights

The models are trained in a child process with pinned kernels (:mod:`.kernels`, :mod:`.build_process`), so
a seed gives the same bytes on every x86-64 machine; accuracies are measured here, in the caller's process,
as ``mergescope eval`` measures them. The build is written into a hidden temporary folder renamed into place
when complete, and is skipped when DIR already holds a manifest of this builder version, recipe and kernels.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import torch

from mergescope.checkpoints import MergescopeError

from .build_process import run_build
from .evaluate import evaluate
from .kernels import PORTABLE
from .manifest import SCHEMA, read_manifest, write_manifest
from .plans import demo_plans, write_plans
from .recipe import DEFAULT_RECIPE, BuildProgress, Recipe, write_adapter_base
from .tasks import TASK_DESCRIPTIONS

#: bump when a change to the recipe's code (not its numbers) changes what a build produces
BUILDER_VERSION = 2


def _weights_digest(folder: Path) -> str:
    """SHA-256 of a model folder's weight files, in name order: equal digests, byte-identical weights."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _measure(out: Path, models: dict) -> tuple[dict, dict]:
    """Each model folder's accuracy per task (rounded to 1e-4) and weights digest."""
    folders = [models["base"], *(e["path"] for e in models["fine_tunes"] + models["lora"] + models["traps"])]
    accuracy = {f: {t: round(v, 4) for t, v in evaluate(out / f).items()} for f in folders}
    return accuracy, {f: _weights_digest(out / f) for f in folders}


# --- the workspace --------------------------------------------------------------------------------------------
def _is_current(manifest: dict | None, recipe: Recipe, kernels: str) -> bool:
    return (bool(manifest) and manifest.get("builder_version") == BUILDER_VERSION
            and manifest.get("recipe") == recipe.to_json() and manifest.get("kernels") == kernels)


def _plans_for(manifest: dict):
    fine_tunes = {f["task"]: f["path"] for f in manifest["fine_tunes"]}
    return demo_plans(fine_tunes, manifest["base"], "trap_other_base")


def _write_path_files(folder: Path, root: Path, manifest: dict, recipe: Recipe) -> None:
    """The files that hold absolute paths (plans, the adapter's base), written for a workspace at ``root``."""
    write_plans(_plans_for(manifest), folder / "plans", root)
    for lora in manifest["lora"]:
        write_adapter_base(folder / lora["path"], root / manifest["base"], recipe)


def build_workspace(directory: str | os.PathLike, progress: BuildProgress | None = None, *,
                    recipe: Recipe = DEFAULT_RECIPE, kernels: str = PORTABLE) -> Path:
    """Build the demo workspace in ``directory`` (or reuse the one there) and return its absolute path.

    ``recipe`` says what to train (``Recipe(seed=N)`` for another seed), ``kernels`` how (:mod:`.kernels`).
    A folder that exists, is not empty and holds no demo manifest is refused (nothing of the user's is
    replaced); one holding an older build is rebuilt; one holding this build at another path (moved or
    copied) gets its plan and adapter paths rewritten.
    """
    root = Path(directory).expanduser().resolve()
    manifest = read_manifest(root)
    if _is_current(manifest, recipe, kernels):
        if manifest["root"] != str(root):
            _write_path_files(root, root, manifest, recipe)
            write_manifest(root, {**manifest, "root": str(root)})
        return root
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and manifest is None)):
        raise MergescopeError(f"{root}: exists and is not a mergescope demo workspace; choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        start = time.perf_counter()
        models = run_build(tmp, recipe.to_json(), kernels, progress)
        train_seconds = time.perf_counter() - start
        if progress is not None:
            progress("measuring accuracies", recipe.total_steps, recipe.total_steps)
        accuracy, weights = _measure(tmp, models)
        manifest = {
            "schema": SCHEMA,
            "builder_version": BUILDER_VERSION,
            "root": str(root),
            **models,
            "plans": [],
            "tasks": dict(TASK_DESCRIPTIONS),
            "accuracy": accuracy,
            "weights_sha256": weights,
            "recipe": recipe.to_json(),
            "seed": recipe.seed,
            "kernels": kernels,
            "torch": torch.__version__,
            "train_seconds": round(train_seconds, 1),
        }
        manifest["plans"] = [{"path": f"plans/{p.filename}", "method": p.method, "description": p.description}
                             for p in _plans_for(manifest)]
        _write_path_files(tmp, root, manifest, recipe)
        manifest["build_seconds"] = round(time.perf_counter() - start, 1)
        write_manifest(tmp, manifest)
        if progress is not None:
            progress("done", recipe.total_steps, recipe.total_steps)
        _replace(tmp, root, recipe, kernels)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _replace(tmp: Path, root: Path, recipe: Recipe, kernels: str) -> None:
    """Move the finished build to ``root``; an old build there is removed after the move, and a concurrent
    build that finished first is kept."""
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        if not _is_current(read_manifest(root), recipe, kernels):
            raise MergescopeError(f"{root}: could not move the finished workspace into place") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
