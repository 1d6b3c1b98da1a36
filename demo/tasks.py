"""Character-level tasks: a prompt string, an answer string, seeded generators for training and evaluation.

Every prompt is ``TAG:input=`` and the model must write the answer, then ``<eos>``:

- ``add``: ``ADD:37+5=`` → ``42`` — a number below 100 plus a digit (digits only)
- ``reverse``: ``REV:kdjam=`` → ``majdk`` — 3–6 letters from a–m
- ``sort``: ``SORT:xqnt=`` → ``nqtx`` — 3–6 letters from n–z

The tasks use disjoint characters (digits, a–m, n–z) and upper-case tags that appear in no input, so a
fine-tune on one task changes little that the others read — the condition under which task vectors add up.

Pre-training sees every task but only its easy half (``full=False``): inputs of at most
:data:`PRETRAIN_MAX_LENGTH` letters, and sums without a carry (``ADD:32+5=``, never ``ADD:37+5=``). The
held-out sets are drawn from the whole task, so the base answers roughly the easy half of them and each
fine-tune teaches its own task the rest (long inputs, carries) — a gain that does not hinge on how far an
undertrained base happened to get.
The held-out set of a task is a fixed list drawn with its own seed; training streams skip every held-out
prompt, so the two are disjoint.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

from mergescope.checkpoints.errors import MergescopeError

DIGITS = "0123456789"
FIRST_LETTERS = "abcdefghijklm"
LAST_LETTERS = "nopqrstuvwxyz"
MIN_LENGTH, MAX_LENGTH = 3, 6
PRETRAIN_MAX_LENGTH = 4
EVAL_SEED = 20_240_601
EVAL_SIZE = 200


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _letters(rng: random.Random, alphabet: str, full: bool) -> str:
    length = rng.randint(MIN_LENGTH, MAX_LENGTH if full else PRETRAIN_MAX_LENGTH)
    return "".join(rng.choice(alphabet) for _ in range(length))


def _add(rng: random.Random, full: bool) -> tuple[str, str]:
    """``a + b`` for a < 100, b < 10; the easy half has no carry (a mod 10 + b < 10)."""
    a = rng.randrange(100)
    b = rng.randrange(10) if full else rng.randrange(10 - a % 10)
    return f"ADD:{a}+{b}=", str(a + b)


def _reverse(rng: random.Random, full: bool) -> tuple[str, str]:
    s = _letters(rng, FIRST_LETTERS, full)
    return f"REV:{s}=", s[::-1]


def _sort(rng: random.Random, full: bool) -> tuple[str, str]:
    s = _letters(rng, LAST_LETTERS, full)
    return f"SORT:{s}=", "".join(sorted(s))


#: task name → generator of (prompt, answer) from a random stream: the whole task, or its easy half
TASKS: dict[str, Callable[[random.Random, bool], tuple[str, str]]] = {"add": _add, "reverse": _reverse, "sort": _sort}
TASK_NAMES = tuple(TASKS)
#: what each task asks, for tables and the manifest
TASK_DESCRIPTIONS = {
    "add": "add a digit to a number below 100 (ADD:37+5= → 42)",
    "reverse": "reverse 3–6 letters from a–m (REV:kdjam= → majdk)",
    "sort": "sort 3–6 letters from n–z (SORT:xqnt= → nqtx)",
}
#: every character a prompt or answer can hold
TASK_CHARACTERS = DIGITS + FIRST_LETTERS + LAST_LETTERS + "ADEORSTV" + "+:="


def check_tasks(tasks: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The named tasks (all when None), or a one-line error naming the known ones."""
    if not tasks:
        return TASK_NAMES
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise MergescopeError(f"unknown demo task {unknown[0]!r} (known: {', '.join(TASK_NAMES)})")
    return tuple(dict.fromkeys(tasks))


def _task_seed(name: str, seed: int) -> int:
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))


@cache
def eval_examples(task: str, size: int = EVAL_SIZE) -> tuple[Example, ...]:
    """The held-out set of ``task``: ``size`` distinct prompts (full input lengths) drawn with a fixed seed."""
    rng = random.Random(_task_seed(task, EVAL_SEED))
    seen: dict[str, Example] = {}
    while len(seen) < size:
        prompt, answer = TASKS[task](rng, True)
        seen.setdefault(prompt, Example(task, prompt, answer))
    return tuple(seen.values())


@cache
def _held_out_prompts(task: str) -> frozenset[str]:
    return frozenset(e.prompt for e in eval_examples(task))


def train_stream(tasks: tuple[str, ...], seed: int, full: bool = True, replay: float = 0.0) -> Iterator[Example]:
    """An endless seeded stream of training examples, tasks chosen uniformly, from the whole of each task
    (``full``) or its easy half, never a held-out prompt. With ``replay`` > 0 that share of the examples
    comes from the pre-training mix instead (the easy half of every task), as fine-tunes mix in some of
    their pre-training data to keep what the base knew."""
    check_tasks(tasks)
    rng = random.Random(_task_seed("/".join(tasks), seed))
    while True:
        if replay and rng.random() < replay:
            task, task_full = TASK_NAMES[rng.randrange(len(TASK_NAMES))], False
        else:
            task, task_full = tasks[rng.randrange(len(tasks))], full
        prompt, answer = TASKS[task](rng, task_full)
        if prompt not in _held_out_prompts(task):
            yield Example(task, prompt, answer)
