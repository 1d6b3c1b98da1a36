"""The TUI across vocabularies (Pilot at 80x24): the models pane's vocabulary badge counts added tokens, `t` lists
each model's added and lost tokens, and the plan builder's tokenizer setting previews the output vocabulary."""

from __future__ import annotations

import pytest

import hf_fixtures as hf
from mergescope.tui.app import MergescopeApp
from mergescope.tui.screens.tokens_screen import TokensScreen
from mergescope.tui.session import open_session
from tui_fixtures import run, static_text, wait_for_analysis


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tui-tokens")
    base = hf.write_llama_base(root / "base")
    return {"base": base, "ft": hf.write_fine_tune(base, root / "ft", seed=1),
            "chat": hf.write_chat_fine_tune(base, root / "chat", seed=2)}


def test_badge_and_tokens_view(folders):
    async def body():
        app = MergescopeApp(open_session([str(folders[n]) for n in ("base", "ft", "chat")]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            models = app.screen.query_one("#models")
            checks = "checks"  # the column key (its position depends on the demo score columns)
            assert "✗vocab+3" in str(models.get_cell("chat", checks))
            assert "✓vocab" in str(models.get_cell("ft", checks)) and "+" not in str(models.get_cell("ft", checks))
            await pilot.press("t")
            assert isinstance(app.screen, TokensScreen)
            table = app.screen.query_one("#tokens")
            assert [str(c) for c in table.get_row("chat")][1:] == ["3", "0", "<pad> <|im_start|> <|im_end|>", ""]
            assert [str(c) for c in table.get_row("ft")][1:3] == ["0", "0"]
            assert "over the 43 tokens all share" in static_text(app.screen.query_one("#tokens-note"))
            await pilot.press("escape")
            assert not isinstance(app.screen, TokensScreen)
    run(body)


def test_plan_builder_previews_the_output_vocabulary(folders, tmp_path):
    plan = tmp_path / "plan.yml"
    plan.write_text(f"merge_method: task_arithmetic\nbase_model: {folders['base']}\nmodels:\n"
                    f"  - model: {folders['ft']}\n  - model: {folders['chat']}\n"
                    f"parameters: {{weight: 1.0}}\ntokenizer_source: union\n")

    async def body():
        app = MergescopeApp(open_session([str(plan)]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            for _ in range(100):
                await pilot.pause(0.05)
                if "output vocabulary" in static_text(app.screen.query_one("#vocab-preview")):
                    break
            text = static_text(app.screen.query_one("#vocab-preview"))
            assert "output vocabulary: 46 tokens (+3: <pad>, <|im_start|>, <|im_end|>)" in text
            app.screen.query_one("#tokenizer").value = ""  # not set: the mismatch is refused, naming the setting
            for _ in range(100):
                await pilot.pause(0.05)
                if "tokenizer_source" in static_text(app.screen.query_one("#plan-warnings")):
                    break
            assert "tokenizer_source: union" in static_text(app.screen.query_one("#plan-warnings"))
    run(body)
