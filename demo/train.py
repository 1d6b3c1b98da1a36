"""Seeded, deterministic training of the demo models on CPU.

A batch is B examples, each ``<bos> prompt answer <eos>`` right-padded with ``<pad>``. The loss is the mean
cross-entropy of next-token predictions over answer positions only (the answer's characters and the
``<eos>`` after them), so the model learns to answer, not to predict random prompts:

    L(θ) = − (1 / Σ m) Σ_{b,t} m_{b,t} · log softmax(f_θ(x_b)_{t})[x_{b,t+1}]

where ``m_{b,t} = 1`` when token t+1 is part of the answer. Optimiser: AdamW with a linear warm-up over the
first 5% of steps and a cosine decay to 10% of the peak rate. Determinism: the data stream and the
initialisation are seeded and torch runs on a fixed number of threads with deterministic algorithms, so the
same call gives bit-identical weights on the same machine — and, run with the pinned kernels of
:mod:`.kernels` (as the workspace build does), on every x86-64 machine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch
import torch.nn.functional as F

from .kernels import TRAIN_THREADS
from .model import DemoLlama
from .tasks import Example, train_stream
from .tokenizer import BOS, EOS, PAD, CharTokenizer


@dataclass(frozen=True)
class TrainSpec:
    """One training run: which tasks, how long, how fast."""

    tasks: tuple[str, ...]
    steps: int
    lr: float
    seed: int
    batch_size: int = 32
    #: the whole task (fine-tunes) or only its easy half (pre-training)
    full: bool = True
    #: share of examples from the pre-training mix (the easy half of every task), against forgetting
    replay: float = 0.0
    weight_decay: float = 0.0
    warmup: float = 0.05


def encode_batch(examples: list[Example], tokenizer: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: ids (B, T) of ``<bos> prompt answer <eos>`` right-padded, and mask (B, T−1) of the
    positions whose next token belongs to the answer (its characters and ``<eos>``)."""
    rows = []
    starts = []
    for example in examples:
        prompt = [BOS, *tokenizer.encode(example.prompt)]
        rows.append(prompt + tokenizer.encode(example.answer) + [EOS])
        starts.append(len(prompt))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, start - 1 : len(row) - 1] = True
    return ids, mask


def answer_loss(model: DemoLlama, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next token over the masked (answer) positions."""
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits[mask], ids[:, 1:][mask])


def learning_rate(step: int, spec: TrainSpec) -> float:
    """Linear warm-up to ``spec.lr`` over ``warmup·steps``, then cosine decay to ``0.1·spec.lr``."""
    warm = max(1, int(spec.warmup * spec.steps))
    if step < warm:
        return spec.lr * (step + 1) / warm
    progress = (step - warm) / max(1, spec.steps - warm)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def deterministic_cpu() -> Iterator[None]:
    """Deterministic torch on a fixed number of threads for the duration (restoring the previous settings)."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def train(
    model: DemoLlama,
    spec: TrainSpec,
    tokenizer: CharTokenizer,
    *,
    trainable: Callable[[str], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place on ``spec`` and return the loss of every step.

    ``trainable(name)`` selects the parameters to update (all by default; a LoRA run passes only its
    adapter matrices). ``on_step(step, loss)`` is called after each step.
    """
    params = [p for n, p in model.named_parameters() if trainable is None or trainable(n)]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.98), weight_decay=spec.weight_decay)
    stream = train_stream(spec.tasks, spec.seed, spec.full, spec.replay)
    losses = []
    with deterministic_cpu():
        model.train()
        for step in range(spec.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, spec)
            ids, mask = encode_batch(list(islice(stream, spec.batch_size)), tokenizer)
            loss = answer_loss(model, ids, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
        model.eval()
    return losses
