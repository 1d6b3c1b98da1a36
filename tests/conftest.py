"""Shared pytest configuration."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "mergekit: compares with mergekit 0.1.5 in its own venv (python benchmarks/mergekit_env.py); "
        "skipped when that venv is missing",
    )
