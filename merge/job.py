"""From a plan to a job: the checkpoints opened, and every output tensor's inputs and parameters resolved.

This is the "how" side of a plan, computed from headers alone before any tensor is read: which input
tensors make each output tensor, at which layer position t, with which parameters; the output config
(``num_hidden_layers`` for layer stacking); the output dtype. Every input problem that headers reveal —
a model that cannot be opened, a tensor missing from a model, shapes that disagree (a grown vocabulary
included), a layer range past a model's last layer, a required parameter nobody set — is collected and
reported together before anything runs.

Layer positions follow mergekit: layer k of an output slice of L layers has t = k / (L − 1) (t = 1 for a
single layer); tensors outside the numbered layers (embeddings, final norm, head) have t = 0, and in a
sliced plan come from the first slice's sources (those before the layers) or the last slice's (after).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mergescope.checkpoints import (
    Checkpoint,
    MergescopeError,
    group_order_key,
    layer_group,
    layer_index,
    open_checkpoint,
)
from mergescope.checkpoints.dtypes import ITEMSIZE, dtype_name
from mergescope.checkpoints.vocabulary import is_vocabulary_tensor

from .methods import MergeMethod
from .parameters import resolve
from .plan import MergePlan, ModelEntry, OutputSlice, PlanProblems, SliceSource
from .vocabulary_job import plan_vocabulary
from .vocabulary_merge import OutputVocabulary, RowAlignment


@dataclass
class TensorTask:
    """One output tensor: its inputs (checkpoint reference, tensor name) and resolved parameters."""

    output: str
    shape: tuple[int, ...]
    base: tuple[str, str] | None  # (reference, tensor name) of the base model's input
    inputs: list[tuple[str, str]]  # the other models' inputs, in plan order
    params: list[dict]  # per entry of ``inputs``
    options: dict  # method-level parameters
    t: float
    vocabulary: RowAlignment | None = None  # embedding/head rows matched by token (tokenizer settings)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def reads(self) -> list[tuple[str, str]]:
        return ([self.base] if self.base else []) + self.inputs


@dataclass
class MergeJob:
    plan: MergePlan
    method: MergeMethod
    checkpoints: dict[str, Checkpoint]
    tasks: list[TensorTask]
    out_dtype: str
    config: dict | None
    reference: Checkpoint  # the base, else the first model: config, generation config, default tokenizer
    tokenizer_from: Checkpoint | None
    warnings: list[str] = field(default_factory=list)
    vocabulary: OutputVocabulary | None = None  # with tokenizer settings: the output tokens, in row order

    @property
    def plan_models(self) -> list[str]:
        """The base and the models of the plan, in plan order (the checkpoints a merge reads from)."""
        entries = self.plan.models or [s for sl in self.plan.slices or [] for s in sl.sources]
        base = [self.plan.base_model] if self.plan.base_model else []
        return list(dict.fromkeys(base + [e.model for e in entries]))

    @property
    def bytes_to_read(self) -> int:
        return sum(self.checkpoints[ref].spec(name).nbytes for task in self.tasks for ref, name in task.reads)

    @property
    def bytes_to_write(self) -> int:
        return sum(t.numel * ITEMSIZE[self.out_dtype] for t in self.tasks)

    @property
    def largest_task_bytes(self) -> int:
        """Bytes of the largest output tensor's inputs in float32: the unit of the memory bound."""
        return max((t.numel * 4 * len(t.reads) for t in self.tasks), default=0)


def build_job(plan: MergePlan, *, checkpoints: dict[str, Checkpoint] | None = None) -> MergeJob:
    """Open the plan's checkpoints (headers only) and resolve every output tensor; raise :class:`PlanError`
    listing every problem found."""
    problems = PlanProblems(plan.source)
    opened = dict(checkpoints or {})
    entries = plan.models or [s for sl in plan.slices or [] for s in sl.sources]
    references = ([plan.base_model] if plan.base_model else []) + [e.model for e in entries]
    references += [sl.base_model for sl in plan.slices or [] if sl.base_model]
    for ref in dict.fromkeys(references):
        if ref not in opened:
            try:
                base = opened.get(plan.base_model) if plan.base_model and ref != plan.base_model else None
                opened[ref] = open_checkpoint(ref, base=base)
            except MergescopeError as exc:
                problems.add(_line_of(plan, ref), f"cannot open {ref}: {exc}")
    problems.raise_if_any()
    reference = opened[plan.base_model] if plan.base_model else opened[entries[0].model]
    if plan.models is not None:
        tasks, layers_out = _model_tasks(plan, opened, reference, problems), None
    else:
        tasks, layers_out = _slice_tasks(plan, opened, reference, problems)
    problems.raise_if_any()
    out_dtype = dtype_name(plan.out_dtype or plan.dtype or _dominant_dtype(reference))
    config = dict(reference.config.raw) if reference.config.raw else None
    if config is not None and layers_out is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if key in config:
                config[key] = layers_out
        _slice_layer_types(config, plan, opened)
    warnings: list[str] = []
    reference_ref = plan.base_model or entries[0].model
    vocabulary = plan_vocabulary(plan, opened, reference_ref, [e.model for e in entries], tasks, problems, warnings)
    problems.raise_if_any()
    tokenizer_from = reference
    if plan.tokenizer_source not in (None, "base", "union"):
        tokenizer_from = opened[plan.tokenizer_source]
    if config is not None and vocabulary is not None:
        _set_vocab_size(config, vocabulary.rows)
    return MergeJob(plan, plan.method, opened, tasks, out_dtype, config, reference, tokenizer_from, warnings,
                    vocabulary)


def _slice_layer_types(config: dict, plan: MergePlan, opened: dict[str, Checkpoint]) -> None:
    """A stacked model's ``layer_types`` (Qwen2, Gemma 2: sliding or full attention per layer): each output
    layer takes the type of the layer it comes from (mergekit 0.1.5 leaves the list as it was, and transformers
    then refuses the config)."""
    if not isinstance(config.get("layer_types"), list):
        return
    types = []
    for output_slice in plan.slices or []:
        first = output_slice.sources[0]
        source = opened[first.model].config.raw.get("layer_types")
        start, stop = first.layer_range
        if not isinstance(source, list) or len(source) < stop:
            return  # nothing to take the types from: leave the list (transformers will say what is wrong)
        types += source[start:stop]
    config["layer_types"] = types


def _set_vocab_size(config: dict, rows: int) -> None:
    """``vocab_size`` (and a multimodal config's ``text_config.vocab_size``) set to the output's rows."""
    config["vocab_size"] = rows
    if isinstance(config.get("text_config"), dict) and "vocab_size" in config["text_config"]:
        config["text_config"] = {**config["text_config"], "vocab_size": rows}


def _dominant_dtype(checkpoint: Checkpoint) -> str:
    counts = checkpoint.dtypes
    return max(counts, key=counts.get) if counts else "F32"


def _line_of(plan: MergePlan, ref: str) -> int:
    for entry in plan.models or [s for sl in plan.slices or [] for s in sl.sources]:
        if entry.model == ref:
            return entry.line
    return 0


def layer_count(checkpoint: Checkpoint) -> int:
    if checkpoint.config.num_layers is not None:
        return checkpoint.config.num_layers
    indices = [layer_index(g) for g in checkpoint.groups() if layer_index(g) is not None]
    return max(indices) + 1 if indices else 0


def _t_of(tensor: str, layers: int) -> float:
    index = layer_index(layer_group(tensor))
    if index is None:
        return 0.0
    return index / (layers - 1) if layers > 1 else 1.0


def _resolve_params(plan, method, entries, slice_params, tensor_name, t, problems) -> tuple[list[dict], dict]:
    """Each entry's per-model parameters and the method-level ones for one output tensor at layer position t;
    a required parameter nobody set is a problem (citing the entry's line)."""

    def resolved(spec, scopes: list) -> object:
        return resolve(spec.name, scopes, spec.default, tensor_name=tensor_name, t=t, kind=spec.value_type)

    per_model, shared = [], {}
    for spec in method.parameters:
        if not spec.per_model:
            shared[spec.name] = resolved(spec, [slice_params, plan.parameters])
            if shared[spec.name] is None and spec.required:
                problems.add_for_tensor(0, f"parameter {spec.name} is required by {method.name}", tensor_name)
    for entry in entries:
        values = {}
        for spec in method.parameters:
            if spec.per_model:
                value = resolved(spec, [entry.parameters, slice_params, plan.parameters])
                if value is None and spec.required:
                    problems.add_for_tensor(entry.line, f"{entry.model}: parameter {spec.name} is required by "
                                            f"{method.name}", tensor_name)
                values[spec.name] = value
        per_model.append(values)
    return per_model, shared


def _base_input(base_model: str | None, method: MergeMethod) -> str | None:
    """The reference given to the method as θ₀: the base for methods that use one, else None (for
    "input" methods mergekit merges the base like any other model)."""
    return base_model if method.base_role in ("required", "optional") else None


def _check_inputs(opened, reads, name, shape, problems, line_of, by_token: bool = False) -> None:
    """Every input exists with the output's shape; with ``by_token`` (tokenizer settings) an embedding's or
    head's row count may differ (its rows are aligned by token)."""
    rows_free = by_token and is_vocabulary_tensor(name)
    for ref, tensor in reads:
        checkpoint = opened[ref]
        if tensor not in checkpoint:
            problems.add(line_of(ref), f"{ref} has no tensor {tensor}")
            continue
        have = tuple(checkpoint.spec(tensor).shape)
        if (have[1:] if rows_free else have) != (tuple(shape)[1:] if rows_free else tuple(shape)):
            vocabulary = is_vocabulary_tensor(tensor) and have[1:] == tuple(shape)[1:]
            problems.add(
                line_of(ref),
                f"{ref}: {tensor} has shape {list(have)} but {name} needs {list(shape)}"
                + (" (a different vocabulary size: set tokenizer_source: union, base or a model to match rows by "
                   "token)" if vocabulary else ""),
            )


def _model_tasks(plan: MergePlan, opened, reference: Checkpoint, problems: PlanProblems) -> list[TensorTask]:
    method = plan.method
    entries: list[ModelEntry] = list(plan.models or [])
    base_ref = _base_input(plan.base_model, method)
    others = [e for e in entries if e.model != base_ref]
    if method.base_role == "input" and plan.base_model and plan.base_model not in {e.model for e in entries}:
        others.append(ModelEntry(plan.base_model, {}, 0))  # mergekit merges the base like any model
    layers = layer_count(reference)
    line_of = lambda ref: _line_of(plan, ref)  # noqa: E731
    tasks = []
    for group_tensors in reference.groups().values():
        for name in group_tensors:
            shape = reference.spec(name).shape
            t = _t_of(name, layers)
            params, shared = _resolve_params(plan, method, others, {}, name, t, problems)
            base = (base_ref, name) if base_ref else None
            inputs = [(e.model, name) for e in others]
            _check_inputs(opened, ([base] if base else []) + inputs, name, shape, problems, line_of,
                          plan.tokenizer is not None)
            tasks.append(TensorTask(name, shape, base, inputs, params, shared, t))
            if len(problems) > 50:
                return tasks
    return tasks


def _slice_tasks(plan: MergePlan, opened, reference: Checkpoint, problems: PlanProblems):
    method = plan.method
    slices: list[OutputSlice] = list(plan.slices or [])
    line_of = lambda ref: _line_of(plan, ref)  # noqa: E731
    for output_slice in slices:
        for source in output_slice.sources:
            available = layer_count(opened[source.model])
            if source.layer_range[1] > available:
                problems.add(
                    source.line, f"layer_range {list(source.layer_range)} goes past {source.model}'s {available} layers"
                )
    if problems:
        return [], None
    groups = reference.groups()
    numbered = [g for g in groups if layer_index(g) is not None]
    if not numbered:
        problems.add(0, f"{reference.source} has no numbered layers to slice")
        return [], None
    prefix = numbered[0].rsplit(".", 1)[0]
    before = [g for g in groups if layer_index(g) is None and group_order_key(g)[0] == 0]
    after = [g for g in groups if layer_index(g) is None and group_order_key(g)[0] != 0]
    tasks: list[TensorTask] = []

    def add(slice_: OutputSlice, output: str, names: list[str], t: float) -> None:
        base_ref = _base_input(slice_.base_model or plan.base_model, method)
        sources = [(s, n) for s, n in zip(slice_.sources, names)]
        base_input = next(((s.model, n) for s, n in sources if s.model == base_ref), None)
        if base_ref and base_input is None:
            base_input = (base_ref, names[0])
        others = [(s, n) for s, n in sources if s.model != base_ref]
        params, shared = _resolve_params(plan, method, [s for s, _ in others], slice_.parameters, output, t, problems)
        shape = opened[sources[0][0].model].spec(names[0]).shape if names[0] in opened[sources[0][0].model] else ()
        inputs = [(s.model, n) for s, n in others]
        _check_inputs(opened, ([base_input] if base_input else []) + inputs, output, shape, problems, line_of,
                      plan.tokenizer is not None)
        tasks.append(TensorTask(output, tuple(shape), base_input, inputs, params, shared, t))

    for group in before:
        for name in groups[group]:
            add(slices[0], name, [name] * len(slices[0].sources), 0.0)
    out_layer = 0
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    for output_slice in slices:
        length = output_slice.sources[0].layer_range[1] - output_slice.sources[0].layer_range[0]
        for k in range(length):
            t = k / (length - 1) if length > 1 else 1.0
            first: SliceSource = output_slice.sources[0]
            source_group = f"{prefix}.{first.layer_range[0] + k}"
            for name in opened[first.model].groups().get(source_group, []):
                suffix = pattern.sub("", name)
                names = [f"{prefix}.{s.layer_range[0] + k}.{suffix}" for s in output_slice.sources]
                add(output_slice, f"{prefix}.{out_layer}.{suffix}", names, t)
            out_layer += 1
    for group in after:
        for name in groups[group]:
            add(slices[-1], name, [name] * len(slices[-1].sources), 0.0)
    return tasks, out_layer
