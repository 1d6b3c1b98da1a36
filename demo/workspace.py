"""``build_workspace(DIR)``: train the demo models and lay out a workspace that every mergescope command opens.

DIR holds

- ``base/`` — a small Llama-architecture model pre-trained briefly on all tasks (short inputs only)
- ``ft_add/``, ``ft_reverse/``, ``ft_sort/`` — full fine-tunes of the base, one task each, different lengths
- ``lora_reverse/`` — a LoRA fine-tune, saved as a PEFT adapter whose ``base_model_name_or_path`` is DIR/base
- ``trap_other_base/`` — a fine-tune of a *different* base (same recipe, another seed): merging it breaks
- ``trap_grown_vocab/`` — a fine-tune whose vocabulary grew by 8 characters (more embedding/head rows)
- ``plans/*.yml`` — mergekit plans (see :mod:`.plans`)
- ``mergescope-demo.json`` — the manifest: what is where, the tasks, each model's measured accuracy

Every model folder has ``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer
(``vocab.json``, ``tokenizer.json``). The build is deterministic (seeded, fixed threads), is written into a
hidden temporary folder renamed into place when complete, and is skipped when DIR already holds a manifest
of this builder version and recipe.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergescope.checkpoints import CheckpointWriter, MergescopeError, TensorSpec
from mergescope.checkpoints.dtypes import dtype_name

from .evaluate import evaluate_model
from .lora import adapter_tensors, is_lora_parameter, merged_state, with_lora, write_adapter_config
from .model import DemoConfig, DemoLlama, new_model
from .plans import demo_plans, write_plans
from .tasks import PRETRAIN_MAX_LENGTH, TASK_DESCRIPTIONS, TASK_NAMES
from .tokenizer import BOS, EOS, PAD, CharTokenizer
from .train import TrainSpec, train

MANIFEST = "mergescope-demo.json"
SCHEMA = "mergescope.demo/1"
#: bump when a change to the recipe's code (not its numbers) changes what a build produces
BUILDER_VERSION = 1

#: ``progress(stage, steps_done, steps_total)``, called as training advances
BuildProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Recipe:
    """Everything a build trains, with its numbers (seeds, steps, learning rates)."""

    base_seed: int = 0
    base_steps: int = 800
    base_lr: float = 3e-3
    #: (task, steps, peak learning rate) of each full fine-tune
    fine_tunes: tuple[tuple[str, int, float], ...] = (("add", 400, 5e-4), ("reverse", 400, 1e-3), ("sort", 250, 5e-4))
    trap_lr: float = 5e-4
    lora_task: str = "sort"
    lora_steps: int = 150
    lora_lr: float = 5e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    other_base_seed: int = 1
    other_base_steps: int = 300
    trap_task: str = "sort"
    trap_steps: int = 100
    grown_characters: str = "BCFGHIJK"
    grown_task: str = "add"
    grown_steps: int = 100
    batch_size: int = 32

    @property
    def total_steps(self) -> int:
        return (self.base_steps + sum(s for _, s, _ in self.fine_tunes) + self.lora_steps + self.other_base_steps
                + self.trap_steps + self.grown_steps)


DEFAULT_RECIPE = Recipe()


@dataclass
class _Steps:
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
def pretrain(config: DemoConfig, tokenizer: CharTokenizer, seed: int, steps: int, recipe: Recipe, on_step=None) -> DemoLlama:
    """A base: seeded initialisation, then ``steps`` steps on all tasks with inputs of at most
    :data:`~mergescope.demo.tasks.PRETRAIN_MAX_LENGTH` letters."""
    model = new_model(config, seed)
    spec = TrainSpec(TASK_NAMES, steps, recipe.base_lr, seed, recipe.batch_size, max_length=PRETRAIN_MAX_LENGTH)
    train(model, spec, tokenizer, on_step=on_step)
    return model


def fine_tune(base: DemoLlama, tokenizer: CharTokenizer, task: str, steps: int, lr: float, seed: int, recipe: Recipe, on_step=None) -> DemoLlama:
    """A copy of ``base`` trained ``steps`` steps on ``task`` alone (full input lengths)."""
    model = copy.deepcopy(base)
    train(model, TrainSpec((task,), steps, lr, seed, recipe.batch_size), tokenizer, on_step=on_step)
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


def _seed(name: str) -> int:
    return 100 + sum(ord(c) for c in name)


def _accuracy(model: DemoLlama, tokenizer: CharTokenizer) -> dict[str, float]:
    return {task: round(value, 4) for task, value in evaluate_model(model, tokenizer).items()}


def _train_all(out: Path, root: Path, recipe: Recipe, steps: _Steps) -> dict:
    """Train and save every model into ``out`` (path references point at ``root``); the manifest's model part."""
    tokenizer = CharTokenizer()
    config = DemoConfig(vocab_size=tokenizer.vocab_size)
    accuracy: dict[str, dict[str, float]] = {}
    base = pretrain(config, tokenizer, recipe.base_seed, recipe.base_steps, recipe, steps.callback("pre-training the base"))
    save_model(out / "base", base.state_dict(), config, tokenizer)
    accuracy["base"] = _accuracy(base, tokenizer)
    fine_tunes = []
    for task, n, lr in recipe.fine_tunes:
        model = fine_tune(base, tokenizer, task, n, lr, _seed(task), recipe, steps.callback(f"fine-tuning on {task}"))
        save_model(out / f"ft_{task}", model.state_dict(), config, tokenizer)
        accuracy[f"ft_{task}"] = _accuracy(model, tokenizer)
        fine_tunes.append({"path": f"ft_{task}", "task": task, "steps": n, "lr": lr})
    lora_name = f"lora_{recipe.lora_task}"
    lora = with_lora(base, recipe.lora_targets, recipe.lora_rank, recipe.lora_alpha, _seed(lora_name))
    spec = TrainSpec((recipe.lora_task,), recipe.lora_steps, recipe.lora_lr, _seed(lora_name), recipe.batch_size)
    train(lora, spec, tokenizer, trainable=is_lora_parameter, on_step=steps.callback(f"LoRA fine-tuning on {recipe.lora_task}"))
    save_adapter(out / lora_name, lora, root / "base", recipe)
    applied = DemoLlama(config)
    applied.load_state_dict(merged_state(lora))
    accuracy[lora_name] = _accuracy(applied, tokenizer)
    other = pretrain(config, tokenizer, recipe.other_base_seed, recipe.other_base_steps, recipe, steps.callback("pre-training another base (trap)"))
    trap = fine_tune(other, tokenizer, recipe.trap_task, recipe.trap_steps, recipe.trap_lr, _seed("trap"), recipe, steps.callback(f"fine-tuning it on {recipe.trap_task}"))
    save_model(out / "trap_other_base", trap.state_dict(), config, tokenizer)
    accuracy["trap_other_base"] = _accuracy(trap, tokenizer)
    grown_tokenizer = tokenizer.grown(recipe.grown_characters)
    grown = grow_vocabulary(base, grown_tokenizer.vocab_size - tokenizer.vocab_size)
    grown = fine_tune(grown, grown_tokenizer, recipe.grown_task, recipe.grown_steps, recipe.trap_lr, _seed("grown"), recipe,
                      steps.callback(f"fine-tuning a grown vocabulary on {recipe.grown_task}"))
    save_model(out / "trap_grown_vocab", grown.state_dict(), grown.config, grown_tokenizer)
    accuracy["trap_grown_vocab"] = _accuracy(grown, grown_tokenizer)
    return {
        "base": "base",
        "fine_tunes": fine_tunes,
        "lora": [{"path": lora_name, "task": recipe.lora_task, "steps": recipe.lora_steps, "rank": recipe.lora_rank,
                  "alpha": recipe.lora_alpha, "targets": list(recipe.lora_targets)}],
        "traps": [
            {"path": "trap_other_base", "kind": "different_base", "task": recipe.trap_task,
             "note": f"fine-tune of another base (seed {recipe.other_base_seed}); merging it with the others breaks the model"},
            {"path": "trap_grown_vocab", "kind": "grown_vocab", "task": recipe.grown_task,
             "note": f"its vocabulary grew by {len(recipe.grown_characters)} tokens ({recipe.grown_characters}); "
                     "embedding and head have more rows, so merges refuse it"},
        ],
        "accuracy": accuracy,
    }


# --- the workspace --------------------------------------------------------------------------------------------
def read_manifest(root: Path) -> dict | None:
    """The manifest of the workspace at ``root``, or None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("schema") == SCHEMA else None


def _is_current(manifest: dict | None, recipe: Recipe) -> bool:
    return bool(manifest) and manifest.get("builder_version") == BUILDER_VERSION and manifest.get("recipe") == _recipe_json(recipe)


def _recipe_json(recipe: Recipe) -> dict:
    return json.loads(json.dumps(asdict(recipe)))


def _plans_for(manifest: dict):
    fine_tunes = {f["task"]: f["path"] for f in manifest["fine_tunes"]}
    return demo_plans(fine_tunes, manifest["base"], "trap_other_base")


def _write_path_files(folder: Path, root: Path, manifest: dict, recipe: Recipe) -> None:
    """The files that hold absolute paths (plans, the adapter's base), written for a workspace at ``root``."""
    write_plans(_plans_for(manifest), folder / "plans", root)
    for lora in manifest["lora"]:
        write_adapter_config(folder / lora["path"], str(root / manifest["base"]), recipe.lora_targets, recipe.lora_rank, recipe.lora_alpha)


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_workspace(directory: str | os.PathLike, progress: BuildProgress | None = None, *, recipe: Recipe = DEFAULT_RECIPE) -> Path:
    """Build the demo workspace in ``directory`` (or reuse the one there) and return its absolute path.

    A folder that exists, is not empty and holds no demo manifest is refused (nothing of the user's is
    replaced); one holding an older build is rebuilt; one holding this build at another path (moved or
    copied) gets its plan and adapter paths rewritten.
    """
    root = Path(directory).expanduser().resolve()
    manifest = read_manifest(root)
    if _is_current(manifest, recipe):
        if manifest["root"] != str(root):
            _write_path_files(root, root, manifest, recipe)
            _write_manifest(root, {**manifest, "root": str(root)})
        return root
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and manifest is None)):
        raise MergescopeError(f"{root}: exists and is not a mergescope demo workspace; choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        start = time.perf_counter()
        models = _train_all(tmp, root, recipe, _Steps(recipe.total_steps, progress))
        manifest = {
            "schema": SCHEMA,
            "builder_version": BUILDER_VERSION,
            "root": str(root),
            **{k: v for k, v in models.items() if k != "accuracy"},
            "plans": [],
            "tasks": dict(TASK_DESCRIPTIONS),
            "accuracy": models["accuracy"],
            "recipe": _recipe_json(recipe),
            "torch": torch.__version__,
        }
        manifest["plans"] = [{"path": f"plans/{p.filename}", "method": p.method, "description": p.description} for p in _plans_for(manifest)]
        _write_path_files(tmp, root, manifest, recipe)
        manifest["build_seconds"] = round(time.perf_counter() - start, 1)
        _write_manifest(tmp, manifest)
        if progress is not None:
            progress("done", recipe.total_steps, recipe.total_steps)
        _replace(tmp, root, recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _replace(tmp: Path, root: Path, recipe: Recipe) -> None:
    """Move the finished build to ``root``; an old build there is removed after the move, and a concurrent
    build that finished first is kept."""
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        if not _is_current(read_manifest(root), recipe):
            raise MergescopeError(f"{root}: could not move the finished workspace into place") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
