"""Diagnosis of a merged folder (``mergescope.analysis.diagnosis``) on fine-tunes whose task vectors the test
controls, merged by the real executor: retention, cosine and the removed shares against float64 numpy from
the tensors on disk, the plain-words summary, folder resolution and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from builders import llama_config, llama_state, write_model
from mergescope.analysis.diagnosis import diagnose_merged_folder
from mergescope.analysis.diagnosis_summary import _RunEffect, cause_of, describe_groups
from mergescope.checkpoints import MergescopeError
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan
from mergescope.tui.cli.main import main

NAMES = ("ft_a", "ft_b", "ft_c")
CONFLICT_LAYERS = (".layers.2.", ".layers.3.")


def group_of(name: str) -> str:
    match = re.match(r"^(.*?\.\d+)\.", name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def build_models(root) -> dict[str, dict]:
    """base and three fine-tunes. Entries are dealt to the sources by index mod 3 (disjoint supports), except in
    layers 2–3 where ft_b = base − τ_a on ft_a's entries: a direct sign conflict with ft_a."""
    config = llama_config(layers=4)
    base = llama_state(config, seed=0)
    g = torch.Generator().manual_seed(7)
    states = {"base": base, **{n: {} for n in NAMES}}
    for name, theta in base.items():
        tau = 0.05 * torch.randn(theta.shape, generator=g)
        owner = (torch.arange(theta.numel()) % 3).reshape(theta.shape)
        tau_a = tau * (owner == 0)
        states["ft_a"][name] = theta + tau_a
        states["ft_b"][name] = theta - tau_a if any(k in name for k in CONFLICT_LAYERS) else theta + tau * (owner == 1)
        states["ft_c"][name] = theta + tau * (owner == 2)
    for name, state in states.items():
        write_model(root / name, state, config, tokenizer_vocab=64)
    return states


@pytest.fixture(scope="module")
def diagnosis_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnosis")
    return root, build_models(root)


def merge(root, name: str, plan: dict, monkeypatch) -> tuple:
    """Run ``plan`` from ``root`` (relative model paths, as a user would) into ``root/name``; the tensors."""
    monkeypatch.chdir(root)
    (root / f"{name}.yml").write_text(yaml.safe_dump(plan, sort_keys=False))
    out = run_merge(build_job(load_plan(root / f"{name}.yml")), root / name, device="cpu")
    monkeypatch.chdir(root.parent)  # diagnosed from elsewhere: paths resolve against the merged folder's parent
    return out, load_file(out / "model.safetensors")


def ties_plan() -> dict:
    return {
        "merge_method": "ties", "base_model": "base", "dtype": "float32",
        "models": [
            {"model": "ft_a", "parameters": {"weight": 1.0, "density": 1.0}},
            {"model": "ft_b", "parameters": {"weight": 0.5, "density": 1.0}},
            {
                "model": "ft_c",
                "parameters": {"weight": 1.0, "density": [{"filter": "lm_head", "value": 0.02}, {"value": 1.0}]},
            },
        ],
    }


def reference(states: dict, merged: dict) -> dict:
    """Per group and "total", per source: retention, cosine and the removed shares of Σ τᵢ², in float64 numpy from
    explicit sign masks (τ formed in float32 as θ − θ₀)."""
    pieces: dict[str, list] = {}
    for name, theta0 in states["base"].items():
        b = theta0.numpy().reshape(-1)
        taus = [states[n][name].numpy().reshape(-1) - b for n in NAMES]
        tau_m = merged[name].float().numpy().reshape(-1) - b
        for key in (group_of(name), "total"):
            pieces.setdefault(key, []).append((taus, tau_m))
    result = {}
    for key, parts in pieces.items():
        taus = [np.concatenate([p[0][i] for p in parts]).astype(np.float64) for i in range(3)]
        tau_m = np.concatenate([p[1] for p in parts]).astype(np.float64)
        per_source = {}
        for i, name in enumerate(NAMES):
            tau, own = taus[i], np.sign(taus[i])
            mass = tau**2
            total = mass[own != 0].sum()
            lost = (own != 0) & (np.sign(tau_m) != own)
            opposed = {NAMES[j]: lost & (np.sign(taus[j]) == -own) for j in range(3) if j != i}
            conflicted = np.logical_or.reduce(list(opposed.values()))
            per_source[name] = {
                "retention": tau_m @ tau / (tau @ tau),
                "cosine": tau_m @ tau / np.sqrt((tau @ tau) * (tau_m @ tau_m)),
                "lost": mass[lost].sum() / total,
                "reversed": mass[lost & (np.sign(tau_m) == -own)].sum() / total,
                "conflict": mass[conflicted].sum() / total,
                "trimmed": mass[lost & ~conflicted].sum() / total,
                "conflict_with": {j: mass[m].sum() / total for j, m in opposed.items()},
                "parts": loss_parts_reference(tau, tau_m, [taus[j] for j in range(3)], i),
            }
        result[key] = (np.linalg.norm(tau_m), per_source)
    return result


def loss_parts_reference(tau: np.ndarray, tau_m: np.ndarray, taus: list[np.ndarray], i: int) -> dict:
    """1 − retention split entry by entry (zeroed, reversed, shrunk, amplified shares of ‖τᵢ‖²), the reversed
    part split by the sources opposing there, and their magnitude ratios — float64, explicit masks."""
    norm = tau @ tau
    term = tau * (tau - tau_m)
    changed = tau != 0
    zeroed = changed & (tau_m == 0)
    reversed_ = changed & (tau * tau_m < 0)
    amplified = changed & (tau * tau_m > 0) & (np.abs(tau_m) > np.abs(tau))
    shrunk = changed & (tau * tau_m > 0) & ~amplified
    masks = {"zeroed": zeroed, "reversed": reversed_, "shrunk": shrunk, "amplified": amplified}
    parts = {k: term[m].sum() / norm for k, m in masks.items()}
    parts["reversed_by"], parts["ratio"] = {}, {}
    for j, other in enumerate(taus):
        opposed = reversed_ & (np.sign(other) == -np.sign(tau))
        if j != i and opposed.any():
            parts["reversed_by"][NAMES[j]] = term[opposed].sum() / norm
            parts["ratio"][NAMES[j]] = np.abs(other[opposed]).sum() / np.abs(tau[opposed]).sum()
    return parts


def assert_loss_parts(document: dict, want: dict, retention: float) -> None:
    """The diagnosis JSON's ``loss_parts`` of one source equal the float64 reference and add up to 1 − ρ."""
    got = document["loss_parts"]
    for part in ("zeroed", "reversed", "shrunk", "amplified"):
        assert got[part] == pytest.approx(want[part], rel=1e-6, abs=1e-9), part
    total = sum(got[p] for p in ("zeroed", "reversed", "shrunk", "amplified"))
    assert total == pytest.approx(1 - retention, abs=1e-6)
    assert got["reversed_by"] == pytest.approx(want["reversed_by"], rel=1e-6, abs=1e-9)
    assert got["ratio"] == pytest.approx(want["ratio"], rel=1e-6)


def test_ties_diagnosis_matches_numpy_and_names_the_conflict_and_the_trim(diagnosis_models, monkeypatch):
    root, states = diagnosis_models
    folder, merged = merge(root, "merged_ties", ties_plan(), monkeypatch)
    diagnosis = diagnose_merged_folder(folder.relative_to(root.parent), device="cpu")  # from the cwd
    expected = reference(states, merged)
    rows = {g.group: g for g in diagnosis.groups} | {"total": diagnosis.total}
    assert diagnosis.names == list(NAMES) and set(rows) == set(expected)
    for key, (merged_norm, per_source) in expected.items():
        assert rows[key].merged_norm == pytest.approx(merged_norm, rel=1e-6)
        for effect, name in zip(rows[key].sources, NAMES):
            want = per_source[name]
            for field in ("retention", "cosine", "lost", "reversed", "conflict", "trimmed"):
                assert getattr(effect, field) == pytest.approx(want[field], rel=1e-6, abs=1e-9), (key, name, field)
            assert effect.conflict_with == pytest.approx(want["conflict_with"], rel=1e-6, abs=1e-9)
    document = diagnosis.to_json()
    for group in [*document["groups"], document["total"]]:
        for name in NAMES:
            want = expected[group["name"]][1][name]
            assert_loss_parts(group["sources"][name], want["parts"], want["retention"])
    assert expected["model.layers.2"][1]["ft_b"]["parts"]["reversed"] > 1.9  # reversed entries cost τ² + |τ τ_m|
    # the shape of the case: ft_b is reversed by its conflict with ft_a in layers 2–3; ft_c trimmed in lm_head
    assert rows["model.layers.2"].sources[1].retention == pytest.approx(-1.0, abs=1e-5)
    assert rows["model.layers.2"].sources[1].conflict_with["ft_a"] == pytest.approx(1.0)
    lm_head_c = rows["lm_head"].sources[2]
    assert lm_head_c.trimmed == lm_head_c.lost > 0.5 and lm_head_c.conflict == 0
    assert rows["model.layers.0"].sources[0].retention == pytest.approx(1.0, abs=1e-5)

    found = {(f.source, tuple(f.groups)): f for f in diagnosis.findings}
    assert set(found) == {("ft_b", ("model.layers.2", "model.layers.3")), ("ft_c", ("lm_head",))}
    conflict = found["ft_b", ("model.layers.2", "model.layers.3")]
    # reversed entries cost τ² + |τ·τ_m| = 2τ² here; the election weighs 1·|τ_a| against 0.5·|τ_b|: 2× larger
    assert conflict.sentence == (
        "ft_b keeps -100% of its change in layers 2–3: loses 200% of its change to the sign election where ft_a "
        "disagrees, whose weighted change is 2.0× larger there"
    )
    assert conflict.advice == "lower ft_a's weight to ~0.5 (from 1)"
    trim = found["ft_c", ("lm_head",)]
    zeroed = expected["lm_head"][1]["ft_c"]["parts"]["zeroed"]
    assert trim.sentence.startswith("ft_c keeps ") and trim.sentence.endswith(
        f"of its change in lm_head: loses {round(100 * zeroed)}% of its change to trimming (density 0.02)")
    assert trim.advice == "raise its density to ~0.04"
    assert trim.retention == pytest.approx(expected["lm_head"][1]["ft_c"]["retention"], rel=1e-6)
    overall = [line for line in diagnosis.summary if "over the whole model" in line]
    assert [line.split()[0] for line in overall] == list(NAMES)
    assert overall[1].startswith(f"ft_b keeps {round(100 * expected['total'][1]['ft_b']['retention'])}% ")


def test_a_small_weight_is_named_as_the_cause(diagnosis_models, monkeypatch):
    root, states = diagnosis_models
    plan = {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32", "models": [
        {"model": "ft_a", "parameters": {"weight": 1.0}},
        {"model": "ft_c", "parameters": {"weight": 0.2}},
    ]}
    folder, merged = merge(root, "merged_ta", plan, monkeypatch)
    diagnosis = diagnose_merged_folder(folder, device="cpu")
    assert diagnosis.names == ["ft_a", "ft_c"]
    # disjoint supports: each keeps exactly its weight, everywhere
    for group in [*diagnosis.groups, diagnosis.total]:
        assert [e.retention for e in group.sources] == pytest.approx([1.0, 0.2], abs=1e-5)
        assert [e.lost for e in group.sources] == pytest.approx([0.0, 0.0])
    [finding] = diagnosis.findings
    assert finding.source == "ft_c" and finding.groups == [g.group for g in diagnosis.groups]
    assert finding.sentence == (
        "ft_c keeps 20% of its change in model.embed_tokens, layers 0–3, model.norm and lm_head: loses 80% of its "
        "change to its weight there (0.2)"
    )


def test_plan_without_base_model_needs_base_and_relative_paths_resolve(diagnosis_models, monkeypatch, tmp_path):
    root, states = diagnosis_models
    plan = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": "ft_a", "parameters": {"weight": 1.0}}, {"model": "ft_c", "parameters": {"weight": 1.0}},
    ]}
    folder, merged = merge(root, "merged_soup", plan, monkeypatch)
    with pytest.raises(MergescopeError, match=r"has no base_model.*--base BASE"):
        diagnose_merged_folder(folder)
    diagnosis = diagnose_merged_folder(folder, base=str(root / "base"), device="cpu")
    assert diagnosis.total.sources[0].retention == pytest.approx(0.5, abs=1e-5)  # orthogonal soup: half each
    assert diagnosis.method == "linear" and diagnosis.references == ["ft_a", "ft_c"]
    moved = tmp_path / "elsewhere" / "merged_soup"
    moved.parent.mkdir()
    folder.rename(moved)
    with pytest.raises(MergescopeError, match=r"names model ft_a, found neither as given nor in .*elsewhere"):
        diagnose_merged_folder(moved, base=str(root / "base"))
    with pytest.raises(MergescopeError, match="no mergekit_config.yml"):
        diagnose_merged_folder(root / "base")


def test_slerp_between_two_fine_tunes_is_diagnosed_against_the_given_base(diagnosis_models, monkeypatch):
    """slerp's base_model is its t = 0 fine-tune; with --base (the real base) both fine-tunes are sources, each
    measured against the base, not one against the other."""
    root, states = diagnosis_models
    plan = {"merge_method": "slerp", "base_model": "ft_a", "dtype": "float32", "parameters": {"t": 0.5},
            "models": [{"model": "ft_a"}, {"model": "ft_c"}]}
    folder, merged = merge(root, "merged_slerp", plan, monkeypatch)
    diagnosis = diagnose_merged_folder(folder, base=str(root / "base"), device="cpu")
    assert diagnosis.names == ["ft_a", "ft_c"]
    base = np.concatenate([states["base"][k].numpy().ravel() for k in states["base"]]).astype(np.float64)
    tau_m = np.concatenate([merged[k].float().numpy().ravel() for k in states["base"]]).astype(np.float64) - base
    for effect, name in zip(diagnosis.total.sources, ("ft_a", "ft_c")):
        tau = np.concatenate([states[name][k].numpy().ravel() for k in states["base"]]).astype(np.float64) - base
        assert effect.retention == pytest.approx(tau_m @ tau / (tau @ tau), rel=1e-5)


def test_cli_prints_tables_and_summary_and_writes_json(diagnosis_models, monkeypatch, capsys):
    root, states = diagnosis_models
    folder, _ = merge(root, "merged_cli", ties_plan(), monkeypatch)
    assert main(["diagnose", str(folder), "--device", "cpu", "--json", "-"]) == 0
    document = json.loads(capsys.readouterr().out)
    diagnosis = diagnose_merged_folder(folder, device="cpu")
    assert document["schema"] == "mergescope.diagnosis/2" and document["method"] == "ties"
    assert [s["name"] for s in document["sources"]] == list(NAMES)
    assert document["summary"] == diagnosis.summary
    group = next(g for g in document["groups"] if g["name"] == "model.layers.3")
    assert group["sources"]["ft_b"]["retention"] == pytest.approx(diagnosis.groups[4].sources[1].retention)
    assert main(["diagnose", str(folder), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert ("ft_b keeps -100% of its change in layers 2–3: loses 200% of its change to the sign election"
            in " ".join(printed.split()))
    assert main(["diagnose", str(root / "nothing-here")]) == 2
    assert "mergescope: error:" in capsys.readouterr().err


def run_effect(retention: float, lost: float, conflict: float, **rest) -> _RunEffect:
    shares = {"lost": lost, "reversed": 0.0, "conflict": conflict, "trimmed": lost - conflict}
    return _RunEffect(mass=1.0, retention=retention, shares=shares, share_mass=1.0, **rest)


def test_cause_rules_at_their_boundaries():
    # sign losses explain at least half the shortfall 1 − ρ: named, else the weight is
    assert (
        cause_of(run_effect(0.09, 0.46, 0.46, conflict_with={"ft_c": 0.46, "ft_b": 0.1}), True)
        == "sign conflicts with ft_c there"
    )
    assert cause_of(run_effect(0.09, 0.44, 0.44, conflict_with={"ft_c": 0.44}, weight=1.0, weight_total=3.0), True) == (
        "averaged in with weight 1 of 3"
    )
    assert cause_of(run_effect(0.2, 0.45, 0.05, density=0.1), None) == "trimmed away there (density 0.1)"
    assert cause_of(run_effect(0.2, 0.45, 0.05), None) == (
        "zeroed there where no other source disagrees (a trim or drop)"
    )
    opposite = run_effect(-0.3, 0.4, 0.4, conflict_with={"ft_a": 0.4})
    assert cause_of(opposite, None) == "the merge moves the opposite way there"
    two_culprits = run_effect(-0.3, 0.5, 0.5, conflict_with={"ft_a": 0.5, "ft_c": 0.41})
    assert cause_of(two_culprits, None) == "sign conflicts with ft_a and ft_c there"
    assert cause_of(run_effect(0.25, 0.1, 0.1, weight=0.25), False) == "its weight there is 0.25"


def test_groups_are_described_as_layer_ranges():
    assert describe_groups(["model.layers.18", "model.layers.19", "model.layers.20"]) == "layers 18–20"
    assert describe_groups(["model.layers.3"]) == "layer 3"
    assert describe_groups(["model.layers.15", "model.norm", "lm_head"]) == "layer 15, model.norm and lm_head"
    assert describe_groups(["model.layers.2", "model.layers.4"]) == "layer 2 and layer 4"
    assert (describe_groups(["encoder.block.4", "encoder.block.5", "decoder.block.0"])
            == "encoder.block 4–5 and decoder.block 0")


@pytest.mark.mergekit
def test_loss_parts_of_a_mergekit_merge_match_numpy(diagnosis_models, monkeypatch):
    """A folder written by mergekit itself (its own mergekit_config.yml beside the weights) is diagnosed
    exactly: the parts need only θ₀, θᵢ and θ_m."""
    from mergekit_reference import mergekit_available, run_mergekit

    if not mergekit_available():
        pytest.skip("mergekit venv missing (python benchmarks/mergekit_env.py)")
    root, states = diagnosis_models
    plan = {**ties_plan(), "base_model": str(root / "base"),
            "models": [{**m, "model": str(root / m["model"])} for m in ties_plan()["models"]]}
    folder = run_mergekit(plan, root / "mergekit_ties")
    merged = load_file(folder / "model.safetensors") if (folder / "model.safetensors").exists() else {
        k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    document = diagnose_merged_folder(folder, device="cpu").to_json()
    expected = reference(states, merged)
    for group in [*document["groups"], document["total"]]:
        for name in NAMES:
            want = expected[group["name"]][1][name]
            assert_loss_parts(group["sources"][name], want["parts"], want["retention"])
