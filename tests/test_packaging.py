"""The wheel must carry every subpackage: each folder with an __init__.py is mapped in pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = {"checkpoints", "analysis", "merge", "tui", "demo"}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is 3.11+")
def test_every_package_folder_is_listed():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    folders = {
        str(init.parent.relative_to(ROOT))
        for top in TOP_LEVEL
        for init in (ROOT / top).rglob("__init__.py")
    }
    expected = {"mergescope." + folder.replace("/", "."): folder for folder in folders}
    assert set(config["packages"]) == set(expected)
    for package, folder in expected.items():
        assert mapping.get(package, None) in (folder, None), package
        top = package.split(".")[1]
        assert mapping[f"mergescope.{top}"] == top
