"""Plan builder and run panel at 80x24: edit a weight and watch the preview move, save the plan, run it
(output compared with a direct merge of the saved plan), cancel a run, a run that fails; and the messages
the screens post on the way."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan, parse_plan
from mergescope.tui.app import MergescopeApp
from mergescope.tui.screens.plan_screen import PlanRejected, PlanValidated, PreviewUpdated
from mergescope.tui.screens.run_screen import MergeCancelled, MergeFailed, MergeFinished, MergeStarted
from mergescope.tui.session import open_session
from mergescope.tui.widgets.plan.model_fields import ModelFieldsChanged
from tui_fixtures import Posted, run, static_text, wait_for_analysis


async def wait_until(pilot, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.05)


async def set_input(pilot, app, selector: str, text: str) -> None:
    box = app.screen.query_one(selector)
    box.focus()
    await pilot.press("end", *["backspace"] * (len(box.value) + 1), *text)


async def open_run_screen(pilot, app, output: str | None = None) -> None:
    """From the overview once the analysis is done: open the builder, set the output (if given), press r."""
    await wait_for_analysis(app, pilot)
    await pilot.press("p")
    if output is not None:
        await set_input(pilot, app, "#output", output)
    app.screen.query_one("#method").focus()
    await pilot.press("r")


async def start_run(pilot, app, output: str | None = None) -> None:
    """:func:`open_run_screen`, then Ctrl+G starts the merge."""
    await open_run_screen(pilot, app, output)
    await pilot.press("ctrl+g")


def exact_row(app, label: str) -> list[str]:
    table = app.screen.query_one("#preview")
    return [str(cell) for cell in table.get_row(label)]


def log_lines(app) -> list[str]:
    """The run screen's log, line by line."""
    return [line.text for line in app.screen.query_one("#run-log").lines]


def test_plan_preview_save_and_run(workspace, tmp_path):
    posted = Posted()

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24), message_hook=posted) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("p")
            screen = app.screen
            status = lambda: static_text(screen.query_one("#preview-status"))  # noqa: E731
            await wait_until(pilot, lambda: status().startswith("exact"))
            # task arithmetic with weights 1 and 0.25: retention of a source = its weight plus the other's
            # projection, computed here from the tensors
            method = screen.query_one("#method")
            before = screen.query_one("#param-1-weight")
            method.value = "task_arithmetic"

            def rebuilt() -> bool:  # the form replaces its fields: wait for the new weight box
                found = screen.query("#param-1-weight")
                return bool(found) and found.first() is not before

            await wait_until(pilot, rebuilt)
            await set_input(pilot, app, "#param-1-weight", "0.25")
            await wait_until(
                pilot, lambda: status().startswith("exact") and screen.form.models[1].fields["weight"] == "0.25"
            )
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
            await wait_until(pilot, lambda: app.screen.phase in ("done", "failed"))
            assert app.screen.phase == "done"
            await wait_until(pilot, lambda: app.state.last_merge is not None)
            assert [m.output for m in posted.of(MergeStarted)] == [Path("out_tui")]
            assert [m.output for m in posted.of(MergeFinished)] == [Path("out_tui")]
            assert not posted.of(MergeFailed) and not posted.of(MergeCancelled)
            # the app keeps what the screens reported: the plan that ran, the merge's folder, no merge running
            assert app.state.last_merge == Path("out_tui") and not app.state.merging
            assert parse_plan(app.state.plan_text) == parse_plan(posted.of(PlanValidated)[-1].plan_text)
            assert parse_plan(app.state.plan_text).models[1].parameters["weight"] == 0.25
            assert "done: out_tui — its diagnosis below (d: full screen · Escape: back)" in log_lines(app)
        return True

    run(body)
    direct = run_merge(build_job(load_plan(tmp_path / "plans" / "ta.yml")), tmp_path / "out_direct")
    ours, reference = load_file(tmp_path / "out_tui" / "model.safetensors"), load_file(direct / "model.safetensors")
    assert ours.keys() == reference.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], reference[name])


def test_model_fields_post_their_changes(workspace):
    """Unticking a model and typing a parameter each post ModelFieldsChanged; the plan and its preview follow,
    and a parameter that is not YAML is rejected."""
    posted = Posted()

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24), message_hook=posted) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("p")
            await pilot.pause(0.2)
            screen = app.screen
            screen.query_one("#use-1").focus()
            await pilot.press("space")
            await set_input(pilot, app, "#param-0-density", "0.3")
            changes = [(m.index, m.model, m.included, m.parameter, m.text) for m in posted.of(ModelFieldsChanged)]
            unticked = changes.index((1, "ft_b", False, None, ""))
            assert changes[-1] == (0, "ft_a", True, "density", "0.3") and unticked < len(changes) - 1
            assert [(row.reference, row.included, row.fields["density"]) for row in screen.form.models] == [
                ("ft_a", True, "0.3"), ("ft_b", False, screen.form.models[1].fields["density"])]
            await wait_until(pilot, lambda: "0.3" in (app.state.plan_text or ""))
            plan = parse_plan(app.state.plan_text)
            assert [(m.model, m.parameters["density"]) for m in plan.models] == [("ft_a", 0.3)]
            # each edit supersedes the preview under way; the screen shows only the latest's messages
            def latest(kind: type) -> list:
                return [m for m in posted.of(kind) if not m.cancel.is_set()]

            await wait_until(pilot, lambda: [m.status for m in latest(PreviewUpdated)][-1:] == ["exact preview"])
            assert latest(PreviewUpdated)[-1].names == ["ft_a"] and screen.query_one("#preview").names == ["ft_a"]
            await set_input(pilot, app, "#param-0-density", "[0.3")
            await wait_until(pilot, lambda: latest(PlanRejected))
            assert "not YAML" in latest(PlanRejected)[-1].problem
            await pilot.pause(0.1)
            assert static_text(screen.query_one("#preview-status")).strip() == "the plan has problems:"

    run(body)


def test_cancel_a_run(workspace, tmp_path, monkeypatch):
    import mergescope.merge.executor as executor

    slow = executor.merge_tensor

    def slow_merge(*args, **kwargs):
        time.sleep(0.05)
        return slow(*args, **kwargs)

    monkeypatch.setattr(executor, "merge_tensor", slow_merge)
    posted = Posted()

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24), message_hook=posted) as pilot:
            await start_run(pilot, app, "out_cancelled")
            await wait_until(pilot, lambda: app.screen.query_one("#merge-bar").progress > 0)
            await pilot.press("c")
            await wait_until(pilot, lambda: app.screen.phase != "running")
            assert app.screen.phase == "cancelled"
            await wait_until(pilot, lambda: not app.state.merging)
            assert [m.output for m in posted.of(MergeCancelled)] == [Path("out_cancelled")]
            assert not posted.of(MergeFinished) and not posted.of(MergeFailed)
            assert app.state.last_merge is None
            assert log_lines(app)[-1] == "cancelled; nothing was written to out_cancelled"
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
            await start_run(pilot, app)
            await wait_until(pilot, lambda: app.state.merge_cancel is not None)
            await pilot.press("q")
            await pilot.pause(0.1)
            assert type(app.screen).__name__ == "ConfirmScreen"
            await pilot.press("n")
            assert type(app.screen).__name__ == "RunScreen"
            await pilot.press("q", "y")
            await pilot.pause(0.3)

    run(body)


def test_a_failed_run_posts_merge_failed(workspace, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("not a merge")
    posted = Posted()

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24), message_hook=posted) as pilot:
            await start_run(pilot, app, "taken")
            await wait_until(pilot, lambda: app.screen.phase != "running")
            assert app.screen.phase == "failed"
            await wait_until(pilot, lambda: not app.state.merging)
            [failed] = posted.of(MergeFailed)
            assert failed.output == Path("taken") and "folder exists and is not empty" in failed.error
            assert not posted.of(MergeFinished) and app.state.last_merge is None
            assert f"failed: {failed.error}" in " ".join(log_lines(app))  # the log wraps long lines

    run(body)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_the_run_log_counts_tensors_once_whatever_the_blocks_and_passes(workspace):
    """A tensor in row blocks reports every block and every block of its first passes; the log still says
    "n/N" once per 25 tensors and at the end (it wrote a line per block of the first tensor before)."""
    from mergescope.merge.executor import MergeProgress
    from mergescope.tui.screens.run_screen import MergeProgressed

    events = [(0, "pass 1 (50%) · big"), (0, "pass 1 (100%) · big"), (0, "big"), (1, "big")]
    events += [(n, f"t{n}") for n in range(2, 26)] + [(25, "pass 1 (100%) · t26"), (25, "t26"), (26, "t26")]
    events += [(n, f"t{n}") for n in range(27, 40)]

    async def body():
        app = MergescopeApp(open_session(["base", "ft_a", "ft_b"]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await open_run_screen(pilot, app)
            await pilot.pause(0.1)
            screen = app.screen
            assert type(screen).__name__ == "RunScreen"
            for done, label in events:
                screen.post_message(MergeProgressed(MergeProgress(label, done, 39, done, 39, 1.0, None)))
            await pilot.pause(0.2)
            assert [line for line in log_lines(app) if line[:1].isdigit()] == ["25/39 t25", "39/39 t39"]

    run(body)
