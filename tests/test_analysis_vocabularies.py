"""The analysis across vocabularies: embedding and head rows compared by token string, statistics over the shared
tokens only, each model's added and lost tokens reported (analysis/vocabulary_rows.py). Fixtures are written by
transformers (tests/hf_fixtures.py); expected numbers are computed here in float64 from the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_fixtures as hf
from mergescope.analysis.report import run_analysis
from mergescope.checkpoints import open_checkpoint

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-vocab")
    base = hf.write_llama_base(root / "base")
    ft = hf.write_fine_tune(base, root / "ft", seed=1)
    return {
        "base": base, "ft": ft,
        "chat": hf.write_chat_fine_tune(base, root / "chat", seed=2),
        "reordered": hf.write_reordered(ft, root / "reordered"),
    }


def vocab_of(folder: Path) -> dict[str, int]:
    document = json.loads((folder / "tokenizer.json").read_text())
    return {**document["model"]["vocab"], **{e["content"]: e["id"] for e in document["added_tokens"]}}


def analyse(models, *names):
    return run_analysis(open_checkpoint(str(models["base"])), [open_checkpoint(str(models[n])) for n in names],
                        device="cpu", use_cache=False)


def tensor(report: dict, name: str) -> dict:
    return next(t for t in report["tensors"] if t["name"] == name)


def test_rows_are_compared_by_token_string(models):
    """A model whose tokens sit at other ids is the same model token by token: its statistics equal the un-reordered
    fine-tune's, where comparing by id would count the swapped rows as changed."""
    report = analyse(models, "ft", "reordered")
    for name in VOCAB_TENSORS:
        delta = tensor(report, name)["delta"]
        assert delta["reordered"]["norm"] == pytest.approx(delta["ft"]["norm"], rel=1e-6)
        cosine = next(p for p in tensor(report, name)["pairs"])["cosine"]
        assert cosine == pytest.approx(1.0, abs=1e-6)
    assert report["vocabularies"]["reordered"] == {"added": [], "lost": [], "shared": 43}


def test_grown_vocabulary_counts_shared_rows_and_lists_added_tokens(models):
    report = analyse(models, "ft", "chat")
    assert report["vocabularies"]["chat"] == {"added": ["<pad>", "<|im_start|>", "<|im_end|>"], "lost": [],
                                              "shared": 43}
    base, chat = vocab_of(models["base"]), vocab_of(models["chat"])
    tokens = sorted(base, key=base.get)
    theta0 = {k: v.double() for k, v in load_file(str(models["base"] / "model.safetensors")).items()}
    theta = {k: v.double() for k, v in load_file(str(models["chat"] / "model.safetensors")).items()}
    for name in VOCAB_TENSORS:
        tau = theta[name][[chat[t] for t in tokens]] - theta0[name][[base[t] for t in tokens]]
        entry = tensor(report, name)
        assert entry["compared_rows"] == 43
        assert entry["delta"]["chat"]["norm"] == pytest.approx(float(tau.norm()), rel=1e-6)
    warning = next(w for w in report["warnings"] if w["code"] == "vocab_mismatch" and w["model"] == "chat")
    assert "added 3 (<pad>, <|im_start|>, <|im_end|>), lost 0" in warning["message"]


def test_lost_tokens_are_listed_when_the_base_has_more(models, tmp_path):
    """With the chat model as the base, the plain fine-tune lost the three chat tokens."""
    report = run_analysis(open_checkpoint(str(models["chat"])), [open_checkpoint(str(models["ft"]))],
                          device="cpu", use_cache=False)
    assert report["vocabularies"]["ft"] == {"added": [], "lost": ["<pad>", "<|im_start|>", "<|im_end|>"],
                                            "shared": 43}
    assert torch.isfinite(torch.tensor(tensor(report, "lm_head.weight")["delta"]["ft"]["norm"]))
