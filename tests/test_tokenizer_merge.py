"""Tokenizer-aware merging on checkpoints written by transformers itself: a base, a plain fine-tune and two chat
fine-tunes that added tokens and resized their embeddings (tests/hf_fixtures.py).

Expected merged rows are computed here in float64 from the inputs' own files, matching rows by token string with
an implementation written for the test (the documented rule of mergescope.merge.vocabulary_merge), never from
mergescope's output. mergekit 0.1.5 itself is compared in tests/test_mergekit_tokenizer.py.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hf_fixtures as hf
from mergescope.merge.chat_templates import NAMED_TEMPLATES
from mergescope.merge.job import build_job
from mergescope.merge.plan import PlanError, parse_plan

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
CHAT_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-chat")
    base = hf.write_llama_base(root / "base")
    return {
        "base": base,
        "ft": hf.write_fine_tune(base, root / "ft", seed=1),
        "chat": hf.write_chat_fine_tune(base, root / "chat", seed=2),
        "chat2": hf.write_chat_fine_tune(base, root / "chat2", seed=3, pad="[PAD]", chat_template=None),
    }


def merge(plan: dict, out: Path) -> Path:
    from mergescope.tui.cli.main import main

    plan_file = out.parent / f"{out.name}.yml"
    plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = main(["merge", str(plan_file), "-o", str(out), "--device", "cpu", "--force"])
    assert rc == 0, stderr.getvalue()
    return out


def vocab_of(folder: Path) -> dict[str, int]:
    """token → id from tokenizer.json, read with json (model vocabulary and added tokens)."""
    document = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(document["model"]["vocab"])
    vocab.update({e["content"]: e["id"] for e in document["added_tokens"]})
    return vocab


def state64(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}


def aligned_rows(paths: list[Path], tensor: str, tokens: list[str], base: Path | None) -> list[torch.Tensor]:
    """Each model's rows for ``tokens``: its own row, else the only holder's, else the base's, else the mean of the
    holders' rows (float64)."""
    vocabs = [vocab_of(p) for p in paths]
    states = [state64(p)[tensor] for p in paths]
    out = []
    for vocab, state in zip(vocabs, states):
        rows = []
        for token in tokens:
            if token in vocab:
                rows.append(state[vocab[token]])
                continue
            holders = [i for i, v in enumerate(vocabs) if token in v]
            if len(holders) == 1 or (base in paths and paths.index(base) in holders):
                donor = holders[0] if len(holders) == 1 else paths.index(base)
                rows.append(states[donor][vocabs[donor][token]])
            else:
                rows.append(torch.stack([states[i][vocabs[i][token]] for i in holders]).mean(0))
        out.append(torch.stack(rows))
    return out


def test_union_linear_matches_rows_by_token(models, tmp_path):
    paths = [models["ft"], models["chat"], models["chat2"]]
    weights = [0.5, 0.3, 0.2]
    plan = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": w}}
                                                 for p, w in zip(paths, weights)],
            "tokenizer_source": "union", "dtype": "float32"}
    out = merge(plan, tmp_path / "out")
    vocab = vocab_of(out)
    tokens = sorted(vocab, key=vocab.get)
    # the ft's (= base's) 43 tokens keep their ids; the new ones follow in plan order
    assert tokens[:43] == sorted(vocab_of(models["ft"]), key=vocab_of(models["ft"]).get)
    assert tokens[43:] == [*CHAT_TOKENS, "[PAD]"]
    merged = state64(out)
    for tensor in VOCAB_TENSORS:
        rows = aligned_rows(paths, tensor, tokens, base=None)
        expected = sum(w * r for w, r in zip(weights, rows)) / sum(weights)
        torch.testing.assert_close(merged[tensor], expected, rtol=0, atol=1e-6)
    # a token only chat2 has comes from chat2's row: every model was given chat2's row
    chat2 = state64(models["chat2"])["model.embed_tokens.weight"][vocab_of(models["chat2"])["[PAD]"]]
    torch.testing.assert_close(merged["model.embed_tokens.weight"][vocab["[PAD]"]], chat2, rtol=0, atol=1e-6)


def test_union_task_arithmetic_uses_base_rows_for_missing_tokens(models, tmp_path):
    """<|im_start|> is in chat and chat2 but not the base: models lacking it get the mean of the holders' rows;
    the base has every ordinary token, so a fine-tune without a chat token contributes no change for it."""
    paths = [models["base"], models["ft"], models["chat"], models["chat2"]]
    plan = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths[1:], [1.0, 0.6, 0.4])],
            "tokenizer_source": "union", "dtype": "float32"}
    out = merge(plan, tmp_path / "out")
    vocab = vocab_of(out)
    tokens = sorted(vocab, key=vocab.get)
    merged = state64(out)
    for tensor in VOCAB_TENSORS:
        base, *rows = aligned_rows(paths, tensor, tokens, base=models["base"])
        expected = base + sum(w * (r - base) for w, r in zip([1.0, 0.6, 0.4], rows))
        torch.testing.assert_close(merged[tensor], expected, rtol=0, atol=1e-6)


def test_union_prefers_the_base_row_over_the_holders_mean(models, tmp_path):
    """With chat as the base, <|im_start|> is in the base and chat2 but not ft: ft is given the base's row (so it
    adds no change there), not the mean of the two holders'."""
    paths = [models["chat"], models["ft"], models["chat2"]]
    plan = {"merge_method": "task_arithmetic", "base_model": str(models["chat"]),
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths[1:], [1.0, 0.5])],
            "tokenizer_source": "union", "dtype": "float32"}
    out = merge(plan, tmp_path / "out")
    vocab = vocab_of(out)
    tokens = sorted(vocab, key=vocab.get)
    merged = state64(out)["lm_head.weight"]
    base, ft, chat2 = aligned_rows(paths, "lm_head.weight", tokens, base=models["chat"])
    torch.testing.assert_close(merged, base + (ft - base) + 0.5 * (chat2 - base), rtol=0, atol=1e-6)
    row = vocab["<|im_start|>"]
    torch.testing.assert_close(ft[row], base[row], rtol=0, atol=0)


def test_union_output_agrees_and_loads_in_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = {"merge_method": "ties", "base_model": str(models["base"]),
            "models": [{"model": str(models[n]), "parameters": {"weight": 1.0, "density": 0.5}}
                       for n in ("ft", "chat", "chat2")],
            "tokenizer_source": "union"}
    out = merge(plan, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    vocab = vocab_of(out)
    weights = load_file(str(out / "model.safetensors"))
    assert config["vocab_size"] == len(vocab) == 47
    assert all(weights[t].shape[0] == 47 for t in VOCAB_TENSORS)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 47
    ids = tokenizer("<|im_start|> w3 <|im_end|> [PAD] <pad>")["input_ids"]
    assert ids == [vocab["<|im_start|>"], vocab["w3"], vocab["<|im_end|>"], vocab["[PAD]"], vocab["<pad>"]]
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "</s>" == tokenizer.eos_token
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    logits = model(torch.tensor([ids])).logits
    assert logits.shape[-1] == 47 and torch.isfinite(logits).all()


def test_tokenizer_source_model_and_base(models, tmp_path):
    """``tokenizer_source: <chat>`` takes chat's 46 tokens (ft lacks 3: donated by chat); ``base`` keeps the base's
    43, dropping the chat rows."""
    paths = [models["ft"], models["chat"]]
    plan = {"merge_method": "linear", "base_model": str(models["base"]),
            "models": [{"model": str(p)} for p in paths], "parameters": {"weight": 1.0},
            "tokenizer_source": str(models["chat"]), "dtype": "float32"}
    out = merge(plan, tmp_path / "model")
    assert vocab_of(out) == vocab_of(models["chat"])
    tokens = sorted(vocab_of(out), key=vocab_of(out).get)
    everyone = [models["base"], *paths]
    rows = aligned_rows(everyone, "lm_head.weight", tokens, base=models["base"])
    torch.testing.assert_close(state64(out)["lm_head.weight"], sum(rows) / 3, rtol=0, atol=1e-6)
    plan["tokenizer_source"] = "base"
    out = merge(plan, tmp_path / "base")
    assert vocab_of(out) == vocab_of(models["base"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 43
    rows = [state64(p)["lm_head.weight"][:43] for p in everyone]
    torch.testing.assert_close(state64(out)["lm_head.weight"], sum(rows) / 3, rtol=0, atol=1e-6)


def test_token_settings_and_padding(models, tmp_path):
    """force, zero, model_token and pad_to_multiple_of, computed by hand for a linear merge of ft and chat."""
    ft, chat = models["ft"], models["chat"]
    plan = {"merge_method": "linear", "models": [{"model": str(ft), "parameters": {"weight": 1.0}},
                                                 {"model": str(chat), "parameters": {"weight": 1.0}}],
            "dtype": "float32",
            "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
                "<|im_start|>": {"source": {"kind": "zero"}},
                "<|im_end|>": {"source": {"kind": "model_token", "model": str(chat), "token": "</s>"}, "force": True},
                "<tool>": None,  # added to the vocabulary; nobody has it: zero rows
            }}}
    out = merge(plan, tmp_path / "out")
    vocab = vocab_of(out)
    assert len(vocab) == 47 and vocab["<tool>"] == 46
    merged = state64(out)["model.embed_tokens.weight"]
    assert merged.shape[0] == 48  # padded to a multiple of 16
    e_ft, e_chat = state64(ft)["model.embed_tokens.weight"], state64(chat)["model.embed_tokens.weight"]
    v_chat = vocab_of(chat)
    assert torch.equal(merged[vocab["<tool>"]], torch.zeros(16, dtype=torch.float64))
    torch.testing.assert_close(merged[vocab["<|im_start|>"]], e_chat[v_chat["<|im_start|>"]] / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[vocab["<|im_end|>"]], e_chat[v_chat["</s>"]], rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[vocab["<pad>"]], e_chat[v_chat["<pad>"]], rtol=0, atol=1e-6)
    # padding: each model's mean real row (ft's rows for the chat tokens are the fills; chat keeps its own
    # <|im_start|>, takes </s>'s row for the forced <|im_end|>, and zeros for <tool>)
    rows_ft = torch.cat([e_ft, torch.stack([e_chat[v_chat["<pad>"]], torch.zeros(16, dtype=torch.float64),
                                            e_chat[v_chat["</s>"]], torch.zeros(16, dtype=torch.float64)])])
    rows_chat = torch.cat([e_chat[:45], e_chat[v_chat["</s>"]][None],
                           torch.zeros(1, 16, dtype=torch.float64)])
    torch.testing.assert_close(merged[47], (rows_ft.mean(0) + rows_chat.mean(0)) / 2, rtol=0, atol=1e-6)


def test_vocabulary_mismatch_without_setting_names_it(models, tmp_path):
    text = (f"merge_method: linear\nparameters: {{weight: 1.0}}\nmodels:\n  - model: {models['ft']}\n"
            f"  - model: {models['chat']}\n")
    with pytest.raises(PlanError, match="tokenizer_source: union"):
        build_job(parse_plan(text, "plan.yml"))


@pytest.mark.parametrize(("text", "message"), [
    ("tokenizer_source: union\ntokenizer: {source: base}\n", "not both"),
    ("tokenizer: {pad_to_multiple_of: 0}\n", "pad_to_multiple_of"),
    ("tokenizer: {tokens: {a: {source: {kind: nope}}}}\n", "source must be"),
    ("tokenizer: {tokens: {a: {force: 3}}}\n", "force must be"),
    ("tokenizer: {colour: red}\n", "unknown key"),
    ("chat_template: chatm\n", "chat_template"),
])
def test_tokenizer_plan_problems(text, message):
    with pytest.raises(PlanError, match=message):
        parse_plan("merge_method: linear\nmodels: [{model: a}, {model: b}]\n" + text, "plan.yml")


def test_token_source_must_be_a_model_of_the_merge(models):
    text = (f"merge_method: linear\nparameters: {{weight: 1.0}}\n"
            f"models: [{{model: {models['ft']}}}, {{model: {models['chat']}}}]\n"
            f"tokenizer: {{tokens: {{'<|im_end|>': {{source: {models['ft']}}}}}}}\n")
    with pytest.raises(PlanError, match="has no such token"):
        build_job(parse_plan(text, "plan.yml"))


@pytest.mark.parametrize("setting", ["auto", "chatml", "literal"])
def test_chat_template_written_into_tokenizer_config(models, tmp_path, setting):
    from transformers import AutoTokenizer

    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    plan = {"merge_method": "linear", "models": [{"model": str(models[n])} for n in ("ft", "chat", "chat2")],
            "parameters": {"weight": 1.0},
            "tokenizer_source": "union", "chat_template": literal if setting == "literal" else setting}
    out = merge(plan, tmp_path / "out")
    expected = {"auto": hf.CHAT_TEMPLATE, "chatml": NAMED_TEMPLATES["chatml"], "literal": literal}[setting]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == expected
    assert not (out / "chat_template.jinja").exists()
    assert AutoTokenizer.from_pretrained(out).chat_template == expected


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_preview_of_a_union_plan_aligns_rows_as_the_merge(models, tmp_path, mode):
    """The embedding group's ‖τ_m‖ in the preview is the written merge's ‖θ_m − θ₀‖ over the aligned rows
    (computed here from the files, float64); sampled mode stays finite and close for this entrywise method."""
    from mergescope.analysis.preview import run_preview

    paths = [models["base"], models["ft"], models["chat"], models["chat2"]]
    plan = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths[1:], [1.0, 0.6, 0.4])],
            "tokenizer_source": "union", "dtype": "float32"}
    out = merge(plan, tmp_path / "out")
    vocab = vocab_of(out)
    tokens = sorted(vocab, key=vocab.get)
    base = aligned_rows(paths, "model.embed_tokens.weight", tokens, base=models["base"])[0]
    expected = float((state64(out)["model.embed_tokens.weight"] - base).norm())
    job = build_job(parse_plan(yaml.safe_dump(plan), "plan.yml"))
    preview = run_preview(job, mode=mode, sample_size=64)
    group = next(g for g in preview.groups if g.group == "model.embed_tokens")
    assert group.merged_norm == pytest.approx(expected, rel=1e-5 if mode == "exact" else 0.5)


def test_dry_run_shows_the_output_vocabulary(models, tmp_path, capsys):
    from mergescope.tui.cli.main import main

    plan = {"merge_method": "linear", "models": [{"model": str(models[n])} for n in ("ft", "chat", "chat2")],
            "parameters": {"weight": 1.0}, "tokenizer": {"source": "union", "pad_to_multiple_of": 8}}
    plan_file = tmp_path / "plan.yml"
    plan_file.write_text(yaml.safe_dump(plan))
    assert main(["merge", str(plan_file), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "vocabulary (union): 47 tokens, 48 rows; 4 new: <pad>, <|im_start|>, <|im_end|>, [PAD]" in \
        capsys.readouterr().out.replace("\n", "")


def test_diagnosis_of_a_union_merge_counts_shared_tokens_only(models, tmp_path):
    """The diagnosis compares the merged model (47 tokens) with its sources by token string: a source's retention
    ⟨τ_m, τᵢ⟩/‖τᵢ‖² sums over every tensor, the embedding and head over the 43 tokens all share (float64 here)."""
    from mergescope.analysis.diagnosis import diagnose_merged_folder

    paths = [models["base"], models["ft"], models["chat"], models["chat2"]]
    plan = {"merge_method": "ties", "base_model": str(models["base"]),
            "models": [{"model": str(p), "parameters": {"weight": 0.8, "density": 0.6}} for p in paths[1:]],
            "tokenizer_source": "union", "dtype": "float32"}
    out = merge(plan, tmp_path / "out")
    report = diagnose_merged_folder(out, device="cpu").to_json()
    base_vocab, merged_vocab = vocab_of(models["base"]), vocab_of(out)
    shared = sorted(base_vocab, key=base_vocab.get)
    theta0, merged = state64(models["base"]), state64(out)
    for name in ("ft", "chat"):
        theta, vocab = state64(models[name]), vocab_of(models[name])
        dot = norm2 = 0.0
        for tensor in theta0:
            rows = (lambda v: [v[t] for t in shared]) if tensor in VOCAB_TENSORS else None
            t0 = theta0[tensor][rows(base_vocab)] if rows else theta0[tensor]
            ti = theta[tensor][rows(vocab)] if rows else theta[tensor]
            tm = merged[tensor][rows(merged_vocab)] if rows else merged[tensor]
            dot += float(((tm - t0) * (ti - t0)).sum())
            norm2 += float((ti - t0).pow(2).sum())
        assert report["total"]["sources"][name]["retention"] == pytest.approx(dot / norm2, rel=1e-5)


def test_row_alignment_block_by_block_equals_whole_tensor():
    """RowAlignment applied to blocks of output rows (with the fill rows computed once) gives the whole-tensor
    result bit for bit: the piece a block-wise executor needs. Expected rows built here by hand."""
    from mergescope.checkpoints.vocabulary import Vocabulary
    from mergescope.merge.tokenizer_settings import TokenizerSettings
    from mergescope.merge.vocabulary_merge import output_vocabulary, row_alignment

    vocabularies = {
        "base": Vocabulary({"a": 0, "b": 1, "c": 2}),
        "x": Vocabulary({"b": 0, "a": 1, "c": 2, "<x>": 3}, {"<x>": {"content": "<x>", "special": True}}),
        "y": Vocabulary({"a": 0, "b": 1, "c": 2, "<x>": 3, "<y>": 4},
                        {"<x>": {"content": "<x>"}, "<y>": {"content": "<y>"}}),
    }
    settings = TokenizerSettings("union", {}, 4)
    out = output_vocabulary(settings, "base", ["base", "x", "y"], vocabularies)
    assert out.tokens == ["a", "b", "c", "<x>", "<y>"] and out.rows == 8
    alignment = row_alignment(out, ["base", "x", "y"], vocabularies, settings, "base")
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 2, generator=g), torch.randn(4, 2, generator=g), torch.randn(5, 2, generator=g)]
    whole = alignment.align(tensors)
    base, x, y = tensors
    x_mean = (x[3] + y[3]) / 2  # <x>: in x and y, not the base → the holders' mean for the base
    expected_base = torch.stack([base[0], base[1], base[2], x_mean, y[4]])
    expected_x = torch.stack([x[1], x[0], x[2], x[3], y[4]])
    torch.testing.assert_close(whole[0][:5], expected_base, rtol=0, atol=1e-7)
    torch.testing.assert_close(whole[1][:5], expected_x, rtol=0, atol=0)
    torch.testing.assert_close(whole[2][:5], y, rtol=0, atol=0)
    torch.testing.assert_close(whole[0][5:], expected_base.mean(0).expand(3, 2), rtol=0, atol=1e-7)
    fills = alignment.fill_rows(tensors)
    for i, tensor in enumerate(tensors):
        blocks = [alignment.align_rows(i, tensor, start, min(start + 2, 5), fills, torch.float32)
                  for start in range(0, 5, 2)]
        assert torch.equal(torch.cat(blocks), whole[i][:5])


def test_a_model_without_tokenizer_shares_the_reference_vocabulary_with_a_warning(models, tmp_path):
    """As mergekit does: a model whose folder has no tokenizer.json is taken to have the reference's vocabulary (the
    merge says so); the reference itself needs one."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(models["ft"], bare)
    (bare / "tokenizer.json").unlink()
    plan = {"merge_method": "linear", "parameters": {"weight": 1.0}, "tokenizer_source": "union",
            "models": [{"model": str(models["chat"])}, {"model": str(bare)}]}
    job = build_job(parse_plan(yaml.safe_dump(plan), "plan.yml"))
    assert job.warnings == [f"{bare} has no tokenizer.json; taken to share {models['chat']}'s vocabulary"]
    assert job.vocabulary.rows == 46
    plan["models"].reverse()
    with pytest.raises(PlanError, match="has no tokenizer.json: merging by token needs the reference"):
        build_job(parse_plan(yaml.safe_dump(plan), "plan.yml"))


def test_same_size_other_tokens_warns_without_a_tokenizer_setting(models, tmp_path):
    """Rows merge by id without a tokenizer setting (as mergekit does); a model whose tokens sit at other rows gets a
    warning naming the setting, and with tokenizer_source: base the rows are matched by token instead."""
    reordered = hf.write_reordered(models["ft"], tmp_path / "reordered")
    text = (f"merge_method: linear\nparameters: {{weight: 1.0}}\n"
            f"models: [{{model: {models['ft']}}}, {{model: {reordered}}}]\n")
    job = build_job(parse_plan(text, "plan.yml"))
    assert len(job.warnings) == 1
    assert "2 tokens sit at other rows" in job.warnings[0] and "set tokenizer_source" in job.warnings[0]
    assert build_job(parse_plan(text + "dtype: float32\n", "plan.yml")).warnings == job.warnings
    out = merge({**yaml.safe_load(text), "tokenizer_source": "base", "dtype": "float32"}, tmp_path / "out")
    # by token the two models are the same: the linear merge of ft with itself is ft
    torch.testing.assert_close(state64(out)["lm_head.weight"], state64(models["ft"])["lm_head.weight"],
                               rtol=0, atol=1e-6)
