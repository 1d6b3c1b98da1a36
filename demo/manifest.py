"""The demo workspace's manifest file: its name, schema and reading. Standard library only, so that the TUI can
recognise a workspace without importing torch (the rest of :mod:`mergescope.demo` trains and evaluates)."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "mergescope-demo.json"
SCHEMA = "mergescope.demo/1"


def read_manifest(root: Path) -> dict | None:
    """The manifest of the workspace at ``root``, or None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("schema") == SCHEMA else None


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
