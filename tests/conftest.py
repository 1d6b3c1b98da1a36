"""Shared pytest configuration."""


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
