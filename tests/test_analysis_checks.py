"""Compatibility warnings, the report cache, cancellation, progress events, model names and the
``mergescope analyze`` command."""

from __future__ import annotations

import itertools
import json
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import analysis_reference as ref
from analysis_reference import assert_report, noise, plus
from builders import llama_config, llama_state, write_model, write_tokenizer
from mergescope.analysis import AnalysisCancelled, Progress, TensorResult, run_analysis, stream_analysis, unique_names
from mergescope.checkpoints import open_checkpoint
from mergescope.tui.cli.main import main

CONFIG = llama_config()
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
CODES = {"different_base", "vocab_mismatch", "shape_mismatch", "missing_tensor", "extra_tensor", "non_finite",
         "tokenizer_mismatch", "architecture_mismatch"}


def folder(tmp_path, name, state, config=None, tokenizer_extra: str | None = ""):
    path = write_model(tmp_path / name, state, config or CONFIG)
    if tokenizer_extra is not None:
        write_tokenizer(path, CONFIG["vocab_size"], tokenizer_extra)
    return path


def analyse(tmp_path, base_state, models: dict, **kwargs):
    """``models`` maps name → state dict, or → (state dict, config, tokenizer suffix)."""
    base = open_checkpoint(folder(tmp_path, "base", base_state))
    checkpoints = []
    for name, spec in models.items():
        state, config, extra = spec if isinstance(spec, tuple) else (spec, None, "")
        checkpoints.append(open_checkpoint(folder(tmp_path, name, state, config, extra)))
    return run_analysis(base, checkpoints, **{"use_cache": False, **kwargs})


def codes(report, model=None) -> list[str]:
    return [w["code"] for w in report["warnings"] if model is None or w["model"] == model]


def only(report, code) -> list[dict]:
    return [w for w in report["warnings"] if w["code"] == code]


@pytest.fixture
def base_state():
    return llama_state(CONFIG, seed=0)


@pytest.fixture
def tuned(base_state):
    return plus(base_state, noise(base_state, 1))


# --- warnings ----------------------------------------------------------------------------------------------
def test_clean_fixture_has_no_warnings(tmp_path, base_state, tuned):
    report = analyse(tmp_path, base_state, {"ft": tuned, "ft2": plus(base_state, noise(base_state, 2))})
    assert report["warnings"] == []


def test_different_base(tmp_path, base_state, tuned):
    report = analyse(tmp_path, base_state, {"ft": tuned, "other": llama_state(CONFIG, seed=7)})
    assert codes(report) == ["different_base"]
    (warning,) = report["warnings"]
    assert warning["model"] == "other" and warning["tensor"] is None and "not a fine-tune" in warning["message"]
    rels = sorted(t["delta"]["other"]["rel"] for t in report["tensors"] if len(t["shape"]) == 2)
    assert np.median(rels) > 0.5 > max(t["delta"]["ft"]["rel"] for t in report["tensors"] if len(t["shape"]) == 2)


def test_vocab_mismatch_compares_shared_rows(tmp_path, base_state, tuned):
    grown_config = llama_config(vocab=72)
    grown = dict(tuned)
    g = torch.Generator().manual_seed(9)
    for name in (EMBED, HEAD):
        grown[name] = torch.cat([tuned[name], torch.randn(8, 16, generator=g)])
    report = analyse(
        tmp_path, base_state, {"grown": (grown, grown_config, ""), "ft": plus(base_state, noise(base_state, 2))}
    )
    warnings = only(report, "vocab_mismatch")
    assert sorted(w["tensor"] for w in warnings) == sorted([EMBED, HEAD]) and all(
        w["model"] == "grown" for w in warnings
    )
    for w in warnings:
        assert "72 rows" in w["message"] and "8 extra rows (ids 64–71)" in w["message"]
    assert set(codes(report)) == {"vocab_mismatch"}
    tensors = {t["name"]: t for t in report["tensors"]}
    for name in (EMBED, HEAD):
        assert tensors[name]["compared_rows"] == 64 and tensors[name]["numel"] == 64 * 16
        assert tensors[name]["shape"] == [64, 16]
    shared = {"grown": {n: v[:64] if n in (EMBED, HEAD) else v for n, v in grown.items()},
              "ft": plus(base_state, noise(base_state, 2))}
    assert_report(report, ref.reference_from_states(base_state, shared))


def test_shape_missing_and_extra_tensors(tmp_path, base_state, tuned):
    up, down = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"
    odd = dict(tuned)
    odd[up] = torch.randn(48, 16)  # not vocabulary-indexed: not compared
    del odd[down]
    odd["model.layers.0.extra.weight"] = torch.randn(4)
    other = plus(base_state, noise(base_state, 2))
    report = analyse(tmp_path, base_state, {"odd": odd, "ft": other}, density=0.5)
    assert sorted(codes(report)) == ["extra_tensor", "missing_tensor", "shape_mismatch"]
    assert [(w["model"], w["tensor"]) for w in only(report, "shape_mismatch")] == [("odd", up)]
    assert [(w["model"], w["tensor"]) for w in only(report, "missing_tensor")] == [("odd", down)]
    assert [(w["model"], w["tensor"]) for w in only(report, "extra_tensor")] == [("odd", "model.layers.0.extra.weight")]
    tensors = {t["name"]: t for t in report["tensors"]}
    assert "model.layers.0.extra.weight" not in tensors
    for name in (up, down):
        assert tensors[name]["delta"]["odd"] is None and tensors[name]["delta"]["ft"] is not None
        assert all(v is None for k, v in tensors[name]["pairs"][0].items() if k not in ("a", "b"))
    # in groups and the total the absent τ counts as 0
    assert_report(report, ref.reference_from_states(base_state, {"odd": odd, "ft": other}, 0.5))


def test_non_finite_in_a_model_and_in_the_base(tmp_path, base_state, tuned):
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    bad_model = {n: v.clone() for n, v in tuned.items()}
    bad_model[q].view(-1)[[3, 50, 200]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    bad_base = {n: v.clone() for n, v in base_state.items()}
    bad_base[k].view(-1)[[0, 7]] = torch.tensor([float("nan"), float("inf")])
    models = {"bad": bad_model, "ft": plus(base_state, noise(base_state, 2))}
    report = analyse(tmp_path, bad_base, models, density=0.5)
    json.dumps(report, allow_nan=False)
    found = {(w["model"], w["tensor"]): w for w in only(report, "non_finite")}
    assert set(found) == {("bad", q), (None, k)}
    assert "3 NaN/Inf values in bad" in found[("bad", q)]["message"]
    assert "2 NaN/Inf values in the base" in found[(None, k)]["message"]
    assert set(codes(report)) == {"non_finite"}
    # those elements count as 0: τ is 0 where the model or the base is not finite, and θ₀ is 0 where it is not
    expected = ref.reference_from_states(bad_base, models, 0.5)
    assert np.count_nonzero(ref.task_vector(bad_base[q], bad_model[q])) == bad_model[q].numel() - 3
    assert_report(report, expected)


def test_tokenizer_and_architecture_mismatch(tmp_path, base_state, tuned):
    mistral = dict(CONFIG, architectures=["MistralForCausalLM"], model_type="mistral")
    report = analyse(tmp_path, base_state, {
        "same": tuned, "tok": (tuned, None, "x"), "arch": (tuned, mistral, ""), "untokenized": (tuned, None, None),
    })
    assert codes(report, "same") == [] and codes(report, "untokenized") == []
    assert codes(report, "tok") == ["tokenizer_mismatch"] and codes(report, "arch") == ["architecture_mismatch"]
    assert "MistralForCausalLM" in only(report, "architecture_mismatch")[0]["message"]
    assert all(set(w) == {"code", "model", "tensor", "message"} and w["code"] in CODES for w in report["warnings"])


# --- cache ----------------------------------------------------------------------------------------------------
def test_cache_hit_reads_nothing_and_a_rewrite_invalidates(tmp_path, monkeypatch, cache_dir, base_state, tuned):
    base_dir, ft_dir = folder(tmp_path, "base", base_state), folder(tmp_path, "ft", tuned)
    first = run_analysis(open_checkpoint(base_dir), [open_checkpoint(ft_dir)])
    assert (cache_dir / "analysis.sqlite").is_file()

    def no_reads(info, out=None, **rows):
        raise AssertionError(f"read {info.name} on a cache hit")

    with monkeypatch.context() as m:
        m.setattr("mergescope.checkpoints.safetensors_format.read_bytes", no_reads)
        assert run_analysis(open_checkpoint(base_dir), [open_checkpoint(ft_dir)]) == first
        other = plus(base_state, noise(base_state, 5))
        write_model(ft_dir, other, CONFIG)
        stat = (ft_dir / "model.safetensors").stat()
        os.utime(ft_dir / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        with pytest.raises(AssertionError, match="on a cache hit"):
            run_analysis(open_checkpoint(base_dir), [open_checkpoint(ft_dir)])
    fresh = run_analysis(open_checkpoint(base_dir), [open_checkpoint(ft_dir)])
    assert fresh != first
    assert_report(fresh, ref.reference_from_states(base_state, {"ft": other}))
    assert (
        run_analysis(open_checkpoint(base_dir), [open_checkpoint(ft_dir)], density=0.5) != fresh
    )  # density is in the key


# --- cancellation, progress, names -----------------------------------------------------------------------------
def test_cancel_after_first_tensor(tmp_path, monkeypatch, base_state, tuned):
    base = open_checkpoint(folder(tmp_path, "base", base_state))
    models = [open_checkpoint(folder(tmp_path, "ft", tuned))]
    cancel, seen = threading.Event(), []

    def on_event(event):
        seen.append(event)
        if isinstance(event, TensorResult):
            cancel.set()

    with pytest.raises(AnalysisCancelled):
        run_analysis(base, models, on_event=on_event, cancel=cancel)
    assert sum(isinstance(e, TensorResult) for e in seen) == 1
    # nothing was cached: a second run must read tensors
    monkeypatch.setattr("mergescope.checkpoints.safetensors_format.read_bytes", lambda info, out=None, **rows: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run_analysis(base, models)


def test_progress_reaches_total(tmp_path, base_state, tuned):
    base = open_checkpoint(folder(tmp_path, "base", base_state))
    short = {n: v for n, v in tuned.items() if n != HEAD}
    models = [open_checkpoint(folder(tmp_path, "ft", tuned)), open_checkpoint(folder(tmp_path, "short", short))]
    events = list(stream_analysis(base, models, ["ft", "short"]))
    progress = [e for e in events if isinstance(e, Progress)]
    results = [e for e in events if isinstance(e, TensorResult)]
    assert len(progress) == len(results) == len(base_state)
    done = [p.bytes_done for p in progress]
    assert done == sorted(done) and done[0] > 0
    expected_total = sum(v.numel() * 4 for v in base_state.values()) * 2 + sum(v.numel() * 4 for v in short.values())
    assert progress[-1].bytes_done == progress[-1].bytes_total == expected_total
    assert progress[-1].tensors_done == progress[-1].tensors_total == len(base_state)
    assert progress[-1].eta_s == 0 and [p.current for p in progress] == [r.name for r in results]


def test_unique_names():
    options = ["m", "m-2", "m-3", "m-2-2", "n"]
    for length in range(1, 5):
        for combo in itertools.product(options, repeat=length):
            names = unique_names([SimpleNamespace(name=n) for n in combo])
            assert len(set(names)) == len(names), (combo, names)
            assert all(got == want or got.startswith(want + "-") for got, want in zip(names, combo))
            assert names[0] == combo[0]
    assert unique_names([SimpleNamespace(name=n) for n in ["m", "m", "m"]]) == ["m", "m-2", "m-3"]


def test_colliding_folder_names_in_report(tmp_path, base_state, tuned):
    base = open_checkpoint(folder(tmp_path, "base", base_state))
    a = open_checkpoint(folder(tmp_path / "a", "model", tuned))
    b = open_checkpoint(folder(tmp_path / "b", "model", plus(base_state, noise(base_state, 2))))
    report = run_analysis(base, [a, b], use_cache=False)
    assert [m["name"] for m in report["models"]] == ["model", "model-2"]
    assert [(p["a"], p["b"]) for p in report["total"]["pairs"]] == [("model", "model-2")]


# --- command line -----------------------------------------------------------------------------------------------
def test_cli_json_to_stdout(tmp_path, capsys, base_state, tuned):
    paths = [
        str(folder(tmp_path, n, s))
        for n, s in [("base", base_state), ("m1", tuned), ("m2", plus(base_state, noise(base_state, 2)))]
    ]
    assert main(["analyze", *paths, "--json", "-", "--density", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schema"] == "mergescope.analysis/1" and [m["name"] for m in report["models"]] == ["m1", "m2"]
    assert report["density"] == 0.5 and "conflict_all_trimmed" in report["total"]
    models = {"m1": tuned, "m2": plus(base_state, noise(base_state, 2))}
    assert_report(report, ref.reference_from_states(base_state, models, 0.5))


@pytest.mark.parametrize("density", ["0", "1.5", "-0.1"])
def test_cli_bad_density(tmp_path, capsys, base_state, tuned, density):
    paths = [str(folder(tmp_path, "base", base_state)), str(folder(tmp_path, "m1", tuned))]
    assert main(["analyze", *paths, "--json", "-", "--no-cache", "--density", density]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--density" in captured.err and "Traceback" not in captured.err


def test_cli_tables_at_a_density_show_the_trimmed_conflicts_their_titles_name(tmp_path, capsys, base_state, tuned):
    """The per-layer conflict column and the pairwise matrix both show the trimmed rates under --density, and
    their titles and legend say so; without --density both show the untrimmed rates."""
    other = plus(base_state, noise(base_state, 2))
    paths = [str(folder(tmp_path, n, s)) for n, s in [("base", base_state), ("m1", tuned), ("m2", other)]]
    assert main(["analyze", *paths, "--json", "-", "--density", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["analyze", *paths, "--density", "0.5"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    whole_row = printed.split("whole model", 1)[1].split("│")[1:5]  # m1, m2, conflict, cancel cells
    trimmed, untrimmed = report["total"]["conflict_all_trimmed"], report["total"]["conflict_all"]
    assert f"{trimmed:.3f}" != f"{untrimmed:.3f}"
    assert whole_row[2].strip() == f"{trimmed:.3f}"
    assert "Sign-conflict rate (whole model, trimmed to density 0.5)" in printed
    assert "after each τ is trimmed to its top 0.5 by magnitude" in printed
    assert main(["analyze", *paths]) == 0
    assert "Sign-conflict rate (whole model)" in " ".join(capsys.readouterr().out.split())
