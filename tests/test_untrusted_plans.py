"""A plan is data: a program it names runs only with --allow-eval-cmd; inspect, diagnose, tune and the TUI
read plans (and merged folders holding them) and never run what they name."""

from __future__ import annotations

import shlex

import pytest
import torch
import yaml

from builders import llama_config, llama_state, write_model
from mergescope.merge.plan import MERGESCOPE_KEYS, load_plan, parse_plan
from mergescope.merge.plan_commands import COMMAND_KEYS, PlanCommandRefused, check_commands_allowed, plan_commands
from mergescope.merge.soup_block import GREEDY_SOUP_KEYS
from mergescope.tui.app import MergescopeApp
from mergescope.tui.cli.main import main
from mergescope.tui.session import open_session
from tui_fixtures import run, wait_for_analysis


def hostile_command(marker) -> str:
    """What a stranger's plan might hold: a shell that leaves a file behind, and prints a score."""
    return f"sh -c 'touch {shlex.quote(str(marker))}; echo 1' {{model}}"


@pytest.fixture
def models(tmp_path):
    config = llama_config()
    base = llama_state(config, seed=0)
    paths = {"base": write_model(tmp_path / "base", base, config, tokenizer_vocab=64)}
    for i, name in enumerate(("ft_a", "ft_b"), 1):
        g = torch.Generator().manual_seed(i)
        paths[name] = write_model(tmp_path / name, {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                                    for k, v in base.items()}, config, tokenizer_vocab=64)
    return paths


def soup_plan(models: list[str], command: str) -> dict:
    return {"merge_method": "linear", "models": [{"model": m} for m in models], "parameters": {"weight": 1.0},
            "mergescope": {"greedy_soup": {"eval_cmd": command}}}


def test_merge_refuses_a_plan_that_names_a_program_before_doing_anything(tmp_path, capsys):
    marker = tmp_path / "pwned"
    # models that do not exist: the refusal comes before any of them is opened
    plan = tmp_path / "plan.yml"
    plan.write_text(yaml.safe_dump(soup_plan([str(tmp_path / "nope-a"), str(tmp_path / "nope-b")],
                                             hostile_command(marker)), sort_keys=False))
    assert main(["merge", str(plan), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    line = next(n for n, text in enumerate(plan.read_text().splitlines(), 1) if "eval_cmd" in text)
    assert f"{plan}:{line}: the plan wants to run {hostile_command(marker)!r} (mergescope.greedy_soup.eval_cmd)" in err
    assert "pass --allow-eval-cmd to run it" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yml"]  # no scratch folder either


def test_dry_run_shows_the_command_and_runs_nothing(tmp_path, models, capsys):
    marker = tmp_path / "pwned"
    plan = tmp_path / "plan.yml"
    plan.write_text(yaml.safe_dump(soup_plan([str(models["ft_a"]), str(models["ft_b"])], hostile_command(marker))))
    assert main(["merge", str(plan), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"the plan would run {hostile_command(marker)!r}" in " ".join(out.split())
    assert not marker.exists()


def test_allow_eval_cmd_runs_the_plans_program(tmp_path, models):
    marker = tmp_path / "ran"
    plan = tmp_path / "plan.yml"
    plan.write_text(yaml.safe_dump(soup_plan([str(models["ft_a"]), str(models["ft_b"])], hostile_command(marker))))
    assert main(["merge", str(plan), "-o", str(tmp_path / "out"), "--device", "cpu", "--allow-eval-cmd"]) == 0
    assert marker.exists() and (tmp_path / "out" / "model.safetensors").is_file()


def merged_folder_carrying(tmp_path, models, command: str):
    """A real merged folder (a linear soup of ft_a and ft_b) whose plan has been given a greedy_soup block."""
    plan = tmp_path / "plan.yml"
    plan.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 1.0},
                                    "models": [{"model": str(models[n])} for n in ("ft_a", "ft_b")]}))
    out = tmp_path / "merged"
    assert main(["merge", str(plan), "-o", str(out), "--device", "cpu"]) == 0
    written = yaml.safe_load((out / "mergekit_config.yml").read_text())
    written["mergescope"] = {"greedy_soup": {"eval_cmd": command}}
    (out / "mergekit_config.yml").write_text(yaml.safe_dump(written))
    return out


def test_diagnose_and_inspect_of_a_merged_folder_run_nothing(tmp_path, models, capsys):
    marker = tmp_path / "pwned"
    merged = merged_folder_carrying(tmp_path, models, hostile_command(marker))
    assert main(["diagnose", str(merged), "--base", str(models["base"]), "--device", "cpu"]) == 0
    assert "ft_a" in capsys.readouterr().out

    async def body():
        app = MergescopeApp(open_session([str(merged)], base=str(models["base"])), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.pause(0.5)
        return True

    assert run(body)
    assert not marker.exists()


def test_tune_never_runs_the_plans_own_program(tmp_path, models, capsys):
    marker, scored = tmp_path / "pwned", tmp_path / "scored"
    plan = tmp_path / "plan.yml"
    plan.write_text(yaml.safe_dump(soup_plan([str(models["ft_a"]), str(models["ft_b"])], hostile_command(marker))))
    users_command = f"sh -c 'touch {shlex.quote(str(scored))}; echo 1' {{model}}"
    assert main(["tune", str(plan), "--eval-cmd", users_command, "--vary", "mergescope.seed=1,2",
                 "--device", "cpu"]) == 0
    assert scored.exists() and not marker.exists()


def test_the_tui_runs_a_soup_plan_without_its_program(tmp_path, models, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.yml"
    plan.write_text(yaml.safe_dump(soup_plan([str(models[n]) for n in ("ft_a", "ft_b")], hostile_command(marker))))

    async def body():
        app = MergescopeApp(open_session([str(plan)]), use_cache=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_analysis(app, pilot)
            await pilot.press("r")
            await pilot.pause(0.2)
            shown = [line.text for line in app.screen.query_one("#run-log").lines]
            expected = f"not run: mergescope.greedy_soup.eval_cmd {hostile_command(marker)!r}"
            assert " ".join(" ".join(shown).split()).startswith(" ".join(expected.split()))
            await pilot.press("ctrl+g")
            for _ in range(400):
                await pilot.pause(0.05)
                if getattr(app.screen, "phase", None) in ("done", "failed"):
                    break
            return app.screen.phase, app.state.last_merge

    phase, merged = run(body)
    assert phase == "done" and (tmp_path / merged / "model.safetensors").is_file() and not marker.exists()


def test_check_commands_allowed_is_the_gate():
    plan = parse_plan("merge_method: linear\nmodels: [a, b]\nparameters: {weight: 1}\n"
                      "mergescope:\n  seed: 3\n  greedy_soup:\n    eval_cmd: python eval.py {model}\n", "p.yml")
    [command] = plan_commands(plan)
    assert (command.key, command.line, command.command) == ("mergescope.greedy_soup.eval_cmd", 7,
                                                            "python eval.py {model}")
    check_commands_allowed(plan, allowed=True)
    with pytest.raises(PlanCommandRefused, match="^p.yml:7: the plan wants to run 'python eval.py {model}'"):
        check_commands_allowed(plan, allowed=False)
    plain = parse_plan("merge_method: linear\nmodels: [a, b]\nparameters: {weight: 1}\n", "q.yml")
    assert plan_commands(plain) == []
    check_commands_allowed(plain, allowed=False)


def test_every_mergescope_key_is_classed_as_data_or_program():
    """A new key under ``mergescope:`` fails this test until it is declared data here or a program in
    COMMAND_KEYS (and so gated by --allow-eval-cmd)."""
    data = {("seed",), ("device",), ("shard_size",), ("memory_budget",), ("allow_non_finite",),
            ("greedy_soup", "timeout")}
    keys = {(k,) for k in MERGESCOPE_KEYS if k != "greedy_soup"} | {("greedy_soup", k) for k in GREEDY_SOUP_KEYS}
    assert keys - data == set(COMMAND_KEYS)


def test_a_plan_file_is_never_executed_as_yaml_code(tmp_path):
    """YAML tags that construct Python objects are refused by the safe loader: one line, nothing run."""
    marker = tmp_path / "pwned"
    plan = tmp_path / "plan.yml"
    plan.write_text(f"merge_method: !!python/object/apply:os.system ['touch {marker}']\nmodels: [a, b]\n")
    with pytest.raises(Exception) as error:
        load_plan(plan)
    assert "python/object/apply" in str(error.value) and not marker.exists()
