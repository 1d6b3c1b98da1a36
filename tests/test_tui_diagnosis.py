"""The diagnosis screen: open a merged folder, read retention per layer and the summary; and `d` after a
run in the app. Numbers checked against numpy on the fixture's tensors and the merged output."""

from __future__ import annotations

import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from mergescope.analysis.diagnosis_groups import GroupDiagnosis
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import parse_plan
from mergescope.tui.app import MergescopeApp
from mergescope.tui.display import retention_text
from mergescope.tui.session import open_session
from mergescope.tui.widgets.run import diagnosis_view
from mergescope.tui.widgets.run.diagnosis_view import DiagnosisFinished, DiagnosisStarted, GroupDiagnosed
from tui_fixtures import Posted, run, static_text, wait_for_analysis

PLAN = """merge_method: ties
base_model: base
models:
  - {model: ft_a, parameters: {weight: 1.0, density: 0.5}}
  - {model: ft_b, parameters: {weight: 1.0, density: 0.5}}
  - {model: ft_c, parameters: {weight: 1.0, density: 0.5}}
dtype: float32
"""


@pytest.fixture
def merged(workspace, tmp_path):
    out = run_merge(build_job(parse_plan(PLAN)), tmp_path / "merged")
    return workspace, load_file(out / "model.safetensors")


async def wait_for(pilot, condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


def retention(states, merged_state, source: str, prefix: str) -> float:
    names = [n for n in states["base"] if n.startswith(prefix)]
    tau = np.concatenate([(states[source][n].double() - states["base"][n].double()).numpy().ravel() for n in names])
    tau_m = np.concatenate(
        [merged_state[n].astype(np.float64).ravel() - states["base"][n].double().numpy().ravel() for n in names]
    )
    return float(tau_m @ tau / (tau @ tau))


def test_open_merged_folder(merged):
    states, merged_state = merged
    posted = Posted()

    async def body():
        app = MergescopeApp(open_session(["merged"]), use_cache=False)
        async with app.run_test(size=(80, 24), message_hook=posted) as pilot:
            await pilot.pause(0.2)
            assert type(app.screen).__name__ == "DiagnosisScreen"
            await wait_for(pilot, lambda: app.screen.diagnosis is not None or app.screen.error)
            assert app.screen.error is None
            table = app.screen.query_one("#diagnosis-table")
            for source in ("ft_a", "ft_b", "ft_c"):
                for group in ("model.layers.2", "all"):
                    prefix = "" if group == "all" else group + "."
                    expected = retention(states, merged_state, source, prefix)
                    assert str(table.get_cell(group, f"{source}:keep")) == str(retention_text(expected))
            summary = static_text(app.screen.query_one("#diagnosis-text"))
            # ft_a and ft_c = base − τ_a cancel: the summary blames the sign election between them
            assert "ft_a" in summary and "ft_c" in summary and "to the sign election where ft_c disagrees" in summary
            # the worker reported by messages: the sources, a message per layer group, then the whole diagnosis
            assert [m.names for m in posted.of(DiagnosisStarted)] == [["ft_a", "ft_b", "ft_c"]]
            groups = [m.group.group for m in posted.of(GroupDiagnosed)]
            assert "model.layers.2" in groups and len(groups) == len(set(groups))
            [finished] = posted.of(DiagnosisFinished)
            assert finished.diagnosis is app.screen.diagnosis
            await pilot.press("escape")
            assert type(app.screen).__name__ == "OverviewScreen"

    run(body)


def test_diagnose_after_a_run(merged, tmp_path):
    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("p")
            app.screen.query_one("#output").value = "run_out"
            app.screen.query_one("#method").focus()
            await pilot.press("r", "ctrl+g")
            await wait_for(pilot, lambda: app.screen.phase == "done")
            await pilot.press("d")
            await pilot.pause(0.1)
            assert type(app.screen).__name__ == "DiagnosisScreen"
            await wait_for(pilot, lambda: app.screen.diagnosis is not None or app.screen.error)
            assert app.screen.error is None
            assert app.screen.diagnosis.names == ["ft_a", "ft_b"]

    run(body)


def test_leaving_a_diagnosis_under_way(merged, monkeypatch):
    """Escape while the diagnosis runs: it stops, and what its worker still reports is dropped, not a crash."""
    stream = diagnosis_view.stream_diagnosis

    def slow_stream(*args, **kwargs):
        """The real stream, held after its first group until the view cancels (so the test does not race it)."""
        for event in stream(*args, **kwargs):
            yield event
            if isinstance(event, GroupDiagnosis):
                kwargs["cancel"].wait(timeout=30)

    monkeypatch.setattr(diagnosis_view, "stream_diagnosis", slow_stream)
    posted = Posted()

    async def body():
        app = MergescopeApp(open_session(["merged"]), use_cache=False)
        async with app.run_test(size=(80, 24), message_hook=posted) as pilot:
            await wait_for(pilot, lambda: posted.of(GroupDiagnosed))
            view = app.screen.query_one("#diagnosis")
            await pilot.press("escape")
            assert type(app.screen).__name__ == "OverviewScreen"
            await wait_for(pilot, lambda: view.cancel.is_set())
            await app.workers.wait_for_complete()
            await pilot.pause(0.2)
            assert not posted.of(DiagnosisFinished)
            await pilot.press("question_mark")
            assert type(app.screen).__name__ == "HelpScreen"

    run(body)
