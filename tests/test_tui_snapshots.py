"""Layout snapshots of the main screens at 80x24 and 160x48 (pytest-textual-snapshot; accept changes with
``pytest tests/test_tui_snapshots.py --snapshot-update`` after looking at the report)."""

from __future__ import annotations

import time

import pytest

from mergescope.tui.app import MergescopeApp
from mergescope.tui.session import open_session
from tui_fixtures import static_text

SIZES = [(80, 24), (160, 48)]


@pytest.fixture
def app(workspace):
    return MergescopeApp(open_session(["base", "ft_a", "ft_b", "ft_c"]), use_cache=False)


async def analysed(pilot) -> None:
    app = pilot.app
    deadline = time.monotonic() + 30
    while not app.state.analysis_done and time.monotonic() < deadline:
        await pilot.pause(0.05)
    await pilot.pause(0.2)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_overview(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=analysed)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer(snap_compare, app, size):
    async def drill(pilot):
        await analysed(pilot)
        await pilot.press("down", "down", "enter")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=drill)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_plan_builder(snap_compare, app, size):
    async def plan(pilot):
        await analysed(pilot)
        await pilot.press("p")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await pilot.pause(0.05)
            status = pilot.app.screen.query("#preview-status")
            if status and static_text(status.first()).startswith("exact"):
                break
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=plan)


def test_demo_overview(snap_compare, tmp_path, monkeypatch):
    """A demo-like workspace at 80x24: names, scores and badges of all seven models and the whole model's
    pairwise matrix with its legend on one screen."""
    import mergescope.demo.session as demo_session
    from tui_fixtures import DEMO_NAMES, demo_like

    names = ["base", *DEMO_NAMES]
    monkeypatch.setattr(demo_session, "evaluate",
                        lambda folder: dict.fromkeys(("add", "reverse", "sort"), 0.3 + 0.1 * names.index(folder.name)))
    folder, _ = demo_like(tmp_path)
    demo_app = MergescopeApp(open_session([str(folder)]), use_cache=False)

    async def scored(pilot):
        await analysed(pilot)
        deadline = time.monotonic() + 30
        while "trap_grown_vocab" not in pilot.app.state.demo_scores and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.pause(0.2)

    assert snap_compare(demo_app, terminal_size=(80, 24), run_before=scored)


def test_help(snap_compare, app):
    async def help_screen(pilot):
        await analysed(pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=(80, 24), run_before=help_screen)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_diagnosis(snap_compare, workspace, tmp_path, size):
    from mergescope.merge.executor import run_merge
    from mergescope.merge.job import build_job
    from mergescope.merge.plan import parse_plan

    plan = "merge_method: ties\nbase_model: base\nmodels:\n" + "".join(
        f"  - {{model: {m}, parameters: {{weight: 1.0, density: 0.5}}}}\n" for m in ("ft_a", "ft_b", "ft_c"))
    run_merge(build_job(parse_plan(plan)), tmp_path / "merged")
    app = MergescopeApp(open_session(["merged"]), use_cache=False)

    async def diagnosed(pilot):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await pilot.pause(0.05)
            screen = pilot.app.screen
            if getattr(screen, "diagnosis", None) is not None and pilot.app.state.analysis_done:
                break
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=size, run_before=diagnosed)


def test_tensor(snap_compare, app):
    async def tensor(pilot):
        await analysed(pilot)
        await pilot.press("down", "down", "enter", "enter")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(80, 24), run_before=tensor)
