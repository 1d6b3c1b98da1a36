"""What ``mergescope inspect`` opens for each kind of target, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mergescope.demo.session as demo_session
import mergescope.tui.screens.run_screen as run_screen
from mergescope.checkpoints import MergescopeError
from mergescope.demo.manifest import MANIFEST
from mergescope.demo.session import manifest_models
from mergescope.merge.plan import load_plan
from mergescope.tui.app import MergescopeApp, ModelScored
from mergescope.tui.screens.run_screen import MergeScored, MergeScoringFailed
from mergescope.tui.session import open_session
from mergescope.tui.state import BASE_KEY
from tui_fixtures import Posted, run, wait_for_analysis

PLAN = """merge_method: dare_ties
base_model: base
models:
  - model: ft_a
    parameters: {weight: [0.2, 0.8], density: 0.6}
  - model: ft_c
    parameters: {weight: 0.5, density: 0.4}
parameters: {normalize: false}
dtype: float32
mergescope: {seed: 3}
"""


@pytest.fixture
def workspace(workspace, tmp_path):
    """The shared workspace (conftest) with plan.yml; its folder."""
    (tmp_path / "plan.yml").write_text(PLAN)
    return tmp_path


def test_base_and_models(workspace):
    session = open_session(["base", "ft_a", "ft_b"])
    assert session.start == "overview" and [m.name for m in session.models] == ["ft_a", "ft_b"]


def test_plan_opens_builder_with_its_models(workspace):
    session = open_session(["plan.yml"])
    assert session.start == "plan" and session.references == ["base", "ft_a", "ft_c"]


def test_plan_in_builder_round_trips(workspace):
    async def body():
        app = MergescopeApp(open_session(["plan.yml"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.pause(0.2)
            assert type(app.screen).__name__ == "PlanScreen"
            assert app.screen.query_one("#param-0-weight").value == "[0.2, 0.8]"
            app.screen.query_one("#plan-file").value = "saved.yml"
            await pilot.press("ctrl+s")
            await pilot.pause(0.1)

    run(body)
    original, saved = load_plan(workspace / "plan.yml"), load_plan(workspace / "saved.yml")
    for key in ("merge_method", "base_model", "parameters", "dtype", "options"):
        assert getattr(saved, key) == getattr(original, key)
    assert [(m.model, m.parameters) for m in saved.models] == [(m.model, m.parameters) for m in original.models]


def test_demo_manifest_models(workspace):
    manifest = {"base": "base", "fine_tunes": [{"path": "ft_a"}, {"path": "ft_b"}], "traps": ["ft_c"]}
    (workspace / MANIFEST).write_text(json.dumps(manifest))
    session = open_session([str(workspace)])
    assert session.workspace == workspace and [m.name for m in session.models] == ["ft_a", "ft_b", "ft_c"]
    assert manifest_models({"models": ["x"], "lora": {"path": "y"}}) == ["x", "y"]
    assert session.set_aside == {str(workspace / "ft_c")}  # the trap, before any analysis has flagged it

    async def body():
        app = MergescopeApp(session, use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("p")
            await pilot.pause(0.2)
            return [(row.name, row.included) for row in app.screen.form.models]

    assert run(body) == [("ft_a", True), ("ft_b", True), ("ft_c", False)]


def test_demo_workspace_scores_its_models_and_each_merge(workspace, monkeypatch):
    """The demo's scores of the workspace's models reach the models table, and a merge made in the app is
    scored into the run log; models the demo cannot score are left out, a merge it cannot score is said so."""
    (workspace / MANIFEST).write_text(json.dumps({"base": "base", "fine_tunes": [{"path": "ft_a"}, {"path": "ft_b"}]}))
    accuracy = {"base": 0.2, "ft_a": 0.9, "ties": 0.7}

    def evaluate(folder) -> dict[str, float]:  # the demo's evaluator, without demo models to run
        name = Path(folder).name
        if name not in accuracy:
            raise MergescopeError(f"{folder}: not a demo model")
        return {"add": accuracy[name], "sort": 0.1}

    monkeypatch.setattr(demo_session, "evaluate", evaluate)
    monkeypatch.setattr(run_screen, "evaluate", evaluate)
    posted = Posted()

    async def until(pilot, condition) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await pilot.pause(0.05)

    async def run_plan(pilot, app) -> None:
        app.screen.query_one("#method").focus()
        await pilot.press("r", "ctrl+g")
        await until(pilot, lambda: app.screen.phase == "done")

    def run_log(app) -> list[str]:
        return [line.text for line in app.screen.query_one("#run-log").lines]

    async def body():
        app = MergescopeApp(open_session(["."]), use_cache=False)
        async with app.run_test(size=(80, 24), message_hook=posted) as pilot:
            await wait_for_analysis(app, pilot)
            await until(pilot, lambda: "ft_a" in app.state.demo_scores)
            assert [(m.key, m.scores["add"]) for m in posted.of(ModelScored)] == [(BASE_KEY, 0.2), ("ft_a", 0.9)]
            models = app.screen.query_one("#models")
            assert [str(models.get_cell(key, "add")) for key in (BASE_KEY, "ft_a", "ft_b")] == ["20%", "90%", "…"]
            # a first plan merges into the workspace's merges/ folder
            await pilot.press("p")
            assert app.screen.query_one("#output").value == "merges/ties"
            await run_plan(pilot, app)
            await until(pilot, lambda: posted.of(MergeScored))
            [scored] = posted.of(MergeScored)
            assert scored.output == Path("merges/ties") and scored.scores == {"add": 0.7, "sort": 0.1}
            assert app.state.demo_scores["merges/ties"] == {"add": 0.7, "sort": 0.1}
            assert "demo scores of merges/ties: add 70%  sort 10%" in run_log(app)
            await pilot.press("escape")
            app.screen.query_one("#output").value = "merges/other"
            await run_plan(pilot, app)
            await until(pilot, lambda: posted.of(MergeScoringFailed))
            [failed] = posted.of(MergeScoringFailed)
            assert failed.output == Path("merges/other") and failed.error == "merges/other: not a demo model"
            assert "demo evaluation failed: merges/other: not a demo model" in run_log(app)
            assert "merges/other" not in app.state.demo_scores

    run(body)


@pytest.mark.parametrize("targets, message", [
    (["ft_a"], "give a base and at least one model"),
    (["missing", "ft_a"], "missing"),
])
def test_errors_are_one_line(workspace, targets, message):
    with pytest.raises(MergescopeError, match=message):
        open_session(targets)
    result = subprocess.run([sys.executable, "-m", "mergescope.tui.cli.main", "inspect", *targets],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
