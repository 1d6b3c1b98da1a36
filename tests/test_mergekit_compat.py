"""mergescope merges against mergekit 0.1.5, method by method, on a tiny Llama base and three fine-tunes.

Each case is a mergekit YAML config. mergekit runs it first (all cases in one process, see
:func:`mergekit_reference.run_mergekit_batch`) and the test checks what mergekit produced (tensor names,
dtypes, and for a few cases the values, from first principles); then ``mergescope merge`` runs the same
plan and its tensors must match mergekit's within the case's tolerance. Random methods (DARE, DELLA)
draw differently from mergekit, so they are compared exactly only at density 1 (no drop) and otherwise
on statistical properties both outputs must have.

The module is marked ``mergekit`` and skipped when the mergekit venv is missing: build it with
``python benchmarks/mergekit_env.py`` (about a minute, 1.2 GB), then ``pytest -m mergekit``.
"""

from __future__ import annotations

import contextlib
import io
import json
import string
from pathlib import Path

import pytest
import torch
import yaml

import mergekit_reference as mk
from mergekit_cases import ALL_CASES, CASES, F32, STAT_CASES, Case, assert_matches
from mergekit_reference import (
    FINE_TUNES,
    MergekitError,
    assert_tensors_close,
    fixture_states,
    load_merged,
    mergekit_available,
    run_mergekit,
    sliced_names,
    tensor_names,
)

pytestmark = [
    pytest.mark.mergekit,
    pytest.mark.skipif(not mergekit_available(), reason="no mergekit venv: python benchmarks/mergekit_env.py"),
]

def mergescope_merge(config: dict, out_dir: Path, *, seed: int | None = None) -> Path:
    """Run ``mergescope merge PLAN -o OUT --device cpu`` in-process; fail with mergescope's stderr on error."""
    from mergescope.tui.cli.main import main

    out_dir = Path(out_dir)
    plan = mk.write_config(config, out_dir.parent / f"{out_dir.name}.plan.yml")
    argv = ["merge", str(plan), "-o", str(out_dir), "--device", "cpu"]
    if seed is not None:
        argv += ["--seed", str(seed)]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = main(argv)
    if rc != 0:
        pytest.fail(f"mergescope merge failed ({rc}) on {plan}:\n{stderr.getvalue()}")
    return out_dir


# --------------------------------------------------------------------------------------------------
# Tolerances


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def fixture_paths(tmp_path_factory) -> dict[str, str]:
    return mk.write_fixtures(tmp_path_factory.mktemp("mergekit-fixture"))


@pytest.fixture(scope="module")
def states() -> dict[str, dict]:
    f32 = fixture_states(torch.float32)
    bf16 = fixture_states(torch.bfloat16)
    return {**f32, **{f"b{name}": state for name, state in bf16.items()}}


def resolve(case: Case, paths: dict[str, str]) -> dict:
    return yaml.safe_load(string.Template(case.config).substitute(paths))


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory, fixture_paths) -> dict[str, Path | MergekitError]:
    """Every case through mergekit, in one process (seed 0)."""
    root = tmp_path_factory.mktemp("mergekit-out")
    jobs = {case.id: (resolve(case, fixture_paths), root / case.id) for case in ALL_CASES.values()}
    return mk.run_mergekit_batch(jobs, per_job_args={case.id: case.args for case in ALL_CASES.values() if case.args})


def theirs_of(case: Case, outputs: dict) -> Path:
    result = outputs[case.id]
    if isinstance(result, MergekitError):
        pytest.fail(f"mergekit rejected the config:\n{result}")
    return result


def _fixture_states_for(case: Case, states: dict) -> dict:
    """The states the case reads, keyed base/ft_a/... (bf16 ones when the config names $bbase...)."""
    prefix = "b" if "$bbase" in case.config or "$bft_" in case.config else ""
    return {name: states[prefix + name] for name in ("base", *FINE_TUNES)}


# --------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_mergekit(case: Case, mergekit_outputs, fixture_paths, states, tmp_path):
    theirs_dir = theirs_of(case, mergekit_outputs)
    theirs = load_merged(theirs_dir)
    assert set(theirs) == sliced_names(case.layers), sorted(set(theirs) ^ sliced_names(case.layers))
    assert {t.dtype for t in theirs.values()} == {case.out_dtype}
    config_out = json.loads((theirs_dir / "config.json").read_text())
    assert config_out["num_hidden_layers"] == case.layers
    if case.check is not None:
        case.check(theirs, _fixture_states_for(case, states))
    if not case.mergescope:
        return

    ours_dir = mergescope_merge(resolve(case, fixture_paths), tmp_path / "ours")
    ours = load_merged(ours_dir)
    if case.trim_densities:
        # Which of several equal |τ| at a trim threshold is kept is up to the sort (mergekit: torch's
        # unstable argsort; mergescope: stable). Each element's result depends only on its own masks, so
        # everywhere else the merges must agree.
        fixture = _fixture_states_for(case, states)
        ambiguous = mk.trim_ties(fixture["base"], fixture, case.trim_densities)
        # bf16 task vectors of a few percent are a handful of ulps each: ~26 % of this fixture's elements
        # are tied at some model's threshold (a sanity bound, so that most elements stay checked).
        assert 0 < sum(int(m.sum()) for m in ambiguous.values()) < 0.35 * sum(m.numel() for m in ambiguous.values())
        ours = {name: torch.where(ambiguous[name], theirs[name], ours[name]) if name in ambiguous else t
                for name, t in ours.items()}
    assert_matches(ours, theirs, case.tol, case.id)
    ours_config = json.loads((ours_dir / "config.json").read_text())
    assert ours_config["num_hidden_layers"] == case.layers
    assert (ours_config.get("dtype") or ours_config.get("torch_dtype")) == config_out["dtype"]


@pytest.mark.parametrize("case", STAT_CASES, ids=lambda c: c.id)
def test_random_method_statistics(case: Case, mergekit_outputs, fixture_paths, states, tmp_path):
    theirs = load_merged(theirs_of(case, mergekit_outputs))
    assert set(theirs) == tensor_names()
    fixture = _fixture_states_for(case, states)
    case.stats(theirs, fixture)  # the properties hold for mergekit ...
    ours = load_merged(mergescope_merge(resolve(case, fixture_paths), tmp_path / "ours", seed=1))
    assert set(ours) == set(theirs)
    case.stats(ours, fixture)  # ... and for mergescope


def test_base_listed_among_models_changes_nothing(mergekit_outputs, fixture_paths, tmp_path):
    """TIES with the base also listed under models (with its own weight and density, which mergekit
    ignores) gives the same tensors as with the base only in base_model — in mergekit and in mergescope."""
    listed = theirs_of(ALL_CASES["ties-base-listed"], mergekit_outputs)
    unlisted = theirs_of(ALL_CASES["ties-base-unlisted"], mergekit_outputs)
    theirs = load_merged(listed)
    assert_tensors_close(theirs, load_merged(unlisted), rtol=0, atol=0, label="mergekit: listed vs unlisted")
    ours = load_merged(mergescope_merge(resolve(ALL_CASES["ties-base-listed"], fixture_paths), tmp_path / "ours"))
    assert_tensors_close(ours, theirs, rtol=F32.rtol, atol=F32.atol, label="base listed")


def test_batch_runner_matches_mergekit_yaml(mergekit_outputs, fixture_paths, tmp_path):
    """The one-process batch runner gives byte-identical weights to the mergekit-yaml program, random
    methods included (the seed is reset per job), so the suite may use it."""
    case = ALL_CASES["dare_ties-density0.5"]
    cli = load_merged(run_mergekit(resolve(case, fixture_paths), tmp_path / case.id))
    batch = load_merged(theirs_of(case, mergekit_outputs))
    assert_tensors_close(cli, batch, rtol=0, atol=0, label=f"{case.id}: mergekit-yaml vs batch")


def test_sharded_output_layout(mergekit_outputs):
    """--out-shard-size counts bytes (despite its help text): 10K -> five ~10 kB shards and an index."""
    folder = theirs_of(ALL_CASES["sharded-output"], mergekit_outputs)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(t.numel() * 4 for t in load_merged(folder).values()),
                                 "mergekit_version": "0.1.5"}
    assert {"config.json", "README.md", "mergekit_config.yml"} <= {p.name for p in folder.iterdir()}


def test_assert_tensors_close_reports_worst_element():
    a = {"x": torch.zeros(3, 4), "y": torch.ones(2)}
    b = {"x": torch.zeros(3, 4), "y": torch.ones(2)}
    assert_tensors_close(a, b)
    b["x"][1, 2] = 1e-3
    b["y"][0] = 1.0 + 5e-5  # within 1e-5 + 1e-4·|x|
    with pytest.raises(AssertionError, match=r"worst: x\[1, 2\] ours=0.0 mergekit=0.001"):
        assert_tensors_close(a, b)
    with pytest.raises(AssertionError, match="dtype"):
        assert_tensors_close({"y": torch.ones(2, dtype=torch.bfloat16)}, {"y": torch.ones(2)})
