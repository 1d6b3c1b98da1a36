"""What the app needs to know about a demo workspace: which models its manifest lists (and which a first plan
leaves out), where merges of it go, and the demo's scores of a model. Plain functions, no Textual."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mergescope.checkpoints import Checkpoint, MergescopeError
from mergescope.demo.evaluate import evaluate
from mergescope.demo.manifest import MANIFEST

#: manifest keys that list models besides the base: the full fine-tunes (under each name the manifest has
#: used), the LoRA adapter and the traps
MODEL_KEYS = ("fine_tunes", "finetunes", "models", "lora", "traps")
#: models a first plan leaves unticked even before the analysis flags them: the traps, and the LoRA twin of a
#: full fine-tune
SET_ASIDE_KEYS = ("lora", "traps")


@dataclass(frozen=True)
class WorkspaceModels:
    """The models of a workspace as paths (the manifest's entries joined to the workspace folder)."""

    base: Path
    models: list[Path]  # every model besides the base, in manifest order
    set_aside: frozenset[Path]  # those of ``models`` a first plan leaves out


def is_workspace(folder: Path) -> bool:
    """Whether ``folder`` holds a demo manifest."""
    return folder.is_dir() and (folder / MANIFEST).is_file()


def workspace_models(folder: Path) -> WorkspaceModels:
    """The base and models the manifest of the workspace at ``folder`` names; a one-line MergescopeError when
    the manifest is unreadable."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return WorkspaceModels(
            base=folder / manifest["base"],
            models=[folder / m for m in manifest_models(manifest)],
            set_aside=frozenset(folder / m for m in manifest_models(manifest, SET_ASIDE_KEYS)),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergescopeError(
            f"{folder / MANIFEST}: unreadable demo manifest ({exc}); rebuild with mergescope demo"
        ) from None


def manifest_models(manifest: dict, keys: tuple[str, ...] = MODEL_KEYS) -> list[str]:
    """The model folders a manifest lists under ``keys`` (each entry a path, or a dict holding it under
    ``path``, ``dir`` or ``name``), without repeats; by default every model besides the base."""
    found: list[str] = []
    for key in keys:
        value = manifest.get(key)
        items = value if isinstance(value, list) else [value] if value else []
        for item in items:
            path = item.get("path") or item.get("dir") or item.get("name") if isinstance(item, dict) else item
            if isinstance(path, str) and path not in found:
                found.append(path)
    return found


def merge_folder(workspace: Path, name: str) -> Path:
    """Where a merge called ``name`` of the workspace's models goes: beside them, under ``merges/``."""
    return workspace / "merges" / name


def score_models(models: Iterable[tuple[str, Checkpoint]]) -> Iterator[tuple[str, dict[str, float]]]:
    """(key, held-out accuracy per demo task) of each (key, checkpoint), as each is scored. Models the demo
    cannot load (another architecture, an adapter it cannot apply) are left out."""
    for key, checkpoint in models:
        try:
            scores = evaluate(checkpoint.root or checkpoint.source)
        except Exception:  # not a demo-architecture model: no score, and no reason to stop
            continue
        yield key, scores
