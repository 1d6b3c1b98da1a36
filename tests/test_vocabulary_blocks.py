"""Tokenizer-aware merging in row blocks: embeddings and heads aligned by token string and merged (previewed,
analysed) a block of output rows at a time give the bits of the same plan in one block per tensor — the
whole-tensor path, which aligns with ``RowAlignment.align`` as before row blocks existed.

The fixture: a base of 1024 tokens (embedding and head of 64K entries: 16 blocks at the smallest budget), a
fine-tune with the base's tokenizer, a chat fine-tune whose tokens sit at other rows in places (swaps across the
vocabulary, so a block gathers several runs of rows), which lost two of the base's tokens and added five, and a
third whose added tokens overlap the chat one's (rows filled with the holders' float32 mean). Values are random
bf16 (promoted to float32 where a fill is a mean).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

from builders import llama_config
from mergekit_reference import write_fixture
from mergescope.analysis.preview import run_preview
from mergescope.analysis.stream import TensorResult, stream_analysis
from mergescope.checkpoints import open_checkpoint
from mergescope.merge.executor import block_size, plan_blocks, run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan

VOCAB = 1024
CONFIG = llama_config(vocab=VOCAB, hidden=64, layers=1, intermediate=32, heads=4, kv_heads=2)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
BASE_TOKENS = [f"t{i}" for i in range(VOCAB)]
WHOLE, BLOCKS = 10**12, 1  # bytes of memory budget: one block per tensor, or the smallest blocks


def _write_tokenizer(folder: Path, tokens: list[str]) -> None:
    Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0])).save(
        str(folder / "tokenizer.json"))


def _regrow(folder: Path, tokens: list[str], rows_of: dict[str, int], seed: int) -> None:
    """Give ``folder``'s model the vocabulary ``tokens``: a token it had keeps its row, a new one gets a random row."""
    state = load_file(str(folder / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for name in VOCAB_TENSORS:
        old = state[name]
        new = torch.randn(len(tokens), old.shape[1], generator=generator).to(old.dtype)
        for row, token in enumerate(tokens):
            if token in rows_of:
                new[row] = old[rows_of[token]]
        state[name] = new.contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = len(tokens)
    (folder / "config.json").write_text(json.dumps(config))
    _write_tokenizer(folder, tokens)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vocab-blocks")
    folders = write_fixture(root, torch.bfloat16, CONFIG)
    base_rows = {t: i for i, t in enumerate(BASE_TOKENS)}
    for name in ("base", "ft_a"):
        _write_tokenizer(folders[name], BASE_TOKENS)
    chat = list(BASE_TOKENS)
    shuffle = random.Random(0)
    for _ in range(40):  # tokens at other rows, all over the vocabulary
        a, b = shuffle.randrange(VOCAB), shuffle.randrange(VOCAB)
        chat[a], chat[b] = chat[b], chat[a]
    chat[chat.index("t7")] = "<lost7>"
    chat[chat.index("t900")] = "<lost900>"
    chat += ["<|im_start|>", "<|im_end|>", "<pad>", "<tool>", "<only_b>"]
    _regrow(folders["ft_b"], chat, base_rows, seed=1)
    third = [*BASE_TOKENS, "<tool>", "<pad>", "<only_c>"]
    _regrow(folders["ft_c"], third, base_rows, seed=2)
    return {name: str(path) for name, path in folders.items()}


def _plan(paths: dict[str, str], method: str, tokenizer: dict | str, **parameters) -> dict:
    plan = {"merge_method": method,
            "models": [{"model": paths[n], "parameters": {"weight": w, **parameters}}
                       for n, w in (("ft_a", 0.5), ("ft_b", 0.3), ("ft_c", 0.4))]}
    if method != "linear":
        plan["base_model"] = paths["base"]
    plan["tokenizer" if isinstance(tokenizer, dict) else "tokenizer_source"] = tokenizer
    return plan


def _job(plan: dict, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.yml").write_text(yaml.safe_dump(plan, sort_keys=False))
    return build_job(load_plan(str(folder / "plan.yml")))


def _merged(plan: dict, folder: Path, budget: int) -> dict[str, torch.Tensor]:
    out = run_merge(_job(plan, folder), folder / "out", device="cpu", memory_budget=budget)
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


CASES = {
    "union-task-arithmetic": ("task_arithmetic", "union", {}),
    "union-ties": ("ties", "union", {"density": 0.4}),
    "union-dare-ties": ("dare_ties", "union", {"density": 0.5}),
    "padded-linear": ("linear", {"source": "union", "pad_to_multiple_of": 64,
                                 "tokens": {"<|im_end|>": {"source": {"kind": "zero"}, "force": True}}}, {}),
    "chat-model-ties": ("ties", "ft_b", {"density": 0.6}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_merge_by_token_in_many_row_blocks_has_the_bits_of_one_block(tmp_path, paths, case):
    method, tokenizer, parameters = CASES[case]
    if tokenizer == "ft_b":
        tokenizer = paths["ft_b"]
    plan = _plan(paths, method, tokenizer, **parameters)
    job = _job(plan, tmp_path / "plan")
    embed = [task for task in job.tasks if task.output == "model.embed_tokens.weight"]
    assert embed and embed[0].vocabulary is not None and embed[0].shape[0] >= VOCAB + 3
    units = plan_blocks(job, block_size(job, 1, BLOCKS))  # the executor's own block size for this budget
    assert sum(u.task.output == "model.embed_tokens.weight" and not u.whole for u in units) >= 16
    whole = _merged(plan, tmp_path / "whole", WHOLE)
    blocks = _merged(plan, tmp_path / "blocks", BLOCKS)
    assert whole.keys() == blocks.keys()
    assert whole["lm_head.weight"].shape == tuple(embed[0].shape)
    for name in whole:
        assert whole[name].dtype == blocks[name].dtype
        assert torch.equal(whole[name].view(torch.uint8), blocks[name].view(torch.uint8)), name


def test_union_rows_in_blocks_follow_the_token_rule(tmp_path, paths):
    """Independent of mergescope's alignment: a linear union merge (no base) in blocks, its rows for a token at
    another row in one model, a token one model lost and a token two models added (the holders' mean fills the
    others' rows), tokens only one model added (its row), computed in float64 from the files by token string;
    the tolerance covers the bf16 output's rounding."""
    plan = _plan(paths, "linear", "union")
    merged = _merged(plan, tmp_path / "blocks", BLOCKS)["model.embed_tokens.weight"].double()
    vocab = json.loads((tmp_path / "blocks" / "out" / "tokenizer.json").read_text())
    ids = {**vocab["model"]["vocab"], **{t["content"]: t["id"] for t in vocab["added_tokens"]}}
    states, vocabs = [], []
    for name in ("ft_a", "ft_b", "ft_c"):
        states.append(load_file(f"{paths[name]}/model.safetensors")["model.embed_tokens.weight"].double())
        vocabs.append(json.loads(Path(paths[name], "tokenizer.json").read_text())["model"]["vocab"])
    weights = [0.5, 0.3, 0.4]

    def expected(token: str) -> torch.Tensor:
        holders = [i for i, v in enumerate(vocabs) if token in v]
        fill = torch.stack([states[i][vocabs[i][token]] for i in holders]).mean(0)
        rows = [states[i][v[token]] if token in v else fill for i, v in enumerate(vocabs)]
        return sum(w * r for w, r in zip(weights, rows)) / sum(weights)

    swapped = next(t for t, i in vocabs[1].items() if t.startswith("t") and i != int(t[1:]))
    for token in (swapped, "t7", "<pad>", "<tool>", "<only_b>", "<only_c>", "t1000"):
        np.testing.assert_allclose(merged[ids[token]].numpy(), expected(token).numpy(), rtol=8e-3, atol=1e-3)


def test_exact_preview_and_analysis_by_token_in_blocks_equal_one_block(tmp_path, paths):
    plan = _plan(paths, "ties", "union", density=0.4)
    job = _job(plan, tmp_path / "plan")
    whole = run_preview(job, mode="exact", device="cpu", memory_budget=WHOLE)
    blocks = run_preview(job, mode="exact", device="cpu", memory_budget=BLOCKS)
    for expected, got in zip(whole.groups, blocks.groups):
        assert expected.group == got.group
        assert got.merged_norm == pytest.approx(expected.merged_norm, rel=1e-12)
        np.testing.assert_allclose(got.retention, expected.retention, rtol=1e-12, atol=1e-15)
    base = open_checkpoint(paths["base"])
    fine_tunes = [open_checkpoint(paths[n]) for n in ("ft_a", "ft_b", "ft_c")]

    def analysis(budget: int) -> dict:
        events = stream_analysis(base, fine_tunes, [m.name for m in fine_tunes], device="cpu", patterns=True,
                                 memory_budget=budget, density=0.5)
        return {e.name: e for e in events if isinstance(e, TensorResult)}

    one, many = analysis(WHOLE), analysis(BLOCKS)
    shared = VOCAB - 2  # the chat fine-tune lost t7 and t900
    assert one["lm_head.weight"].compared_rows == many["lm_head.weight"].compared_rows == shared
    for name in VOCAB_TENSORS:
        np.testing.assert_allclose(many[name].sums.gram, one[name].sums.gram, rtol=1e-12, atol=1e-300)
        np.testing.assert_array_equal(many[name].sums.signs.histogram, one[name].sums.signs.histogram)
        # the TIES trim at density 0.5: cuts from the shared tokens' gathered blocks (issue 13), the same entries
        trimmed, whole_trim = many[name].sums.trimmed, one[name].sums.trimmed
        np.testing.assert_array_equal(trimmed.sign_dot, whole_trim.sign_dot)
        np.testing.assert_array_equal(trimmed.both_nonzero, whole_trim.both_nonzero)
        assert (trimmed.multi_nonzero, trimmed.multi_conflict) == (whole_trim.multi_nonzero,
                                                                   whole_trim.multi_conflict)
        assert many[name].sums.numel == one[name].sums.numel == shared * CONFIG["hidden_size"]


@pytest.mark.parametrize("rows", [[5, 3, 3, 900, 0], list(range(100, 164)), [1023, 0], []])
def test_read_row_list_gives_the_rows_of_the_whole_tensor(paths, rows):
    """One span (rows dense in it) or each run of consecutive rows (sparse), in the order asked, repeats kept."""
    checkpoint = open_checkpoint(paths["ft_b"])
    whole = checkpoint.read("lm_head.weight")
    got = checkpoint.read_row_list("lm_head.weight", rows)
    assert got.dtype == whole.dtype and torch.equal(got, whole[torch.tensor(rows, dtype=torch.long)])
