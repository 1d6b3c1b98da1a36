"""Parameter search: --vary parsing, candidate plans, scores against numpy, the best plan file, interrupts."""

from __future__ import annotations

import itertools
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import llama_config, llama_state, write_model
from eval_scripts import distance_eval_command
from mergescope.checkpoints import MergescopeError
from mergescope.merge.plan import load_plan
from mergescope.merge.search_space import (
    Variable,
    candidates,
    grid_points,
    inclusive_grid,
    parse_vary,
    random_points,
    set_path,
)
from mergescope.merge.tune import ranked, run_search
from mergescope.tui.cli.main import main

SCORED = "model.layers.0.mlp.up_proj.weight"
TARGET_WEIGHT = 0.57  # the score peaks at base + 0.57·τ_a + 0·τ_b: nearest grid point 0.6
W_A = "models.0.parameters.weight=0.2:1.0:0.2"
W_B = "models.1.parameters.weight=0,0.5"


@pytest.fixture
def setup(tmp_path):
    return make_setup(tmp_path)


def make_setup(tmp_path):
    """Base, two fine-tunes, a task-arithmetic plan and an eval command whose optimum is TARGET_WEIGHT·τ_a."""
    config = llama_config()
    base = llama_state(config, seed=0)
    states = {"base": base}
    for i, name in enumerate(("ft_a", "ft_b"), 1):
        g = torch.Generator().manual_seed(i)
        states[name] = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = {name: write_model(tmp_path / name, state, config, tokenizer_vocab=64) for name, state in states.items()}
    tau = {n: (states[n][SCORED] - base[SCORED]).double().numpy() for n in ("ft_a", "ft_b")}
    target = base[SCORED].double().numpy() + TARGET_WEIGHT * tau["ft_a"]
    plan = {"merge_method": "task_arithmetic", "base_model": str(paths["base"]),
            "models": [{"model": str(paths["ft_a"]), "parameters": {"weight": 1.0}},
                       {"model": str(paths["ft_b"]), "parameters": {"weight": 1.0}}],
            "parameters": {"normalize": False}, "dtype": "float32", "mergescope": {"seed": 3}}
    (tmp_path / "plan.yml").write_text(yaml.safe_dump(plan, sort_keys=False))
    eval_cmd = distance_eval_command(tmp_path, SCORED, target)
    return tmp_path, tau, eval_cmd


def numpy_score(tau, w_a: float, w_b: float) -> float:
    """The script's score for weights (w_a, w_b): −‖(w_a − 0.57)·τ_a + w_b·τ_b‖, computed directly."""
    return -float(np.linalg.norm((w_a - TARGET_WEIGHT) * tau["ft_a"] + w_b * tau["ft_b"]))


def search(folder, vary: list[str], eval_cmd: str, points=None, jobs: int = 1):
    document = yaml.safe_load((folder / "plan.yml").read_text())
    variables = [parse_vary(spec) for spec in vary]
    pool = candidates(document, variables, points if points is not None else grid_points(variables))
    return ranked(run_search(pool, eval_cmd, jobs=jobs, device="cpu", scratch_dir=folder / "scratch"))


# --- --vary ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("0.2:1.0:0.2", [0.2, 0.4, 0.6, 0.8, 1.0]),
    ("0.1:0.3:0.1", [0.1, 0.2, 0.3]),  # np.arange(0.1, 0.3 + 1e-9, 0.1) drifts to 0.30000000000000004
    ("0:1:0.3", [0.0, 0.3, 0.6, 0.9]),
    ("0:10:5", [0, 5, 10]),
    ("-1:1:1", [-1, 0, 1]),
    ("0.5:0.5:0.1", [0.5]),
])
def test_inclusive_grid_is_exact(text, expected):
    values = inclusive_grid(*text.split(":"))
    assert values == expected
    assert [type(v) for v in values] == [type(v) for v in expected]


def test_parse_vary_lists_and_paths():
    variable = parse_vary("models.1.parameters.weight = 0.5, 1, true, base")
    assert variable == Variable(
        "models.1.parameters.weight", ("models", "1", "parameters", "weight"), (0.5, 1, True, "base")
    )
    assert parse_vary(W_A).values == (0.2, 0.4, 0.6, 0.8, 1.0)


@pytest.mark.parametrize("spec, message", [
    ("weight", "write KEY=a:b:step"),
    ("=1,2", "write KEY=a:b:step"),
    ("a..b=1", "empty part"),
    ("w=1:0:0.5", "must not exceed b"),
    ("w=0:1:0", "must be positive"),
    ("w=0:1:-0.5", "must be positive"),
    ("w=0:x:1", "three numbers"),
    ("w=1,,2", "empty value"),
    ("w=1,1", "listed twice"),
    ("w=[1, 2]", "not a single value"),
])
def test_parse_vary_errors(spec, message):
    with pytest.raises(MergescopeError, match=message):
        parse_vary(spec)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab.0123456789=:,-e ", max_size=24))
def test_parse_vary_accepts_or_refuses_in_one_line(spec):
    """Any --vary text is a variable or a one-line MergescopeError, never another exception."""
    try:
        variable = parse_vary(spec)
    except MergescopeError as exc:
        assert "\n" not in str(exc)
        return
    assert variable.continuous == (not variable.values)
    if variable.continuous:
        assert variable.bounds[0] < variable.bounds[1]


def test_set_path_creates_keys_and_refuses_bad_paths():
    document = {"models": [{"model": "a"}, "b"], "parameters": None}
    set_path(document, ("parameters", "density"), 0.5)
    set_path(document, ("models", "0", "parameters", "weight"), 0.3)
    assert document == {"models": [{"model": "a", "parameters": {"weight": 0.3}}, "b"], "parameters": {"density": 0.5}}
    with pytest.raises(MergescopeError, match=r"models is a list of 2; '2' is not an index"):
        set_path(document, ("models", "2", "parameters", "weight"), 1.0)
    with pytest.raises(MergescopeError, match=r"models.1 is 'b', not a mapping"):
        set_path(document, ("models", "1", "parameters", "weight"), 1.0)


def test_random_points_are_seeded_distinct_and_from_the_grid():
    variables = [parse_vary("a=0:9:1"), parse_vary("b=x,y,z")]
    grid = list(itertools.product(range(10), "xyz"))
    first = random_points(variables, 7, seed=11)
    assert first == random_points(variables, 7, seed=11)
    assert len(set(first)) == 7 and set(first) <= set(grid)
    assert first == sorted(first, key=grid.index)  # in grid order
    assert {tuple(random_points(variables, 7, seed=s)) for s in range(5)} != {tuple(first)}  # the seed matters
    assert random_points(variables, 100, seed=0) == grid


# --- searching ------------------------------------------------------------------------------------------
def test_grid_search_scores_match_numpy_and_the_best_is_the_target(setup):
    folder, tau, eval_cmd = setup
    results = search(folder, [W_A, W_B], eval_cmd)
    assert len(results) == 10 and all(r.status == "ok" for r in results)
    for result in results:
        assert result.score == pytest.approx(numpy_score(tau, *result.candidate.values), rel=1e-5)
    expected_order = sorted(itertools.product([0.2, 0.4, 0.6, 0.8, 1.0], [0, 0.5]), key=lambda v: -numpy_score(tau, *v))
    assert [r.candidate.values for r in results] == expected_order
    assert results[0].candidate.values == (0.6, 0)
    assert results[0].candidate.document["models"][0]["parameters"]["weight"] == 0.6
    assert not (folder / "scratch").exists() or not list((folder / "scratch").iterdir())


def test_cli_table_and_best_plan(setup, capsys):
    folder, tau, eval_cmd = setup
    status = main(
        ["tune", str(folder / "plan.yml"), "--eval-cmd", eval_cmd, "--vary", W_A, "--vary", W_B, "--device", "cpu"]
    )
    out = capsys.readouterr().out
    assert status == 0
    rows = [line.strip("│ ").split("│") for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 10
    first = [cell.strip() for cell in rows[0]]
    assert first[1:4] == ["0.6", "0", f"{numpy_score(tau, 0.6, 0):.6g}"] and first[5] == "ok"
    worst = [cell.strip() for cell in rows[-1]]
    assert worst[1:4] == ["0.2", "0.5", f"{numpy_score(tau, 0.2, 0.5):.6g}"]
    best_file = folder / "plan.best.yml"
    text = best_file.read_text()
    assert text.startswith(f"# best of 10 candidates by mergescope tune: score {numpy_score(tau, 0.6, 0):.6g}")
    best = load_plan(best_file)
    assert [m.parameters["weight"] for m in best.models] == [0.6, 0]
    assert best.parameters == {"normalize": False} and best.dtype == "float32" and best.options == {"seed": 3}
    assert best.base_model == str(folder / "base")
    assert not [p for p in folder.iterdir() if "scratch" in p.name]


def test_invalid_candidates_are_reported_and_the_rest_scored(setup, capsys):
    folder, tau, eval_cmd = setup
    plan = yaml.safe_load((folder / "plan.yml").read_text())
    plan["merge_method"] = "ties"
    (folder / "plan.yml").write_text(yaml.safe_dump(plan))
    status = main(["tune", str(folder / "plan.yml"), "--eval-cmd", eval_cmd, "--vary", "parameters.density=0.5,1.5,1.0",
                   "-o", str(folder / "best.yml"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0
    assert "invalid #2: density: 1.5 is outside (0, 1]" in out
    statuses = [line.strip("│ ").split("│")[-1].strip() for line in out.splitlines() if line.startswith("│")]
    assert statuses == ["ok", "ok", "invalid"]
    assert load_plan(folder / "best.yml").parameters["density"] in (0.5, 1.0)


def test_random_search_is_reproducible(setup):
    folder, tau, eval_cmd = setup
    variables = [parse_vary(W_A), parse_vary(W_B)]
    points = random_points(variables, 4, seed=5)
    first = search(folder, [W_A, W_B], eval_cmd, points=points)
    second = search(folder, [W_A, W_B], eval_cmd, points=random_points(variables, 4, seed=5))
    assert [(r.candidate.values, r.score) for r in first] == [(r.candidate.values, r.score) for r in second]
    assert len(first) == 4 and {r.candidate.values for r in first} == set(points)
    for result in first:
        assert result.score == pytest.approx(numpy_score(tau, *result.candidate.values), rel=1e-5)


def test_cli_random_prints_only_the_sampled_candidates(setup, capsys):
    folder, _, eval_cmd = setup
    argv = ["tune", str(folder / "plan.yml"), "--eval-cmd", eval_cmd, "--vary", W_A, "--vary", W_B,
            "--random", "3", "--seed", "2", "--device", "cpu"]
    assert main(argv) == 0
    rows = sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("│"))
    assert len(rows) == 3
    assert main(argv) == 2  # the search file is there: a second run must say --resume or remove it
    assert "continue it with --resume" in capsys.readouterr().err
    (folder / "plan.best.search.db").unlink()
    assert main(argv) == 0
    assert (
        sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("│"))[0].split("│")[1:5]
        == rows[0].split("│")[1:5]
    )


def test_two_jobs_give_the_results_of_one(setup):
    folder, _, eval_cmd = setup
    threads = torch.get_num_threads()
    one = search(folder, [W_A, W_B], eval_cmd, jobs=1)
    two = search(folder, [W_A, W_B], eval_cmd, jobs=2)
    assert [(r.candidate.number, r.candidate.values, r.score) for r in one] == [
        (r.candidate.number, r.candidate.values, r.score) for r in two
    ]
    assert len(two) == 10 and all(r.status == "ok" for r in two)
    assert torch.get_num_threads() == threads  # the per-job division is undone


@pytest.mark.parametrize("argv_tail, message", [
    (["--vary", "models.7.parameters.weight=1"], "models is a list of 2"),
    (["--vary", "w=1", "--vary", "w=2"], "given twice"),
    (["--vary", W_A, "--jobs", "0"], "--jobs 0"),
    (["--vary", W_A, "--random", "0"], "--random 0"),
    (["--vary", "models.0.parameters.weight=0:1"], "--strategy random or --strategy cma"),
    (["--vary", W_A, "--strategy", "cma"], "ranges only"),
    (["--vary", "models.0.parameters.weight=0:1", "--strategy", "cma", "--layer-granularity", "0"],
     "--layer-granularity 0"),
    (["--vary", "models.0.parameters.weight=0:1", "--strategy", "cma", "--budget", "0"], "--budget 0"),
    (["--vary", W_A, "--random", "3", "--strategy", "cma"], "--random belongs to --strategy random"),
    (["--vary", W_A, "--resume"], "no search file to resume"),
])
def test_cli_errors_are_one_line(setup, capsys, argv_tail, message):
    folder, _, eval_cmd = setup
    assert main(["tune", str(folder / "plan.yml"), "--eval-cmd", eval_cmd, *argv_tail, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_every_candidate_failing_is_an_error(setup, capsys):
    folder, _, _ = setup
    failing = f"{shlex.quote(sys.executable)} -c 'import sys; sys.exit(\"no GPU\")' {{model}}"
    assert main(["tune", str(folder / "plan.yml"), "--eval-cmd", failing, "--vary", W_B, "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "no candidate could be scored (2 tried)" in captured.err and "no GPU" in captured.err
    assert "failed" in captured.out and not (folder / "plan.best.yml").exists()


def test_interrupt_stops_every_job_and_removes_scratch(setup):
    folder, _, _ = setup
    slow = folder / "slow.py"
    slow.write_text(f"import time\nopen({str(folder / 'started')!r}, 'a').write('x')\ntime.sleep(60)\nprint(1)\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "mergescope.tui.cli.main", "tune", str(folder / "plan.yml"), "--vary", W_A,
         "--jobs", "2", "--eval-cmd", f"{shlex.quote(sys.executable)} {shlex.quote(str(slow))} {{model}}",
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (
        not ((folder / "started").exists() and len((folder / "started").read_text()) == 2)
        and time.monotonic() < deadline
    ):
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert time.monotonic() - start < 10  # the sleeping evaluations were killed, not waited for
    assert "interrupted: 0 of 5 candidates finished" in stderr and "Traceback" not in stderr
    assert not (folder / "plan.best.yml").exists() and not [p for p in folder.iterdir() if "scratch" in p.name]


# --- continuous ranges, strategies, the search file ------------------------------------------------------
def test_parse_vary_range_and_where_it_is_refused():
    variable = parse_vary("models.0.parameters.weight=0.1:1.5")
    assert variable.bounds == (0.1, 1.5) and variable.values == () and variable.continuous
    for spec, message in (("w=1:0", "low below high"), ("w=a:1", "two numbers"), ("w=0:inf", "finite")):
        with pytest.raises(MergescopeError, match=message):
            parse_vary(spec)
    with pytest.raises(MergescopeError, match="--strategy random or --strategy cma"):
        grid_points([variable])


def test_cma_refuses_listed_values_and_random_ranges_are_seeded_and_inside():
    from mergescope.merge.search_strategy import make_strategy

    listed, ranged = parse_vary("a=1,2"), parse_vary("b=-1:3")
    with pytest.raises(MergescopeError, match="ranges only"):
        make_strategy("cma", {}, [listed, ranged], seed=0, budget=8)
    draws = make_strategy("random", {}, [listed, ranged], seed=5, budget=50).next_batch()
    assert draws == make_strategy("random", {}, [listed, ranged], seed=5, budget=50).next_batch()
    assert {a for a, _ in draws} == {1, 2} and all(-1 <= b <= 3 for _, b in draws)
    assert len({b for _, b in draws}) == 50  # continuous: no two draws alike


def test_layer_granularity_writes_a_gradient_of_one_value_per_group():
    from mergescope.merge.search_strategy import layer_groups, make_strategy

    assert [layer_groups(7, k) for k in (1, 2, 3, 7, None)] == [7, 4, 3, 1, 1]
    strategy = make_strategy("cma", {}, [parse_vary("w=0:2")], seed=0, groups=4, budget=6)
    batch = strategy.next_batch()
    assert len(batch) == 6 and all(len(point[0]) == 4 and all(0 <= v <= 2 for v in point[0]) for point in batch)


def test_cma_asks_the_same_candidates_whatever_order_results_arrive(setup):
    """The same seed, one thread or two: the same candidates in the same order, and the same scores."""
    folder, tau, eval_cmd = setup
    from mergescope.merge.search_run import run_strategy
    from mergescope.merge.search_strategy import make_strategy
    from mergescope.merge.tune import ThreadEngine

    document = yaml.safe_load((folder / "plan.yml").read_text())
    variables = [parse_vary("models.0.parameters.weight=0:1"), parse_vary("models.1.parameters.weight=-0.5:0.5")]
    runs = []
    for jobs in (1, 2):
        strategy = make_strategy("cma", document, variables, seed=4, budget=12)
        engine = ThreadEngine(eval_cmd, jobs=jobs, device="cpu", scratch_dir=folder / "scratch")
        runs.append(run_strategy(strategy, document, variables, engine))
    assert [(r.candidate.values, r.score) for r in runs[0]] == [(r.candidate.values, r.score) for r in runs[1]]
    for result in runs[0]:
        assert result.score == pytest.approx(numpy_score(tau, *result.candidate.values), rel=1e-5)


def test_ray_missing_says_how_to_get_it(setup, capsys, monkeypatch):
    folder, _, eval_cmd = setup
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    argv = ["tune", str(folder / "plan.yml"), "--eval-cmd", eval_cmd, "--vary", W_B, "--ray", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install 'mergescope[ray]'" in err and err.count("\n") == 1


def test_a_thread_search_does_not_import_ray(setup):
    folder, _, eval_cmd = setup
    argv = ["tune", str(folder / "plan.yml"), "--eval-cmd", eval_cmd, "--vary", W_B, "--device", "cpu"]
    probe = (f"import sys; from mergescope.tui.cli.main import main; code = main({argv!r}); "
             "print(code, 'ray' in sys.modules, 'cma' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split()[-3:] == ["0", "False", "False"], result.stderr


def test_a_vary_key_that_cannot_act_is_refused_before_running_with_the_keys_that_do(setup, capsys):
    """Every model sets its own density, which mergekit looks up first: parameters.density would give the same
    merge for every value. Said before any candidate runs (no scratch folder), with the per-model keys."""
    folder, _, eval_cmd = setup
    document = yaml.safe_load((folder / "plan.yml").read_text())
    document["merge_method"] = "ties"
    for entry in document["models"]:
        entry["parameters"]["density"] = 0.7
    (folder / "ties.yml").write_text(yaml.safe_dump(document, sort_keys=False))
    argv = ["tune", str(folder / "ties.yml"), "--eval-cmd", eval_cmd, "--device", "cpu"]
    assert main([*argv, "--vary", "parameters.density=0.5,0.9"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "--vary parameters.density changes nothing: every model sets its own density" in line
    assert line.endswith("vary models.0.parameters.density, models.1.parameters.density instead "
                         "(every candidate would be the same merge)")
    assert not (folder / "ties.best.yml").exists()
    # with a key that acts beside it, the search runs and the inert one is a warning
    assert main([*argv, "--vary", "parameters.density=0.5", "--vary", "models.0.parameters.density=0.5,0.9"]) == 0
    assert "warning: --vary parameters.density changes nothing" in capsys.readouterr().err
    # a parameter the method ignores
    assert main(["tune", str(folder / "plan.yml"), "--eval-cmd", eval_cmd, "--device", "cpu",
                 "--vary", "models.1.parameters.density=0.2,0.4"]) == 2
    assert "task_arithmetic ignores density" in capsys.readouterr().err
