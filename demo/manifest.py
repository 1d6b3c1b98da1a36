"""The demo workspace's manifest file: its name, schema and reading. Standard library only, so that the TUI can
recognise a workspace without importing torch (the rest of :mod:`mergescope.demo` trains and evaluates)."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "mergescope-demo.json"
SCHEMA = "mergescope.demo/1"


#: the manifest keys whose values are paths inside the workspace (at any depth)
PATH_KEYS = ("base", "path", "dir", "name")


def read_manifest(root: Path) -> dict | None:
    """The manifest of the workspace at ``root``, or None when there is none, it is unreadable, or it names a
    path outside the workspace (absolute, or through ``..``): a workspace from elsewhere must not make a
    rebuild or a path rewrite write outside its folder."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        return None
    return manifest if all(_inside(path) for path in _paths(manifest)) else None


def _paths(value: object):
    if isinstance(value, dict):
        for key, item in value.items():
            if key in PATH_KEYS and isinstance(item, str):
                yield item
            else:
                yield from _paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _paths(item)


def _inside(path: str) -> bool:
    relative = Path(path)
    return not relative.is_absolute() and ".." not in relative.parts and not path.startswith(("/", "\\", "~"))


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
