"""Exact-match accuracy of a demo-architecture checkpoint on the held-out task prompts.

    accuracy(task) = #{prompts whose greedy answer, up to <eos>, equals the expected answer} / #prompts

Greedy decoding is batched: prompts are grouped by token length (no padding, so every row's positions are
0…T−1 exactly as in training) and each group grows one token per forward pass until every row has written
``<eos>`` or the longest possible answer. A row that never writes ``<eos>`` is wrong.

A checkpoint is read with mergescope's own :func:`~mergescope.checkpoints.open_checkpoint`, so a folder, a
merged model written by ``mergescope merge`` (one file or shards) and a LoRA adapter folder all work; the
vocabulary comes from the ``vocab.json`` beside it (or the adapter's base's).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch

from mergescope.checkpoints import Checkpoint, MergescopeError, open_checkpoint

from .model import DemoConfig, DemoLlama
from .tasks import Example, check_tasks, eval_examples
from .tokenizer import BOS, EOS, VOCAB_FILE, CharTokenizer

#: longest answer any task has (add: 3 digits; the others: 6 characters), plus <eos>
MAX_NEW_TOKENS = 7


def greedy_answers(model: DemoLlama, tokenizer: CharTokenizer, prompts: list[str],
                   max_new: int = MAX_NEW_TOKENS) -> list[str | None]:
    """The greedy continuation of each prompt up to ``<eos>``; None where no ``<eos>`` came in ``max_new`` tokens."""
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [[BOS, *tokenizer.encode(p)] for p in prompts]
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    answers: list[str | None] = [None] * len(prompts)
    with torch.no_grad():
        for rows in by_length.values():
            ids = torch.tensor([encoded[i] for i in rows])
            done = torch.zeros(len(rows), dtype=torch.bool)
            start = ids.shape[1]
            for _ in range(max_new):
                next_ids = model(ids)[:, -1].argmax(-1)
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
                done |= next_ids == EOS
                if bool(done.all()):
                    break
            for row, generated in zip(rows, ids[:, start:].tolist()):
                if EOS in generated:
                    answers[row] = tokenizer.decode(generated)
    return answers


def task_accuracy(model: DemoLlama, tokenizer: CharTokenizer, examples: list[Example] | tuple[Example, ...]) -> float:
    """Share of ``examples`` answered exactly."""
    answers = greedy_answers(model, tokenizer, [e.prompt for e in examples])
    return sum(a == e.answer for a, e in zip(answers, examples)) / len(examples)


def evaluate_model(model: DemoLlama, tokenizer: CharTokenizer, tasks: list[str] | None = None,
                   limit: int | None = None) -> dict[str, float]:
    """Accuracy of an in-memory model on each task's held-out prompts (the first ``limit`` of them)."""
    model.eval()
    return {task: task_accuracy(model, tokenizer, eval_examples(task)[:limit]) for task in check_tasks(tasks)}


def load_demo_model(source: str | os.PathLike) -> tuple[DemoLlama, CharTokenizer]:
    """A demo-architecture checkpoint (folder, merged output, LoRA adapter) as a model and its tokenizer;
    a one-line :class:`MergescopeError` when it is not one."""
    checkpoint = open_checkpoint(source)
    config_file = next((p for p in checkpoint.model_files() if p.name == "config.json"), None)
    if config_file is None:
        raise MergescopeError(f"{source}: no config.json, so it is not a mergescope demo model")
    config = DemoConfig.from_hf(checkpoint.config.raw, str(config_file))
    tokenizer = _tokenizer_of(checkpoint, source)
    if tokenizer.vocab_size != config.vocab_size:
        raise MergescopeError(
            f"{source}: vocab.json has {tokenizer.vocab_size} tokens "
            f"but config.json says vocab_size {config.vocab_size}"
        )
    model = DemoLlama(config)
    expected = model.state_dict()
    missing = [n for n in expected if n not in checkpoint]
    extra = [n for n in checkpoint.tensor_names if n not in expected]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the demo model does not"
        raise MergescopeError(f"{source}: not a mergescope demo model: it {what}")
    state = {}
    for name, tensor in expected.items():
        value = checkpoint.read(name, torch.float32)
        if tuple(value.shape) != tuple(tensor.shape):
            raise MergescopeError(f"{source}: {name} has shape {list(value.shape)}, "
                                  f"config.json implies {list(tensor.shape)}")
        state[name] = value
    model.load_state_dict(state)
    model.eval()
    return model, tokenizer


def _tokenizer_of(checkpoint: Checkpoint, source: str | os.PathLike) -> CharTokenizer:
    vocab_file = next((p for p in checkpoint.model_files() if p.name == VOCAB_FILE), None)
    if vocab_file is None:
        raise MergescopeError(f"{source}: no {VOCAB_FILE} beside the weights, so it is not a mergescope demo model")
    return CharTokenizer.load(Path(vocab_file))


def evaluate(model_dir: str | os.PathLike, tasks: list[str] | None = None,
             limit: int | None = None) -> dict[str, float]:
    """Exact-match accuracy, task → share in [0, 1], of the checkpoint at ``model_dir`` with greedy decoding on
    the held-out prompts of ``tasks`` (all by default), the first ``limit`` of each when given."""
    selected = check_tasks(tasks)
    model, tokenizer = load_demo_model(model_dir)
    with torch.inference_mode():
        return evaluate_model(model, tokenizer, list(selected), limit)
