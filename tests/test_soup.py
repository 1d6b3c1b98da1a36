"""Greedy soup: decisions checked against scores computed here with numpy, the soup against a numpy average."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from builders import llama_config, llama_state, write_model
from eval_scripts import distance_eval_command
from mergescope.checkpoints import MergescopeError
from mergescope.merge.plan import PlanError, load_plan, parse_plan
from mergescope.merge.soup import greedy_selection, rank_by_score, recipe_from_models, run_greedy_soup
from mergescope.tui.cli.main import main

SCORED = "model.norm.weight"
#: candidate → (entry of the scored tensor it moves, by how much). m2 moves the same entry as m0, so it
#: hurts a soup holding m0 although alone it beats m3; m4 is far off.
DESIGN = {"m0": (0, 1.0), "m1": (1, 1.1), "m2": (0, 1.15), "m3": (2, 1.2), "m4": (3, 5.0)}
EXPECTED = [("m0", "start"), ("m1", "added"), ("m2", "rejected"), ("m3", "added"), ("m4", "rejected")]


@pytest.fixture
def candidates(tmp_path):
    """Five tiny Llamas: random differences everywhere, and the designed ones on the scored tensor."""
    config = llama_config()
    base = llama_state(config, seed=0)
    states, paths = {}, {}
    for i, (name, (entry, shift)) in enumerate(DESIGN.items(), 1):
        g = torch.Generator().manual_seed(i)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        state[SCORED] = torch.ones_like(base[SCORED])
        state[SCORED][entry] += shift
        states[name] = state
        paths[name] = write_model(tmp_path / name, state, config, tokenizer_vocab=64)
    eval_cmd = distance_eval_command(tmp_path, SCORED, np.ones(base[SCORED].shape))
    return states, paths, eval_cmd


def numpy_score(arrays: list[np.ndarray]) -> float:
    """What the script prints for the uniform average of ``arrays`` (the scored tensor of each model)."""
    return -float(np.linalg.norm(np.mean(np.stack(arrays), axis=0) - 1.0))


def soup_steps_by_hand(states) -> list[tuple[str, str, float]]:
    """The greedy soup computed from the designed tensors with numpy alone."""
    scored = {name: state[SCORED].double().numpy() for name, state in states.items()}
    ranked = sorted(scored, key=lambda name: -numpy_score([scored[name]]))
    soup, best = [ranked[0]], numpy_score([scored[ranked[0]]])
    steps = [(ranked[0], "start", best)]
    for name in ranked[1:]:
        score = numpy_score([scored[m] for m in soup + [name]])
        steps.append((name, "added" if score >= best else "rejected", score))
        if score >= best:
            soup, best = soup + [name], score
    return steps


def test_the_design_gives_the_expected_decisions(candidates):
    states, _, _ = candidates
    assert [(name, decision) for name, decision, _ in soup_steps_by_hand(states)] == EXPECTED


def test_greedy_soup_decisions_scores_and_tensors(tmp_path, candidates):
    states, paths, eval_cmd = candidates
    given = ["m4", "m2", "m0", "m3", "m1"]  # any order: candidates are ranked by their own score
    events = []
    result = run_greedy_soup(recipe_from_models([str(paths[n]) for n in given]), eval_cmd, tmp_path / "soup",
                             device="cpu", on_event=events.append)
    by_hand = soup_steps_by_hand(states)
    names = {str(paths[n]): n for n in paths}
    assert [
        (names[s.model], "start" if i == 0 else ("added" if s.added else "rejected"))
        for i, s in enumerate(result.steps)
    ] == EXPECTED
    for step, (_, _, score) in zip(result.steps, by_hand):
        assert step.score == pytest.approx(score, rel=1e-6)
    alone = {names[e.model]: e.score for e in events if type(e).__name__ == "CandidateScored"}
    assert list(alone) == given  # scored in the given order
    for name, score in alone.items():
        assert score == pytest.approx(-DESIGN[name][1], rel=1e-6)
    kept = ["m0", "m1", "m3"]
    assert [names[m] for m in result.ingredients] == kept
    assert result.score == pytest.approx(by_hand[3][2], rel=1e-6)
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    assert set(soup) == set(states["m0"])
    for name, tensor in soup.items():
        expected = np.mean([states[m][name].double().numpy() for m in kept], axis=0)
        np.testing.assert_allclose(tensor.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    # no scratch left
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m0", "m1", "m2", "m3", "m4", "score.py", "soup", f"target-{SCORED}.f64"
    ]


def test_written_plan_is_the_soup_as_made(tmp_path, candidates):
    _, paths, eval_cmd = candidates
    run_greedy_soup(recipe_from_models([str(paths[n]) for n in DESIGN]), eval_cmd, tmp_path / "soup", device="cpu")
    text = (tmp_path / "soup" / "mergekit_config.yml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert "kept 3 of 5 candidates" in header[0]
    assert [line.split()[-1] for line in header[3:8]] == ["alone)", "added", "rejected", "added", "rejected"]
    plan = load_plan(tmp_path / "soup" / "mergekit_config.yml")
    assert plan.merge_method == "linear"
    assert [m.model for m in plan.models] == [str(paths[n]) for n in ("m0", "m1", "m3")]
    assert plan.parameters == {"weight": 1.0, "normalize": True}


def test_cli_prints_each_step(tmp_path, candidates, capsys):
    _, paths, eval_cmd = candidates
    models = [str(paths[n]) for n in DESIGN]
    status = main(["soup", *models, "--eval-cmd", eval_cmd, "-o", str(tmp_path / "out"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0
    words = [line.split() for line in out.splitlines()]
    decisions = [w[0] for w in words if w and w[0] in ("start", "added", "rejected")]
    assert decisions == [d for _, d in EXPECTED]
    rejected = next(line for line in out.splitlines() if line.split()[:1] == ["rejected"])
    assert str(paths["m2"]) in rejected and f"{-0.805019:.6g}" in rejected  # hand value: ‖(2.15, 1.1)‖ / 3
    assert "kept 3 of 5" in out and (tmp_path / "out" / "model.safetensors").is_file()


def test_plan_with_greedy_soup_block_runs_the_selection(tmp_path, candidates, capsys):
    states, paths, eval_cmd = candidates
    plan = {"merge_method": "linear", "models": [{"model": str(paths[n])} for n in ("m2", "m0", "m1")],
            "parameters": {"weight": 2.0}, "dtype": "float32",
            "mergescope": {"seed": 5, "greedy_soup": {"eval_cmd": eval_cmd, "timeout": 60}}}
    (tmp_path / "plan.yml").write_text(yaml.safe_dump(plan, sort_keys=False))
    assert main(["merge", str(tmp_path / "plan.yml"), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--allow-eval-cmd"]) == 0
    written = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    assert [m["model"] for m in written["models"]] == [str(paths["m0"]), str(paths["m1"])]  # m2 rejected
    assert written["mergescope"] == {"seed": 5} and written["dtype"] == "float32"
    soup = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    expected = (states["m0"][name].double() + states["m1"][name].double()) / 2
    np.testing.assert_allclose(soup[name].double().numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)


def test_a_single_weight_file_is_scored_through_a_one_model_soup(tmp_path, candidates):
    _, paths, eval_cmd = candidates
    recipe = recipe_from_models([str(paths["m4"] / "model.safetensors"), str(paths["m1"])])
    result = run_greedy_soup(recipe, eval_cmd, tmp_path / "soup", device="cpu")
    assert [(s.alone, s.added) for s in result.steps] == [
        (pytest.approx(-1.1, rel=1e-6), True),
        (pytest.approx(-5.0, rel=1e-6), False),
    ]


def test_keep_scratch_keeps_the_candidate_soups(tmp_path, candidates):
    _, paths, eval_cmd = candidates
    run_greedy_soup(recipe_from_models([str(paths["m0"]), str(paths["m1"])]), eval_cmd, tmp_path / "soup",
                    device="cpu", keep_scratch=True)
    scratch = [p for p in tmp_path.iterdir() if p.name.startswith(".soup.soup-scratch-")]
    assert len(scratch) == 1
    assert [p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in scratch[0].iterdir()] == ["soup-2"]


def test_greedy_selection_keeps_ties_and_ranks_stably():
    scores = {("a",): 1.0, ("b",): 1.0, ("c",): 0.5, ("a", "b"): 1.0, ("a", "b", "c"): 0.99}
    ranked = rank_by_score([("c", 0.5), ("a", 1.0), ("b", 1.0)])
    assert ranked == [("a", 1.0), ("b", 1.0), ("c", 0.5)]
    steps = list(greedy_selection(ranked, lambda ingredients: scores[ingredients]))
    assert [(s.model, s.added, s.ingredients) for s in steps] == [
        ("a", True, ("a",)), ("b", True, ("a", "b")), ("c", False, ("a", "b"))]


def test_bad_inputs_are_one_line(tmp_path, candidates, capsys):
    _, paths, eval_cmd = candidates
    a, b = str(paths["m0"]), str(paths["m1"])
    cases = [
        (["soup", a, a, "--eval-cmd", eval_cmd], "listed more than once"),
        (["soup", a, "--eval-cmd", eval_cmd], "at least two candidate models"),
        (["soup", a, str(tmp_path / "nope"), "--eval-cmd", eval_cmd], "cannot open"),
        (["soup", a, b, "--eval-cmd", "python score.py"], "has no {model}"),
        (["soup", a, b, "--eval-cmd", eval_cmd.replace("score.py", "missing.py")], "exited with status 2"),
        (["soup", a, b, "--eval-cmd", eval_cmd, "-o", a], "is (or is inside) the input"),
    ]
    for argv, expected in cases:
        if "-o" not in argv:
            argv = argv + ["-o", str(tmp_path / "out")]
        assert main(argv + ["--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "scratch" in p.name]


def test_greedy_soup_block_is_validated_with_lines():
    text = """merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: 1.0}
  - model: b
    parameters: {weight: [0.5, 1.0]}
  - model: c
    parameters: {weight: 0.5}
parameters: {normalize: false}
mergescope:
  greedy_soup:
    eval_cmd: python eval.py
    timeout: 0
    tolerance: 0.1
"""
    with pytest.raises(PlanError) as error:
        parse_plan(text, "soup.yml")
    assert str(error.value).splitlines() == [
        "soup.yml:1: greedy_soup builds uniform soups: merge_method must be linear",
        "soup.yml:2: greedy_soup: a base_model would be merged into every soup; "
        "remove it, or list it under models: as one more candidate",
        "soup.yml:7: greedy_soup averages uniformly: weight must be one number, not [0.5, 1.0]",
        "soup.yml:9: greedy_soup averages uniformly: every model needs the same weight (found 1 and 0.5)",
        "soup.yml:10: greedy_soup averages: normalize must not be false",
        "soup.yml:13: greedy_soup.eval_cmd: eval command 'python eval.py' has no {model}: "
        "write where the model folder goes, e.g. 'python eval.py {model}'",
        "soup.yml:14: greedy_soup.timeout must be a positive number of seconds, not 0",
        "soup.yml:15: unknown greedy_soup option 'tolerance' "
        "(known: eval_cmd (the eval command, with {model}), timeout (seconds per evaluation))",
    ]


def test_greedy_soup_block_shapes():
    good = parse_plan("merge_method: linear\nmodels: [a, b]\nparameters: {weight: 1}\n"
                      "mergescope:\n  greedy_soup:\n    eval_cmd: python eval.py {model}\n    timeout: 30\n")
    assert good.options == {"greedy_soup": {"eval_cmd": "python eval.py {model}", "timeout": 30.0}}
    for block, line, message in [
        ("  greedy_soup: python eval.py", 5, "greedy_soup must be a mapping"),
        ("  greedy_soup: {timeout: 5}", 5, "greedy_soup needs eval_cmd"),
    ]:
        with pytest.raises(PlanError) as error:
            parse_plan(
                f"merge_method: linear\nmodels: [a, b]\nparameters: {{weight: 1}}\nmergescope:\n{block}\n", "p.yml"
            )
        assert str(error.value).startswith(f"p.yml:{line}: ") and message in str(error.value)
    with pytest.raises(PlanError, match="p.yml:2: greedy_soup needs at least two models"):
        parse_plan("merge_method: linear\nmodels: [a]\nparameters: {weight: 1}\n"
                   "mergescope: {greedy_soup: {eval_cmd: 'x {model}'}}\n", "p.yml")


def test_interrupt_during_an_evaluation_leaves_nothing(tmp_path, candidates):
    _, paths, _ = candidates
    marker = tmp_path / "started"
    slow = tmp_path / "slow.py"
    slow.write_text(f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\nprint(1)\n")
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "mergescope.tui.cli.main", "soup", str(paths["m0"]), str(paths["m1"]),
         "--eval-cmd", f"{shlex.quote(sys.executable)} {shlex.quote(str(slow))} {{model}}", "-o", str(out),
          "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # to mergescope only, not to the evaluation
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)  # the evaluation was killed, not left running
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "scratch" in p.name]


def test_empty_candidate_list_is_refused():
    with pytest.raises(MergescopeError, match="at least one candidate"):
        list(greedy_selection([], lambda ingredients: 0.0))
