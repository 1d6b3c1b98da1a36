"""The demo workspace: trained models whose merges behave as the README says, checked with real numbers —
accuracies measured here, merged tensors recomputed here from the safetensors files, the analysis'
warnings, transformers' logits, and the ``mergescope eval``/``demo`` commands.

The story's claims and their bounds are ``mergescope.demo.story.CLAIMS``, the list the README states and
``benchmarks/demo_robustness.py`` measured over 5 seeds × 2 kernel settings; the bounds carry the margins
of that benchmark's worst case. The workspace is built once per session.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builders import llama_config, llama_state, write_model
from mergescope.analysis import run_analysis
from mergescope.analysis.diagnosis import diagnose_merged_folder
from mergescope.checkpoints import MergescopeError, open_checkpoint
from mergescope.demo.evaluate import evaluate, load_demo_model
from mergescope.demo.kernels import NATIVE, PORTABLE, PORTABLE_ENVIRONMENT, build_environment
from mergescope.demo.manifest import MANIFEST, read_manifest
from mergescope.demo.model import DemoConfig, new_model
from mergescope.demo.recipe import Recipe
from mergescope.demo.story import CLAIMS, FINE_TUNES, MERGES, kept
from mergescope.demo.tasks import TASK_NAMES, eval_examples, train_stream
from mergescope.demo.tokenizer import CharTokenizer
from mergescope.demo.train import TrainSpec, train
from mergescope.demo.workspace import build_workspace
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import PlanError, load_plan, parse_plan
from mergescope.tui.cli.main import main

#: a build small enough to train in seconds, for the tests of the build's mechanics (not of the story)
TINY = Recipe(seed=7, hidden_size=16, intermediate_size=32, base_steps=8,
              fine_tunes=(("add", 3, 1e-3), ("reverse", 3, 1e-3), ("sort", 3, 1e-3)),
              lora_steps=2, other_base_steps=2, trap_steps=2, grown_steps=2, batch_size=8)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("demo") / "ws")


@pytest.fixture(scope="session")
def manifest(workspace) -> dict:
    return read_manifest(workspace)


@pytest.fixture(scope="session")
def scores(workspace, manifest) -> dict[str, dict[str, float]]:
    """Every model's accuracy, measured here from its folder (not taken from the manifest)."""
    folders = [manifest["base"], *(f["path"] for f in manifest["fine_tunes"] + manifest["lora"] + manifest["traps"])]
    return {folder: evaluate(workspace / folder) for folder in folders}


@pytest.fixture(scope="session")
def merged(workspace, tmp_path_factory):
    """Run a workspace plan through the merge engine once; return the output folder."""
    out_root = tmp_path_factory.mktemp("merged")
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            plan = load_plan(workspace / "plans" / f"{name}.yml")
            done[name] = run_merge(build_job(plan), out_root / name, device="cpu")
        return done[name]

    return run


@pytest.fixture(scope="session")
def story_scores(scores, merged) -> dict[str, dict[str, float]]:
    """The scores the story's claims read: every folder's and every plan's merge, measured here."""
    return {**scores, **{f"merge:{plan}": evaluate(merged(plan)) for plan in MERGES}}


# --- the model ------------------------------------------------------------------------------------------------
def test_transformers_loads_a_demo_checkpoint_with_equal_logits(workspace):
    transformers = pytest.importorskip("transformers")
    ours, tokenizer = load_demo_model(workspace / "ft_sort")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(workspace / "ft_sort")
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[1, *tokenizer.encode("SORT:xqnt=nqtx")], [1, *tokenizer.encode("ADD:37+5=42kd:")]])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4)
    fast = transformers.AutoTokenizer.from_pretrained(workspace / "ft_sort")
    assert fast("REV:kdjam=")["input_ids"] == tokenizer.encode("REV:kdjam=")


def test_state_dict_uses_hugging_face_llama_names():
    model = new_model(DemoConfig(vocab_size=10, hidden_size=16, intermediate_size=32), seed=0)
    names = set(model.state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.post_attention_layernorm.weight"} <= names
    assert len(names) == 3 + 2 * 9


def test_training_is_deterministic():
    tokenizer = CharTokenizer()
    config = DemoConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64)
    runs = []
    for _ in range(2):
        model = new_model(config, seed=3)
        losses = train(model, TrainSpec(TASK_NAMES, steps=15, lr=3e-3, seed=5, batch_size=16), tokenizer)
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    other = new_model(config, seed=4)
    assert not torch.equal(other.state_dict()["lm_head.weight"], runs[0][1]["lm_head.weight"])


def has_carry(prompt: str) -> bool:
    """``ADD:a+b=`` carries into the tens when a mod 10 + b ≥ 10."""
    a, b = prompt.removeprefix("ADD:").removesuffix("=").split("+")
    return int(a) % 10 + int(b) >= 10


def test_training_and_held_out_prompts_are_disjoint():
    held_out = {e.prompt for t in TASK_NAMES for e in eval_examples(t)}
    stream = train_stream(TASK_NAMES, seed=0)
    seen = [next(stream) for _ in range(20_000)]
    assert not held_out & {e.prompt for e in seen}
    assert {e.task for e in seen} == set(TASK_NAMES)
    easy_reverse = train_stream(("reverse",), seed=0, full=False)
    assert max(len(next(easy_reverse).answer) for _ in range(500)) == 4
    easy_add = [next(e) for e in [train_stream(("add",), seed=0, full=False)] for _ in range(2000)]
    carries = [e for e in easy_add if has_carry(e.prompt)]
    assert not carries and {int(e.answer) for e in easy_add} >= {9, 99}  # no carry, the whole range otherwise
    held_out_carries = sum(has_carry(e.prompt) for e in eval_examples("add"))
    assert 0.3 < held_out_carries / len(eval_examples("add")) < 0.6  # the held-out set is the whole task


# --- the workspace ----------------------------------------------------------------------------------------
def test_manifest_lists_every_folder_and_plan(workspace, manifest):
    assert manifest["root"] == str(workspace)
    assert {f["task"] for f in manifest["fine_tunes"]} == set(TASK_NAMES)
    assert len({f["steps"] for f in manifest["fine_tunes"]}) > 1  # task vectors of different sizes
    assert {t["kind"] for t in manifest["traps"]} == {"different_base", "grown_vocab"}
    folders = [manifest["base"], *(e["path"] for e in manifest["fine_tunes"] + manifest["lora"] + manifest["traps"])]
    for folder in folders:
        assert open_checkpoint(workspace / folder) is not None
    assert {p["method"] for p in manifest["plans"]} >= {"linear", "task_arithmetic", "ties", "dare_ties", "slerp"}
    for plan in manifest["plans"]:
        build_job(load_plan(workspace / plan["path"]))  # every plan resolves


def test_manifest_accuracies_match_evaluation_from_the_folders(manifest, scores):
    for folder, measured in scores.items():
        assert manifest["accuracy"][folder] == pytest.approx(measured, abs=1e-9), folder


def test_lora_adapter_is_base_plus_scaled_b_times_a(workspace, manifest):
    entry = manifest["lora"][0]
    folder = workspace / entry["path"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(workspace / "base")
    adapter = load_file(folder / "adapter_model.safetensors")
    base = load_file(workspace / "base" / "model.safetensors")
    module = "model.layers.1.mlp.up_proj"
    a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
    b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
    expected = base[f"{module}.weight"].double() + config["lora_alpha"] / config["r"] * (b @ a)
    read = open_checkpoint(folder).read(f"{module}.weight", torch.float64)
    assert torch.allclose(read, expected, atol=1e-6)
    assert torch.equal(open_checkpoint(folder).read("model.norm.weight"), base["model.norm.weight"])


def test_moved_workspace_is_reused_with_its_paths_rewritten(workspace, tmp_path, monkeypatch):
    moved = tmp_path / "moved"
    shutil.copytree(workspace, moved)
    calls = []
    assert build_workspace(moved, lambda *a: calls.append(a)) == moved
    assert calls == []  # nothing retrained
    assert read_manifest(moved)["root"] == str(moved)
    adapter = json.loads((moved / "lora_sort" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(moved / "base")
    plan = load_plan(moved / "plans" / "task_arithmetic.yml")
    assert plan.base_model == str(moved / "base")
    monkeypatch.chdir(tmp_path)  # plans work from any directory
    assert main(["merge", str(moved / "plans" / "task_arithmetic.yml"), "-o", "out", "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_portable_kernels_pin_aten_mkl_and_threads_and_native_changes_nothing():
    outer = {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AUTO", "PATH": "/bin"}
    portable = build_environment(PORTABLE, outer)
    assert portable == {**outer, **PORTABLE_ENVIRONMENT}
    assert portable["ATEN_CPU_CAPABILITY"] == "default" and portable["MKL_CBWR"] == "COMPATIBLE"
    assert build_environment(NATIVE, outer) == outer
    assert outer["ATEN_CPU_CAPABILITY"] == "avx512"  # the caller's mapping is not touched


def _tiny_build(folder: Path, monkeypatch, kernels: str = PORTABLE, recipe: Recipe = TINY, **outer: str) -> dict:
    """Build the tiny recipe into ``folder`` with ``outer`` set in this process's environment (as a user's
    shell would), and return its manifest."""
    with monkeypatch.context() as patch:
        for name, value in outer.items():
            patch.setenv(name, value)
        build_workspace(folder, recipe=recipe, kernels=kernels)
    return read_manifest(folder)


def test_portable_build_gives_the_same_bytes_whatever_kernels_the_caller_asks_for(tmp_path, monkeypatch):
    """Two outer settings that make torch pick different kernels (shown by the native builds differing)
    give byte-identical portable builds, and the caller's environment is left as it was."""
    before = dict(os.environ)
    avx2 = _tiny_build(tmp_path / "avx2", monkeypatch, ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2")
    scalar = _tiny_build(tmp_path / "default", monkeypatch, ATEN_CPU_CAPABILITY="default",
                         MKL_ENABLE_INSTRUCTIONS="SSE4_2")
    assert dict(os.environ) == before
    assert avx2["weights_sha256"] == scalar["weights_sha256"]
    assert avx2["accuracy"] == scalar["accuracy"]
    assert avx2["kernels"] == "portable" and avx2["seed"] == TINY.seed
    assert set(avx2["weights_sha256"]) == {
        "base", "ft_add", "ft_reverse", "ft_sort", "lora_sort", "trap_other_base", "trap_grown_vocab"}
    native = _tiny_build(tmp_path / "native", monkeypatch, NATIVE, ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE")
    assert native["weights_sha256"] == avx2["weights_sha256"]  # the pins are exactly those variables
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":  # a CPU with vector kernels: they change the bits
        native_own = _tiny_build(tmp_path / "native-own", monkeypatch, NATIVE, ATEN_CPU_CAPABILITY="avx2",
                                 MKL_CBWR="AUTO")
        assert native_own["weights_sha256"]["base"] != avx2["weights_sha256"]["base"]


def test_the_seed_changes_every_model_and_is_recorded(tmp_path, monkeypatch):
    first = _tiny_build(tmp_path / "a", monkeypatch)
    other = _tiny_build(tmp_path / "b", monkeypatch, recipe=Recipe(**{**TINY.__dict__, "seed": TINY.seed + 1}))
    assert other["seed"] == TINY.seed + 1 and other["recipe"]["seed"] == TINY.seed + 1
    assert all(first["weights_sha256"][m] != other["weights_sha256"][m] for m in first["weights_sha256"])


def test_a_folder_that_is_not_a_workspace_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MergescopeError, match="not a mergescope demo workspace"):
        build_workspace(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- what the merges do -------------------------------------------------------------------------------------
@pytest.mark.parametrize("claim", CLAIMS, ids=[c.name for c in CLAIMS])
def test_the_story_claim_holds(claim, story_scores):
    assert claim.holds(story_scores), (claim.name, claim.value(story_scores), claim.condition, story_scores)


def test_the_ties_merge_diagnosis_gives_every_lost_skill_a_finding_and_names_the_election(story_scores, merged):
    """Issue 11's question on the demo: the TIES merge loses skills (measured here), and the diagnosis — which
    never sees an accuracy — has a finding for each source whose skill was lost, naming the sign election
    and the larger task vector that won it where that is the largest part."""
    diagnosis = diagnose_merged_folder(merged("ties"), device="cpu")
    lost = [m for m, t in FINE_TUNES.items() if kept(story_scores, "ties", m, t) < 0.5]
    assert lost  # the story: TIES of the three loses a skill
    with_findings = {f.source for f in diagnosis.findings}
    assert set(lost) <= with_findings, (lost, diagnosis.summary)
    elections = [f for f in diagnosis.findings
                 if "to the sign election where" in f.cause and "× larger there" in f.cause]
    assert elections and all(f.advice.startswith("lower ") for f in elections)


def test_task_arithmetic_merge_is_base_plus_both_task_vectors(workspace, merged):
    result = load_file(merged("task_arithmetic") / "model.safetensors")
    base, add, sort = (load_file(workspace / f / "model.safetensors") for f in ("base", "ft_add", "ft_sort"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.norm.weight"):
        expected = base[name] + (add[name] - base[name]) + (sort[name] - base[name])
        assert torch.allclose(result[name], expected, atol=1e-6)


def test_different_base_trap_is_flagged(workspace):
    base = open_checkpoint(workspace / "base")
    models = [open_checkpoint(workspace / "ft_add"), open_checkpoint(workspace / "trap_other_base")]
    report = run_analysis(base, models, use_cache=False)
    flagged = {w["model"] for w in report["warnings"] if w["code"] == "different_base"}
    assert flagged == {"trap_other_base"}


def test_grown_vocabulary_trap_is_flagged_and_refused_by_merges(workspace):
    base = open_checkpoint(workspace / "base")
    report = run_analysis(base, [open_checkpoint(workspace / "trap_grown_vocab")], use_cache=False)
    codes = {(w["code"], w["tensor"]) for w in report["warnings"]}
    assert ("vocab_mismatch", "model.embed_tokens.weight") in codes and ("vocab_mismatch", "lm_head.weight") in codes
    assert ("tokenizer_mismatch", None) in codes
    plan = parse_plan(f"merge_method: task_arithmetic\nbase_model: {workspace / 'base'}\n"
                      f"models:\n  - model: {workspace / 'trap_grown_vocab'}\n    parameters: {{weight: 1.0}}\n")
    with pytest.raises(PlanError, match="vocabulary size"):
        build_job(plan)
    assert evaluate(workspace / "trap_grown_vocab", ["add"], limit=20)["add"] >= 0  # still a demo model


# --- evaluation and the commands ----------------------------------------------------------------------------
def test_evaluate_refuses_a_model_that_is_not_a_demo_model(tmp_path):
    folder = write_model(tmp_path / "llama", llama_state(), llama_config())
    with pytest.raises(MergescopeError, match="not a mergescope demo model") as raised:
        evaluate(folder)
    assert "\n" not in str(raised.value)
    with pytest.raises(MergescopeError, match="unknown demo task 'mul'"):
        evaluate(folder, ["mul"])
    same_shape = llama_config(vocab=50, hidden=16, heads=4, kv_heads=4)  # a demo-shaped Llama without vocab.json
    folder = write_model(tmp_path / "no_vocab", llama_state(same_shape), same_shape)
    with pytest.raises(MergescopeError, match="no vocab.json"):
        evaluate(folder)


def test_eval_command_ends_in_the_mean_accuracy(workspace, scores, capsys):
    assert main(["eval", str(workspace / "ft_sort"), "--task", "sort", "--task", "add"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    mean = (scores["ft_sort"]["sort"] + scores["ft_sort"]["add"]) / 2
    assert float(lines[-1]) == pytest.approx(mean, abs=1e-4)
    assert any("sort" in line and f"{scores['ft_sort']['sort']:.1%}" in line for line in lines)
    assert main(["eval", str(workspace / "lora_sort"), "--task", "sort", "--limit", "40", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["prompts"] == {"sort": 40}
    assert document["mean"] == document["accuracy"]["sort"]


def test_eval_command_error_is_one_line(tmp_path, capsys):
    folder = write_model(tmp_path / "llama", llama_state(), llama_config())
    assert main(["eval", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mergescope: error:") and err.count("\n") == 1


def test_demo_command_reuses_the_workspace_and_prints_how_to_open_it(workspace, manifest, capsys):
    assert main(["demo", str(workspace), "--no-tui"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"mergescope inspect {workspace}"
    assert "already" in captured.err
    assert (workspace / MANIFEST).stat().st_size > 0


def readme_single_build_table() -> dict[str, dict[str, float]]:
    """The README's table of one build (seed 0, portable, torch 2.13.0): model or merge → task → accuracy."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("| seed 0, portable, torch 2.13.0 |")
    lines = text[start:].split("\n\n", 1)[0].splitlines()
    tasks = [cell.strip() for cell in lines[0].strip("|").split("|")[1:]]
    table = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0].strip("`")] = {t: float(c.rstrip("%")) / 100 for t, c in zip(tasks, cells[1:])}
    return table


@pytest.mark.skipif(not torch.__version__.startswith("2.13.0"), reason="the README's one-build table is torch 2.13.0's")
def test_readme_one_build_table_is_this_build(story_scores, manifest):
    """The README's exact numbers are what the default build gives under the torch it names."""
    assert manifest["seed"] == 0 and manifest["kernels"] == PORTABLE
    table = readme_single_build_table()
    assert len(table) == 15
    for model, accuracies in table.items():
        for task, accuracy in accuracies.items():
            assert story_scores[model][task] == pytest.approx(accuracy, abs=1e-9), (model, task)
