"""Merge plans: mergekit YAML (mergekit 0.1.5's schema), read, validated up front, and written back.

What a plan says — the method, the base, the models or layer slices, parameters — is kept apart from how
it runs (:mod:`.job`, :mod:`.executor`). Everything mergescope adds lives under a top-level
``mergescope:`` key, which mergekit ignores, so every plan mergescope writes still runs in mergekit.

Loading reports every problem at once, each with its line: unknown keys, unknown methods (listing the
known ones), unknown or misplaced parameters, values of the wrong type or out of range, missing base
models, malformed slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergescope.checkpoints import MergescopeError
from mergescope.checkpoints.dtypes import dtype_name

from .chat_templates import chat_template_problem
from .methods import METHODS, MergeMethod
from .parameters import coerce, is_conditional, is_scalar
from .soup_block import greedy_soup_options
from .tokenizer_settings import TokenizerSettings, tokenizer_settings
from .yaml_lines import LinedDict, dump_yaml, load_yaml, read_yaml_file

TOP_LEVEL_KEYS = {
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "modules", "mergescope",
}
MERGESCOPE_KEYS = {"seed": int, "device": str, "shard_size": (int, str), "memory_budget": (int, str),
                  "allow_non_finite": bool, "greedy_soup": dict}
#: what a plan asking for a model's own code (mergekit's --trust-remote-code) is told
NO_REMOTE_CODE = ("trust_remote_code is not supported: mergescope reads weights, config and tokenizer files as data "
                  "and never fetches or runs a model's own code; remove it")
#: the plan's file in a merged folder, as mergekit writes it (and mergescope, beside the weights)
PLAN_FILE_NAME = "mergekit_config.yml"
#: the names a merged folder's plan may have (mergekit reads either)
PLAN_FILE_NAMES = (PLAN_FILE_NAME, "mergekit_config.yaml")


class PlanError(MergescopeError):
    """A plan with problems; the message has one line per problem, each citing the plan's line."""


@dataclass
class ModelEntry:
    """One input: a model reference (path, hub id or ``path+lora``) with its own parameters."""

    model: str
    parameters: dict = field(default_factory=dict)
    line: int = 0


@dataclass
class SliceSource(ModelEntry):
    layer_range: tuple[int, int] = (0, 0)


@dataclass
class OutputSlice:
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    line: int = 0


@dataclass
class MergePlan:
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # tokenizer.source, kept for callers that only need the name
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    options: dict = field(default_factory=dict)  # the mergescope: block
    source: str = "<plan>"
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    def to_yaml(self) -> str:
        """The plan as mergekit YAML (the ``raw`` document, so unknown-to-us but valid keys survive)."""
        return dump_yaml(self.raw)


def plan_file_in(folder: Path) -> Path | None:
    """The plan a merged folder holds (:data:`PLAN_FILE_NAMES`), None when it holds none."""
    return next((folder / name for name in PLAN_FILE_NAMES if (folder / name).is_file()), None)


def load_plan(path: str | Path) -> MergePlan:
    path = Path(path)
    return plan_from_document(read_yaml_file(path), str(path))


def parse_plan(text: str, source: str = "<plan>") -> MergePlan:
    return plan_from_document(load_yaml(text, source), source)


def plan_from_document(document: object, source: str) -> MergePlan:
    problems = PlanProblems(source)
    plan = _build(document, problems)
    problems.raise_if_any()
    assert plan is not None
    plan.source = source
    plan.raw = document  # type: ignore[assignment]
    return plan


class PlanProblems:
    """Problems found in a plan, each with its line (0: the plan as a whole), raised together."""

    MAX_SHOWN = 20

    def __init__(self, source: str):
        self.source = source
        self.items: list[tuple[int, str]] = []
        self.per_tensor: dict[tuple[int, str], list[str]] = {}  # (line, message) → the tensors it shows for

    def add(self, line: int, message: str) -> None:
        self.items.append((line, message))

    def add_for_tensor(self, line: int, message: str, tensor: str) -> None:
        """A problem that shows for each tensor it touches, reported once: ``message (for T)`` or
        ``message (for T and N more tensors)``."""
        self.per_tensor.setdefault((line, message), []).append(tensor)

    def __len__(self) -> int:
        return len(self.items) + len(self.per_tensor)

    def raise_if_any(self) -> None:
        for (line, message), tensors in self.per_tensor.items():
            more = f" and {len(tensors) - 1} more tensors" if len(tensors) > 1 else ""
            self.items.append((line, f"{message} (for {tensors[0]}{more})"))
        self.per_tensor = {}
        if not self.items:
            return
        lines = [
            f"{self.source}:{line}: {message}" if line else f"{self.source}: {message}"
            for line, message in sorted(self.items)
        ]
        more = len(lines) - self.MAX_SHOWN
        raise PlanError("\n".join(lines[: self.MAX_SHOWN] + ([f"... and {more} more problems"] if more > 0 else [])))


def _build(document: object, problems: PlanProblems) -> MergePlan | None:
    if not isinstance(document, LinedDict):
        problems.add(0, "a plan is a YAML mapping with at least merge_method and models (or slices)")
        return None
    for key in document:
        if key == "trust_remote_code":
            problems.add(document.line_of(key), NO_REMOTE_CODE)
        elif key not in TOP_LEVEL_KEYS:
            problems.add(document.line_of(key), f"unknown key {key!r} (known: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    method_name = document.get("merge_method")
    method = METHODS.get(method_name) if isinstance(method_name, str) else None
    if method is None:
        problems.add(
            document.line_of("merge_method"),
            f"merge_method {method_name!r} is not known (known: {', '.join(sorted(METHODS))})"
            if method_name is not None else "merge_method is missing",
        )
    if "modules" in document:
        problems.add(
            document.line_of("modules"), "modules: (multi-module models) is not supported yet; use models or slices"
        )
    has_models, has_slices = document.get("models") is not None, document.get("slices") is not None
    if has_models == has_slices:
        problems.add(document.line, "give exactly one of models: or slices:")
    base_model = _model_reference(document, "base_model", problems, optional=True)
    if method is not None and method.needs_base and base_model is None:
        problems.add(document.line_of("merge_method"), f"{method.name} needs a base_model")
    plan = MergePlan(merge_method=method_name if isinstance(method_name, str) else "", base_model=base_model)
    plan.parameters = _parameters(document, "parameters", method, problems, model_level=False)
    if has_models:
        plan.models = _models(document["models"], document.line_of("models"), method, problems)
    if has_slices:
        plan.slices = _slices(document["slices"], document.line_of("slices"), method, problems)
    for key in ("dtype", "out_dtype"):
        if document.get(key) is not None:
            try:
                dtype_name(str(document[key]))
                setattr(plan, key, str(document[key]))
            except MergescopeError as exc:
                problems.add(document.line_of(key), f"{key}: {exc}")
    plan.tokenizer = tokenizer_settings(document, problems)
    plan.tokenizer_source = plan.tokenizer.source if plan.tokenizer is not None else None
    if document.get("chat_template") is not None:
        plan.chat_template = str(document["chat_template"])
        problem = chat_template_problem(plan.chat_template)
        if problem:
            problems.add(document.line_of("chat_template"), problem)
    plan.options = _mergescope_options(document, problems)
    return plan


def _model_reference(mapping: LinedDict, key: str, problems: PlanProblems, optional: bool = False) -> str | None:
    value = mapping.get(key)
    if value is None:
        if not optional:
            problems.add(mapping.line, f"{key} is missing")
        return None
    if isinstance(value, LinedDict) and isinstance(value.get("model"), (str, LinedDict)):
        value = value["model"]  # mergekit's long form {model: ..., lora: ...}
        if isinstance(value, LinedDict):
            path, lora = value.get("path"), value.get("lora")
            return f"{path}+{lora}" if lora else str(path)
    if not isinstance(value, str) or not value.strip():
        problems.add(mapping.line_of(key), f"{key} must be a path, a hub id or path+lora, not {value!r}")
        return None
    return value.strip()


def _models(value: object, line: int, method: MergeMethod | None, problems: PlanProblems) -> list[ModelEntry]:
    if not isinstance(value, list) or not value:
        problems.add(line, "models must be a non-empty list of {model: ..., parameters: ...}")
        return []
    entries = []
    for item in value:
        if isinstance(item, str):
            item = LinedDict(model=item)
            item.line, item.key_lines = line, {}
        if not isinstance(item, LinedDict):
            problems.add(line, f"models entry {item!r} is not a mapping with a model:")
            continue
        for key in item:
            if key not in ("model", "parameters"):
                problems.add(item.line_of(key), f"unknown key {key!r} in a models entry (known: model, parameters)")
        model = _model_reference(item, "model", problems)
        if model is not None:
            parameters = _parameters(item, "parameters", method, problems, model_level=True)
            entries.append(ModelEntry(model, parameters, item.line))
    return entries


def _slices(value: object, line: int, method: MergeMethod | None, problems: PlanProblems) -> list[OutputSlice]:
    if not isinstance(value, list) or not value:
        problems.add(line, "slices must be a non-empty list of {sources: [...]}")
        return []
    slices = []
    for item in value:
        if not isinstance(item, LinedDict) or not isinstance(item.get("sources"), list) or not item["sources"]:
            problems.add(getattr(item, "line", line), "each slice needs sources: a non-empty list")
            continue
        sources = []
        for source in item["sources"]:
            if not isinstance(source, LinedDict):
                problems.add(item.line_of("sources"), f"slice source {source!r} is not a mapping")
                continue
            model = _model_reference(source, "model", problems)
            layer_range = source.get("layer_range")
            if (
                not isinstance(layer_range, list) or len(layer_range) != 2
                or not all(type(x) is int for x in layer_range) or not 0 <= layer_range[0] < layer_range[1]
            ):
                problems.add(
                    source.line_of("layer_range"),
                    f"layer_range must be [start, end) with 0 <= start < end, not {layer_range!r}",
                )
                continue
            if model is not None:
                params = _parameters(source, "parameters", method, problems, model_level=True)
                sources.append(SliceSource(model, params, source.line, tuple(layer_range)))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            problems.add(
                item.line, f"the sources of a slice must have the same number of layers, not {sorted(lengths)}"
            )
        base = _model_reference(item, "base_model", problems, optional=True)
        parameters = _parameters(item, "parameters", method, problems, model_level=False)
        slices.append(OutputSlice(sources, base, parameters, item.line))
    return slices


def _parameters(
    mapping: LinedDict, key: str, method: MergeMethod | None, problems: PlanProblems, *, model_level: bool
) -> dict:
    value = mapping.get(key)
    if value is None:
        return {}
    if not isinstance(value, LinedDict):
        problems.add(mapping.line_of(key), f"{key} must be a mapping of parameter names to values")
        return {}
    if method is None:
        return dict(value)
    specs = {p.name: p for p in method.parameters}
    for name, setting in value.items():
        line = value.line_of(name)
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            problems.add(line, f"{method.name} has no parameter {name!r} (known: {known})")
        elif model_level and not spec.per_model:
            problems.add(
                line, f"{name} applies to the whole merge: put it under the top-level parameters:, not a model's"
            )
        else:
            for message in _setting_problems(name, setting, spec):
                problems.add(line, message)
    return dict(value)


def _setting_problems(name: str, setting: object, spec) -> list[str]:
    """Type and range problems of one setting: a scalar, a gradient, or filtered values."""
    kind = spec.value_type
    if is_conditional(setting):
        setting = [setting]
    if isinstance(setting, list) and setting and all(is_conditional(c) for c in setting):
        return [m for c in setting for m in _setting_problems(name, c["value"], spec)]
    values = setting if isinstance(setting, list) and setting else [setting]
    if not all(is_scalar(v) for v in values):
        return [f"{name}: {setting!r} is not a number, a list of numbers (a gradient) or [{{filter, value}}...]"]
    problems = []
    for value in values:
        try:
            number = coerce(value, kind)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if name == "density" and not 0 < number <= 1:
            problems.append(f"density: {number} is outside (0, 1]: 1 keeps the whole task vector, 0 would drop it all")
            continue
        low, high = spec.low, spec.high
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            problems.append(f"{name}: {number} is outside {bounds}")
    return problems


def _mergescope_options(document: LinedDict, problems: PlanProblems) -> dict:
    block = document.get("mergescope")
    if block is None:
        return {}
    if not isinstance(block, LinedDict):
        problems.add(document.line_of("mergescope"), "mergescope: must be a mapping (seed, device, shard_size, ...)")
        return {}
    options = {}
    for key, value in block.items():
        expected = MERGESCOPE_KEYS.get(key)
        if key == "greedy_soup":  # a mergescope extension with its own keys (see .soup_block)
            options[key], found = greedy_soup_options(value, document, block.line_of(key))
            for line, message in found:
                problems.add(line, message)
        elif key == "trust_remote_code":
            problems.add(block.line_of(key), NO_REMOTE_CODE)
        elif expected is None:
            known = ", ".join(sorted(MERGESCOPE_KEYS))
            problems.add(block.line_of(key), f"unknown mergescope option {key!r} (known: {known})")
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            problems.add(block.line_of(key), f"mergescope.{key} has the wrong type: {value!r}")
        else:
            options[key] = value
    return options
