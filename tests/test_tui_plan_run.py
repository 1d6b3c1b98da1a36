"""Plan builder and run panel at 80x24: edit a weight and watch the preview move, save the plan, run it
(output compared with a direct merge of the saved plan), cancel a run."""

from __future__ import annotations

import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan
from mergescope.tui.app import MergescopeApp
from mergescope.tui.session import open_session
from tui_fixtures import build_models, run, static_text, wait_for_analysis


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    states = build_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGESCOPE_CACHE_DIR", str(tmp_path / "cache"))
    return states


async def wait_until(pilot, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


async def set_input(pilot, app, selector: str, text: str) -> None:
    box = app.screen.query_one(selector)
    box.focus()
    await pilot.press("end", *["backspace"] * (len(box.value) + 1), *text)


def exact_row(app, label: str) -> list[str]:
    table = app.screen.query_one("#preview")
    return [str(cell) for cell in table.get_row(label)]


def test_plan_preview_save_and_run(workspace, tmp_path):
    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("p")
            screen = app.screen
            status = lambda: static_text(screen.query_one("#preview-status"))  # noqa: E731
            await wait_until(pilot, lambda: status().startswith("exact"))
            # task arithmetic with weights 1 and 0.25: retention of a source = its weight plus the other's
            # projection, computed here from the tensors
            method = screen.query_one("#method")
            method.value = "task_arithmetic"
            await pilot.pause(0.2)
            await set_input(pilot, app, "#param-1-weight", "0.25")
            await wait_until(pilot, lambda: status().startswith("exact") and screen.form.models[1].fields["weight"] == "0.25")
            await pilot.pause(0.5)
            await wait_until(pilot, lambda: status().startswith("exact"))
            base, a, b = (workspace[n] for n in ("base", "ft_a", "ft_b"))
            tau_a = np.concatenate([(a[k] - base[k]).double().numpy().ravel() for k in base])
            tau_b = np.concatenate([(b[k] - base[k]).double().numpy().ravel() for k in base])
            merged = 1.0 * tau_a + 0.25 * tau_b
            retention = [merged @ tau_a / (tau_a @ tau_a), merged @ tau_b / (tau_b @ tau_b)]
            row = exact_row(app, "all")
            assert row[2:] == [f"{r * 100:.0f}%" for r in retention]
            # save
            await set_input(pilot, app, "#plan-file", "plans/ta.yml")
            await pilot.press("ctrl+s")
            plan = load_plan(tmp_path / "plans" / "ta.yml")
            assert plan.merge_method == "task_arithmetic" and plan.base_model == "base"
            assert [(m.model, m.parameters["weight"]) for m in plan.models] == [("ft_a", 1.0), ("ft_b", 0.25)]
            # run
            await set_input(pilot, app, "#output", "out_tui")
            screen.query_one("#method").focus()
            await pilot.press("r")
            await pilot.pause(0.1)
            assert type(app.screen).__name__ == "RunScreen"
            await pilot.press("ctrl+g")
            await wait_until(pilot, lambda: app.screen.state in ("done", "failed"))
            assert app.screen.state == "done"
        return True

    run(body)
    direct = run_merge(build_job(load_plan(tmp_path / "plans" / "ta.yml")), tmp_path / "out_direct")
    ours, reference = load_file(tmp_path / "out_tui" / "model.safetensors"), load_file(direct / "model.safetensors")
    assert ours.keys() == reference.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], reference[name])


def test_cancel_a_run(workspace, tmp_path, monkeypatch):
    import mergescope.merge.executor as executor

    slow = executor.merge_tensor

    def slow_merge(*args, **kwargs):
        time.sleep(0.05)
        return slow(*args, **kwargs)

    monkeypatch.setattr(executor, "merge_tensor", slow_merge)

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("p")
            await set_input(pilot, app, "#output", "out_cancelled")
            app.screen.query_one("#method").focus()
            await pilot.press("r")
            await pilot.press("ctrl+g")
            await wait_until(pilot, lambda: app.screen.query_one("#merge-bar").progress > 0)
            await pilot.press("c")
            await wait_until(pilot, lambda: app.screen.state != "running")
            assert app.screen.state == "cancelled"
            assert app.state.merge_cancel is None
            await pilot.press("escape")
            assert type(app.screen).__name__ == "PlanScreen"

    run(body)
    assert not (tmp_path / "out_cancelled").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out_cancelled")]


def test_quit_asks_while_a_merge_runs(workspace, monkeypatch):
    import mergescope.merge.executor as executor

    slow = executor.merge_tensor
    monkeypatch.setattr(executor, "merge_tensor", lambda *a, **k: (time.sleep(0.05), slow(*a, **k))[1])

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("p")
            app.screen.query_one("#method").focus()
            await pilot.press("r", "ctrl+g")
            await wait_until(pilot, lambda: app.state.merge_cancel is not None)
            await pilot.press("q")
            await pilot.pause(0.1)
            assert type(app.screen).__name__ == "ConfirmScreen"
            await pilot.press("n")
            assert type(app.screen).__name__ == "RunScreen"
            await pilot.press("q", "y")
            await pilot.pause(0.3)

    run(body)
