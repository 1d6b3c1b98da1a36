"""What the demo trains (:class:`Recipe`) and the training itself (:func:`train_models`), which
:mod:`.build_process` runs in a child process with pinned kernels (see :mod:`.kernels`).

Every seed of a build derives from ``Recipe.seed``: the base's initialisation and data, the other base's,
and each fine-tune's data stream. ``mergescope demo --seed N`` builds the same story from other random
numbers; ``benchmarks/demo_robustness.py`` checks that the story holds for several seeds.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergescope.checkpoints import CheckpointWriter, TensorSpec
from mergescope.checkpoints.dtypes import dtype_name

from .lora import adapter_tensors, is_lora_parameter, with_lora, write_adapter_config
from .model import DemoConfig, DemoLlama, new_model
from .tasks import TASK_NAMES
from .tokenizer import BOS, EOS, PAD, CharTokenizer
from .train import TrainSpec, train

#: ``progress(stage, steps_done, steps_total)``, called as training advances
BuildProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Recipe:
    """Everything a build trains, with its numbers (model size, seeds, steps, learning rates)."""

    seed: int = 0
    hidden_size: int = 64
    intermediate_size: int = 128
    base_steps: int = 2000
    base_lr: float = 3e-3
    #: (task, steps, peak learning rate) of each full fine-tune
    fine_tunes: tuple[tuple[str, int, float], ...] = (("add", 400, 1e-3), ("reverse", 300, 1e-3), ("sort", 400, 1e-3))
    #: share of each fine-tune's (and the LoRA's) examples drawn from the pre-training mix, against forgetting
    replay: float = 0.3
    trap_lr: float = 2e-3
    lora_task: str = "sort"
    lora_steps: int = 150
    lora_lr: float = 5e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    other_base_steps: int = 150
    trap_task: str = "sort"
    trap_steps: int = 50
    grown_characters: str = "BCFGHIJK"
    grown_task: str = "add"
    grown_steps: int = 50
    batch_size: int = 32

    @property
    def total_steps(self) -> int:
        return (self.base_steps + sum(s for _, s, _ in self.fine_tunes) + self.lora_steps + self.other_base_steps
                + self.trap_steps + self.grown_steps)

    def stream_seed(self, name: str) -> int:
        """The seed of one training run's initialisation and data, from the build's seed and the run's name."""
        return self.seed * 1000 + sum((i + 1) * ord(c) for i, c in enumerate(name))

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, raw: dict) -> Recipe:
        """The inverse of :meth:`to_json` (lists back to tuples)."""
        def plain(value):
            return tuple(plain(v) for v in value) if isinstance(value, list) else value

        return cls(**{f.name: plain(raw[f.name]) for f in fields(cls) if f.name in raw})


DEFAULT_RECIPE = Recipe()


@dataclass
class StepCounter:
    """Running count of training steps for the progress callback."""

    total: int
    progress: BuildProgress | None
    done: int = 0

    def callback(self, stage: str) -> Callable[[int, float], None]:
        if self.progress is not None:
            self.progress(stage, self.done, self.total)

        def on_step(step: int, loss: float) -> None:
            self.done += 1
            if self.progress is not None and (self.done % 10 == 0 or self.done == self.total):
                self.progress(stage, self.done, self.total)

        return on_step


# --- saving -------------------------------------------------------------------------------------------------
def generation_config() -> dict:
    return {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "do_sample": False, "max_new_tokens": 8}


def save_model(folder: Path, state: dict[str, torch.Tensor], config: DemoConfig, tokenizer: CharTokenizer) -> Path:
    """A Hugging Face model folder: ``model.safetensors`` (through mergescope's writer), config, tokenizer."""
    specs = [TensorSpec(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in state.items()]
    with CheckpointWriter(folder, specs) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.add_text("config.json", json.dumps(config.to_hf(), indent=2) + "\n")
        writer.add_text("generation_config.json", json.dumps(generation_config(), indent=2) + "\n")
        for name, text in tokenizer.files().items():
            writer.add_text(name, text)
        return writer.commit()


def save_adapter(folder: Path, model: DemoLlama, base_folder: Path, recipe: Recipe) -> Path:
    """A PEFT adapter folder naming ``base_folder`` (absolute) as its base."""
    folder.mkdir(parents=True)
    save_file(adapter_tensors(model), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_adapter_config(folder, str(base_folder), recipe.lora_targets, recipe.lora_rank, recipe.lora_alpha)
    return folder


# --- training steps -----------------------------------------------------------------------------------------
def pretrain(config: DemoConfig, tokenizer: CharTokenizer, seed: int, steps: int, recipe: Recipe,
             on_step=None) -> DemoLlama:
    """A base: seeded initialisation, then ``steps`` steps on the easy half of every task."""
    model = new_model(config, seed)
    spec = TrainSpec(TASK_NAMES, steps, recipe.base_lr, seed, recipe.batch_size, full=False)
    train(model, spec, tokenizer, on_step=on_step)
    return model


def fine_tune(base: DemoLlama, tokenizer: CharTokenizer, task: str, steps: int, lr: float, seed: int, recipe: Recipe,
              on_step=None) -> DemoLlama:
    """A copy of ``base`` trained ``steps`` steps on the whole of ``task``, with ``recipe.replay`` of the
    pre-training mix."""
    model = copy.deepcopy(base)
    train(model, TrainSpec((task,), steps, lr, seed, recipe.batch_size, replay=recipe.replay), tokenizer,
          on_step=on_step)
    return model


def grow_vocabulary(model: DemoLlama, extra_rows: int) -> DemoLlama:
    """A copy of ``model`` with ``extra_rows`` more tokens; their embedding and head rows start at the mean
    of the existing rows (the usual way to add tokens)."""
    config = DemoConfig(**{**asdict(model.config), "vocab_size": model.config.vocab_size + extra_rows})
    grown = DemoLlama(config)
    state = dict(model.state_dict())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = state[name]
        state[name] = torch.cat([rows, rows.mean(0, keepdim=True).expand(extra_rows, -1)])
    grown.load_state_dict(state)
    return grown


def train_models(out: Path, recipe: Recipe, progress: BuildProgress | None = None) -> dict:
    """Train and save every model into ``out``; the manifest's model part. The adapter names ``out/base``
    as its base (the workspace rewrites it once the folder is in place)."""
    steps = StepCounter(recipe.total_steps, progress)
    tokenizer = CharTokenizer()
    config = DemoConfig(vocab_size=tokenizer.vocab_size, hidden_size=recipe.hidden_size,
                        intermediate_size=recipe.intermediate_size)
    base = pretrain(config, tokenizer, recipe.stream_seed("base"), recipe.base_steps, recipe,
                    steps.callback("pre-training the base"))
    save_model(out / "base", base.state_dict(), config, tokenizer)
    fine_tunes = []
    for task, n, lr in recipe.fine_tunes:
        model = fine_tune(base, tokenizer, task, n, lr, recipe.stream_seed(task), recipe,
                          steps.callback(f"fine-tuning on {task}"))
        save_model(out / f"ft_{task}", model.state_dict(), config, tokenizer)
        fine_tunes.append({"path": f"ft_{task}", "task": task, "steps": n, "lr": lr})
    lora_name = f"lora_{recipe.lora_task}"
    lora = with_lora(base, recipe.lora_targets, recipe.lora_rank, recipe.lora_alpha, recipe.stream_seed(lora_name))
    spec = TrainSpec((recipe.lora_task,), recipe.lora_steps, recipe.lora_lr, recipe.stream_seed(lora_name),
                     recipe.batch_size, replay=recipe.replay)
    train(lora, spec, tokenizer, trainable=is_lora_parameter,
          on_step=steps.callback(f"LoRA fine-tuning on {recipe.lora_task}"))
    save_adapter(out / lora_name, lora, out / "base", recipe)
    other = pretrain(config, tokenizer, recipe.stream_seed("other base"), recipe.other_base_steps, recipe,
                     steps.callback("pre-training another base (trap)"))
    trap = fine_tune(other, tokenizer, recipe.trap_task, recipe.trap_steps, recipe.trap_lr, recipe.stream_seed("trap"),
                     recipe, steps.callback(f"fine-tuning it on {recipe.trap_task}"))
    save_model(out / "trap_other_base", trap.state_dict(), config, tokenizer)
    grown_tokenizer = tokenizer.grown(recipe.grown_characters)
    grown = grow_vocabulary(base, grown_tokenizer.vocab_size - tokenizer.vocab_size)
    grown = fine_tune(grown, grown_tokenizer, recipe.grown_task, recipe.grown_steps, recipe.trap_lr,
                      recipe.stream_seed("grown"), recipe,
                      steps.callback(f"fine-tuning a grown vocabulary on {recipe.grown_task}"))
    save_model(out / "trap_grown_vocab", grown.state_dict(), grown.config, grown_tokenizer)
    return {
        "base": "base",
        "fine_tunes": fine_tunes,
        "lora": [{"path": lora_name, "task": recipe.lora_task, "steps": recipe.lora_steps, "rank": recipe.lora_rank,
                  "alpha": recipe.lora_alpha, "targets": list(recipe.lora_targets)}],
        "traps": [
            {"path": "trap_other_base", "kind": "different_base", "task": recipe.trap_task,
             "note": "fine-tune of another base (another initialisation); merging it with the others breaks the model"},
            {"path": "trap_grown_vocab", "kind": "grown_vocab", "task": recipe.grown_task,
             "note": f"its vocabulary grew by {len(recipe.grown_characters)} tokens ({recipe.grown_characters}); "
                     "embedding and head have more rows, so merges refuse it"},
        ],
    }


def write_adapter_base(folder: Path, base_folder: Path, recipe: Recipe) -> None:
    """Point the adapter in ``folder`` at ``base_folder``."""
    write_adapter_config(folder, str(base_folder), recipe.lora_targets, recipe.lora_rank, recipe.lora_alpha)
