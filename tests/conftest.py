"""Shared pytest configuration and fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tui_fixtures import build_models


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "mergekit: compares with mergekit 0.1.5 in its own venv (python benchmarks/mergekit_env.py); "
        "skipped when that venv is missing",
    )
    config.addinivalue_line(
        "markers",
        "demo_study: builds the demo workspace and merges real plans to hold a diagnosis statistic to measured "
        "accuracies (tests/test_diagnosis_study.py; a few minutes on 2 cores; deselect with -m 'not demo_study')",
    )


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """Every test's own analysis cache (``$MERGESCOPE_CACHE_DIR``), never the user's; outside ``tmp_path``, so
    tests that list ``tmp_path`` see only what they wrote."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MERGESCOPE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """base, ft_a, ft_b and ft_c (:func:`tui_fixtures.build_models`) written into ``tmp_path``, which becomes
    the current folder, so plans and sessions name them as ``base``, ``ft_a``…; returns their states."""
    states = build_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    return states
